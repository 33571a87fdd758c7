"""`probabilities:K`: no embeddings at all, only top-k class probabilities (the strictest black box).

The key holder sends images with its own class names to `/v1/classifications`; the vendor
embeds the class prompts itself, scores logit_scale * cos, softmaxes over the classes and returns
the K most likely, rounded to `VENDOR_CLASSIFY_DECIMALS`. `/v1/embeddings` refuses such a key
before any charge. Every other key may classify too, but is scored on its own protected
embeddings (`ProtectionMode.scoring_rows`) and capped at `VENDOR_CLASSIFY_MAX_TOP_K` classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..errors import EmbeddingsNotPermitted
from .base import BaseMode, ProtectionContext, int_param, register

DEFAULT_TOP_K = 5
CLASS_PROMPT = "a photo of a {}."


@dataclass(frozen=True)
class Probabilities(BaseMode):
    name: ClassVar[str] = "probabilities"
    output: ClassVar[str] = "probabilities"  # type: ignore[misc]
    k: int = DEFAULT_TOP_K

    def param(self) -> str | None:
        return str(self.k)

    def top_k(self) -> int | None:
        return self.k

    async def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        raise EmbeddingsNotPermitted("this API key receives class probabilities only; use /v1/classifications")

    async def scoring_rows(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        """Scored clean: this mode protects by selling only K rounded probabilities."""
        return embeddings


@register("probabilities")
def _probabilities(param: str | None) -> Probabilities:
    return Probabilities(int_param("probabilities", param, DEFAULT_TOP_K, low=1, high=1000))


def class_prompts(classes: list[str]) -> list[str]:
    return [CLASS_PROMPT.format(name.strip()) for name in classes]


def top_k_probabilities(images: np.ndarray, classes: np.ndarray, logit_scale: float, k: int,
                        decimals: int | None = None) -> list[list[tuple[int, float]]]:
    """Per image, the k most likely (class index, probability), most likely first.

    `decimals` rounds every probability (None: full float precision). Why: exact probabilities
    are exact logit differences, logit_scale * e . (t_c - t_0), i.e. linear equations in the
    image embedding e; with enough of them (many classes, or many class lists on one image) e is
    solved for. Rounded probabilities give coarse inequalities instead, and classes below
    10^-decimals give nothing at all."""
    logits = logit_scale * (images.astype(np.float64) @ classes.astype(np.float64).T)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    if decimals is not None:
        probs = np.round(probs, decimals)
    return [[(int(c), float(probs[i, c])) for c in row] for i, row in enumerate(order)]
