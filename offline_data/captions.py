"""Captions for the vendor's private split: domain style words x class synonyms x attributes.

They are richer than the bare class prompts a client uses ("a photo of a sneaker"): they name the
style ("a pencil sketch of a running shoe"), the colour actually painted and the background, which
is what lets a LiT-aligned teacher tie style words and object words to separate directions.
"""

from __future__ import annotations

import numpy as np

from .classes import ClassInfo
from .domains import DOMAINS


def captions_for(domain: str, cls: ClassInfo, attrs: dict[str, str], rng: np.random.Generator,
                 n: int = 2) -> list[str]:
    """``n`` distinct-as-possible captions for one rendered picture."""
    templates = DOMAINS[domain].captions
    out: list[str] = []
    for i in range(n):
        template = templates[int(rng.integers(len(templates)))] if i else templates[0]
        word = cls.synonyms[int(rng.integers(len(cls.synonyms)))] if i else cls.name
        if "{colour}" in template and "colour" not in attrs:
            template = templates[0]
        text = template.format(c=word, colour=attrs.get("colour", ""), bg=attrs.get("bg", "plain"))
        out.append(" ".join(text.split()))
    return out


def class_prompt(cls: ClassInfo, template: str = "a photo of a {c}") -> str:
    """The plain prompt a client would use for a class (folder name with ``_`` as spaces)."""
    return template.format(c=cls.key.replace("_", " "))
