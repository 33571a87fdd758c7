"""`probabilities:K`: no embeddings at all, only top-k class probabilities (the strictest black box).

The key holder sends images with its own class names to `/v1/classifications`; the vendor
embeds the class prompts itself, scores logit_scale * cos, softmaxes over the classes and returns
the K most likely, rounded to `VENDOR_CLASSIFY_DECIMALS`. `/v1/embeddings` refuses such a key
before any charge. Every other key may classify too, but is scored on its own protected
embeddings (`ProtectionMode.scoring_rows`) and capped at `VENDOR_CLASSIFY_MAX_TOP_K` classes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from shared.protocol import OUTPUT_PROBABILITIES, OutputKind

from ..errors import EmbeddingsNotPermitted, InvalidRequest
from .base import BaseMode, float_param, int_param, normalize_rows, register
from .context import ProtectionContext

DEFAULT_TOP_K = 5
CLASS_PROMPT = "a photo of a {}."


@dataclass(frozen=True)
class Probabilities(BaseMode):
    """`probabilities:K[,SIGMA]`: at most K rounded probabilities per image, scored on the image's
    clean embedding or, with SIGMA, on normalize(e + SIGMA z) with the LSH-keyed noise of
    `noise:SIGMA` (label `probabilities`). Why noise here too: the probabilities of many class
    lists on one image are linear equations in its embedding (`attacks.invert_probabilities`);
    noise keyed on the clean embedding's LSH cells is the same for every re-encoding and every
    class list of that image, so asking again pins down the noisy embedding, never the clean one."""

    name: ClassVar[str] = "probabilities"
    output: ClassVar[OutputKind] = OUTPUT_PROBABILITIES
    k: int = DEFAULT_TOP_K
    sigma: float = 0.0

    @property
    def needs_secret(self) -> bool:  # type: ignore[override]
        return self.sigma > 0

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.sigma > 0

    def param(self) -> str | None:
        return str(self.k) if self.sigma == 0 else f"{self.k},{self.sigma:g}"

    def top_k(self) -> int | None:
        return self.k

    async def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        raise EmbeddingsNotPermitted("this API key receives class probabilities only; use /v1/classifications")

    async def scoring_rows(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        """Images scored clean, or with the keyed noise when SIGMA > 0; class prompts always clean
        (they are the caller's question, not the product)."""
        if self.sigma == 0:
            return embeddings
        from .transforms import keyed_lsh_noise  # transforms imports nothing from here; avoids a cycle

        images = np.array([m == "image" for m in context.modalities], dtype=bool)
        out = embeddings.astype(np.float32).copy()
        if images.any():
            rows = embeddings[images]
            image_context = replace(context, modalities=["image"] * len(rows))
            out[images] = normalize_rows(rows + self.sigma * keyed_lsh_noise(rows, image_context, "probabilities"))
        return out


@register("probabilities")
def _probabilities(param: str | None) -> Probabilities:
    """`probabilities`, `probabilities:K` or `probabilities:K,SIGMA`."""
    k_text, comma, sigma_text = (param or "").partition(",")
    k = int_param("probabilities", k_text.strip() or None, DEFAULT_TOP_K, low=1, high=1000)
    if not comma:
        return Probabilities(k)
    if not sigma_text.strip():
        raise InvalidRequest(f"protection probabilities:{param}: give the noise after the comma, e.g. probabilities:5,0.3")
    return Probabilities(k, float_param("probabilities", sigma_text.strip(), 0.0, low=0.0, high=100.0))


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
