"""Stateless per-row transforms: none, quantize, noise, truncate, rotate.

Each is a pure function of (secret, key digest, clean embedding): the same input, or any input
the model cannot tell apart from it, gives the same answer on every replica, after restarts and on
idempotent replays.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, ClassVar

import numpy as np

from ..errors import InvalidRequest
from .base import BaseMode, float_param, int_param, keyed_rng, no_param, normalize_rows, register
from .context import ProtectionContext
from .lsh import lsh_noise


@dataclass(frozen=True)
class NoProtection(BaseMode):
    """Exact, L2-normalised teacher embeddings."""

    name: ClassVar[str] = "none"

    async def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        return embeddings


@register("none")
def _none(param: str | None) -> NoProtection:
    no_param("none", param)
    return NoProtection()


# ---------------------------------------------------------------- quantize
def _fp16(rows: np.ndarray) -> np.ndarray:
    return rows.astype(np.float16).astype(np.float32)


def _int8(rows: np.ndarray) -> np.ndarray:
    """255 levels per dimension, scaled per vector by its largest component (a fixed [-1, 1]
    grid would round a 768-d unit vector, whose components are ~0.04, to almost nothing)."""
    scale = np.abs(rows).max(axis=1, keepdims=True)
    return np.round(rows / np.where(scale > 0, scale, 1.0) * 127.0)


def _binary(rows: np.ndarray) -> np.ndarray:
    return np.where(rows >= 0, 1.0, -1.0)


QUANTIZERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"fp16": _fp16, "int8": _int8, "binary": _binary}


@dataclass(frozen=True)
class Quantize(BaseMode):
    """Coarse outputs: dequantised then renormalised (int8: multiples of one per-vector step;
    binary: sign / sqrt(D))."""

    name: ClassVar[str] = "quantize"
    level: str = "int8"

    def param(self) -> str | None:
        return self.level

    async def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        return normalize_rows(QUANTIZERS[self.level](embeddings))


@register("quantize")
def _quantize(param: str | None) -> Quantize:
    if param not in QUANTIZERS:
        raise InvalidRequest(f"protection quantize:{param}: level must be one of {', '.join(QUANTIZERS)}")
    return Quantize(param)


# ---------------------------------------------------------------- noise
def keyed_lsh_noise(embeddings: np.ndarray, context: ProtectionContext, label: str) -> np.ndarray:
    """The key's noise rows for these clean rows (see `lsh`): needs the secret and calibration."""
    if context.calibration is None:
        raise RuntimeError(f"{label} noise needs the teacher's calibration (its LSH planes are centred on it)")
    return lsh_noise(embeddings, context.modalities, context.calibration.samples, secret=context.secret,
                     label=label, digest=context.account_digest)


@dataclass(frozen=True)
class Noise(BaseMode):
    """normalize(e + sigma * z), z ~ N(0, I/D) fixed by (secret, key, LSH cells of e): sigma is
    the noise's expected norm relative to the unit embedding, whatever the dimension
    (cos(clean, noisy) ~ 1 / sqrt(1 + sigma^2)). Re-encoding an image or re-spelling a text the
    model sees identically returns the identical answer, so averaging them gains nothing."""

    name: ClassVar[str] = "noise"
    needs_secret: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    sigma: float = 0.05

    def param(self) -> str | None:
        return f"{self.sigma:g}"

    async def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        return normalize_rows(embeddings + self.sigma * keyed_lsh_noise(embeddings, context, "noise"))


@register("noise")
def _noise(param: str | None) -> Noise:
    if param is None:
        raise InvalidRequest("protection mode 'noise' needs a scale: noise:SIGMA (e.g. noise:0.05)")
    return Noise(float_param("noise", param, 0.05, low=0.0, high=100.0))


# ---------------------------------------------------------------- truncate
@dataclass(frozen=True)
class Truncate(BaseMode):
    """Only the first D dimensions, renormalised."""

    name: ClassVar[str] = "truncate"
    dims: int = 128

    def param(self) -> str | None:
        return str(self.dims)

    def output_dim(self, teacher_dim: int) -> int:
        if self.dims >= teacher_dim:
            raise ValueError(f"truncate keeps D < {teacher_dim} dimensions (the teacher's), got {self.dims}")
        return self.dims

    async def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        self.output_dim(embeddings.shape[1])
        return normalize_rows(embeddings[:, : self.dims])


@register("truncate")
def _truncate(param: str | None) -> Truncate:
    return Truncate(int_param("truncate", param, None, low=1, high=1_000_000))


# ---------------------------------------------------------------- rotate
@lru_cache(maxsize=128)
def rotation_matrix(secret: bytes, digest: str, dim: int, pad: int) -> np.ndarray:
    """A per-key random isometry R^dim -> R^(dim+pad): orthonormal columns of a Gaussian QR,
    rows shuffled. Inner products (hence every cosine between a key's own image and text
    outputs) are preserved exactly, while the pad extra coordinates mix into all others so the
    key's space is a secret (dim+pad)-d frame that no other key shares."""
    rng = keyed_rng(secret, "rotate", digest, str(dim), str(pad))
    q, r = np.linalg.qr(rng.standard_normal((dim + pad, dim)))
    q = q * np.sign(np.diag(r))[None, :]
    return q[rng.permutation(dim + pad)]


@dataclass(frozen=True)
class Rotate(BaseMode):
    """A per-key secret isometry with shuffle and padding, optionally after keyed noise
    (`rotate:PAD,SIGMA`, the noise of `noise:SIGMA` under the label `rotate`).

    What it stops: outputs of several keys cannot be combined coordinate by coordinate, and a
    student distilled through one key lives in that key's frame. What it does not stop: keys that
    share queries can be aligned (orthogonal Procrustes on ~100 shared inputs aligns two noiseless
    keys at cosine 1.0), which is why the vendor watches for shared queries (`overlap`); noise
    keyed per key makes each key's copy of a shared input differ, so aligning keys then leaves
    the noise in."""

    name: ClassVar[str] = "rotate"
    needs_secret: ClassVar[bool] = True
    pad: int = 16
    sigma: float = 0.0

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        return self.sigma > 0

    def param(self) -> str | None:
        return str(self.pad) if self.sigma == 0 else f"{self.pad},{self.sigma:g}"

    def output_dim(self, teacher_dim: int) -> int:
        return teacher_dim + self.pad

    async def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        if self.sigma > 0:
            embeddings = normalize_rows(embeddings + self.sigma * keyed_lsh_noise(embeddings, context, "rotate"))
        matrix = rotation_matrix(context.secret, context.account_digest, embeddings.shape[1], self.pad)
        return normalize_rows(embeddings.astype(np.float64) @ matrix.T)


@register("rotate")
def _rotate(param: str | None) -> Rotate:
    """`rotate`, `rotate:PAD` or `rotate:PAD,SIGMA`."""
    pad_text, _, sigma_text = (param or "").partition(",")
    pad = int_param("rotate", pad_text.strip() or None, 16, low=0, high=4096)
    if not sigma_text.strip():
        if "," in (param or ""):
            raise InvalidRequest(f"protection rotate:{param}: give the noise after the comma, e.g. rotate:16,0.1")
        return Rotate(pad)
    return Rotate(pad, float_param("rotate", sigma_text.strip(), 0.0, low=0.0, high=100.0))
