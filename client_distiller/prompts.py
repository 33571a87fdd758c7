"""Prompt templates and the per-class text-embedding ensemble (VL2V-ADiP's class text targets).

Shared by both halves of the client so that bought (HTTP) and locally computed text targets are
built identically: for each class, every template is filled with the class name (``_`` -> space),
each template embedding is L2-normalised, the mean over templates is taken and renormalised.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from client_distiller.errors import UsageError

# A short default ensemble: cheap to buy (C x len(TEMPLATES) texts) and covers the style shifts of
# DomainBed-like domains (photo, sketch, painting, cartoon, clipart).
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a sketch of a {}.",
    "a painting of a {}.",
    "a cartoon {}.",
    "a clipart of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)


class PromptError(UsageError):
    """Bad prompt input: an empty class name, no templates, or mismatched shapes."""


def class_text(class_name: str) -> str:
    """The natural-language form of a class name: underscores become spaces, ends trimmed."""
    text = class_name.replace("_", " ").strip()
    if not text:
        raise PromptError(f"empty class name {class_name!r}")
    return text


def class_prompts(class_name: str, templates: Sequence[str] = TEMPLATES) -> list[str]:
    """Every template filled with ``class_name`` (in template order)."""
    if not templates:
        raise PromptError("no prompt templates")
    name = class_text(class_name)
    return [t.format(name) for t in templates]


def all_prompts(class_names: Sequence[str], templates: Sequence[str] = TEMPLATES) -> list[list[str]]:
    """``class_prompts`` for every class, in class order (what the buyer sends to the vendor)."""
    return [class_prompts(c, templates) for c in class_names]


def ensemble(text_vectors_per_class: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """[C, D] float32 class text embeddings from per-class [T_c, D] template embeddings.

    Each template vector is normalised first (the vendor's already are; a local model's may not
    be), then averaged and the mean renormalised, as in CLIP's zero-shot recipe.
    """
    rows = []
    for c, vecs in enumerate(text_vectors_per_class):
        v = torch.as_tensor(vecs, dtype=torch.float32)
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[0] == 0:
            raise PromptError(f"class {c}: expected a [T, D] tensor with T >= 1, got shape {tuple(v.shape)}")
        rows.append(F.normalize(F.normalize(v, dim=-1).mean(0), dim=0))
    if not rows:
        raise PromptError("no classes to ensemble")
    if len({r.shape[0] for r in rows}) != 1:
        raise PromptError("classes have different embedding sizes")
    return torch.stack(rows)
