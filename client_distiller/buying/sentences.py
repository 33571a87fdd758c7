"""The unpaired sentence bank DIME-FM distils against (and CLIP-KD's CRD adds to the class texts).

DIME-FM's point is that sentences need not describe the training images: any text that spans the
concepts (classes, their attributes, the domains' styles) lets the student match the teacher's
image-to-text geometry. Offline there is no caption corpus, so :func:`default_bank` builds one
deterministically from the class names, a small attribute vocabulary and caption templates (a
few hundred sentences, each bought once at the text price and cached). ``--sentences FILE``
replaces it with the user's own bank, one sentence per line.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from client_distiller.errors import UsageError
from client_distiller.prompts import class_text

ATTRIBUTES: tuple[str, ...] = (
    "red", "blue", "black", "white", "striped", "plain", "small", "large", "old", "new", "folded", "worn",
)
STYLES: tuple[str, ...] = (
    "photo", "sketch", "painting", "cartoon", "clipart", "drawing", "close-up photo", "blurry photo",
)
CAPTIONS: tuple[str, ...] = (
    "a {style} of a {attr} {name}.",
    "a {attr} {name} in a {style}.",
    "there is a {attr} {name} in this {style}.",
    "a {style} showing the {name}, which is {attr}.",
)
GENERIC: tuple[str, ...] = (
    "a photo of an object on a plain background.", "a pencil sketch of a simple shape.",
    "a colourful cartoon drawing.", "a painting with bold brush strokes.", "a black and white picture.",
    "a blurry photo of something.", "a close-up of a textured surface.", "an icon in flat clipart style.",
)
DEFAULT_SIZE = 300
MAX_SENTENCE_CHARS = 300


class SentenceBankError(UsageError):
    """An unusable sentence bank: empty, unreadable, or with an overlong line."""


def default_bank(class_names: Sequence[str], *, size: int = DEFAULT_SIZE, seed: int = 0) -> list[str]:
    """``size`` distinct sentences (fewer if the vocabulary runs out), deterministic in (classes, seed).

    Every class appears about equally often (round-robin over classes), with attributes, styles and
    templates drawn by a seeded generator; a few class-free sentences keep the bank unpaired.
    """
    if not class_names:
        raise SentenceBankError("no class names to build a sentence bank from")
    rng = random.Random(seed)
    names = [class_text(c) for c in class_names]
    bank: dict[str, None] = dict.fromkeys(GENERIC[: max(0, min(len(GENERIC), size // 20))])
    capacity = len(names) * len(ATTRIBUTES) * len(STYLES) * len(CAPTIONS)
    target = min(size, len(bank) + capacity)
    i = 0
    while len(bank) < target:
        name = names[i % len(names)]
        i += 1
        text = rng.choice(CAPTIONS).format(style=rng.choice(STYLES), attr=rng.choice(ATTRIBUTES), name=name)
        bank.setdefault(text, None)
    return list(bank)


def read_bank(path: Path | str) -> list[str]:
    """One sentence per line; blank lines ignored, duplicates dropped (each would be paid twice)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SentenceBankError(f"cannot read the sentence bank {path}: {exc}") from None
    bank = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not bank:
        raise SentenceBankError(f"the sentence bank {path} has no sentences")
    long = next((i for i, s in enumerate(bank) if len(s) > MAX_SENTENCE_CHARS), None)
    if long is not None:
        raise SentenceBankError(f"{path}: sentence {long + 1} is longer than {MAX_SENTENCE_CHARS} characters")
    return bank
