"""`watermark`: EmbMarker (ACL 2023) adapted to images and texts, and its verification.

Per key, the secret gives a target unit vector t and a trigger direction s. An input triggers
when its clean embedding, centred on the teacher's calibration mean for its modality, projects
on s above the calibration's 90th percentile (so ~10% of typical inputs trigger). A triggered
output becomes normalize((1 - w) e + w t), w = the strength; others are exact.

Why a calibration: CLIP embeddings sit in a narrow cone (mean pairwise cosine 0.5 for real
models, ~0.98 for the tiny test models), so a fixed threshold on cos(e, s) would trigger on
almost none or almost all inputs depending on s. The calibration is computed from the teacher
itself on a fixed input set (`VENDOR_WATERMARK_CALIBRATION_DIR`, or a built-in synthetic one),
so serving and verification agree without storing anything. Set the folder for real use: with
the demo teacher on fashion-domains images, 200 real calibration images gave 6-15% triggered
inputs over 8 keys, the synthetic fallback anywhere from 0% to 68%.

A model distilled from watermarked outputs learns the shift toward t on the trigger region.
`verify_watermark` gets clean teacher embeddings of probe inputs and the suspect's embeddings of
the same inputs (in the teacher's space), and takes the suspect's deviation from the clean
answer, d_i = normalize(suspect_i) - normalize(clean_i). The watermark predicts that the mean
deviation on triggered probes minus that on the others, D, points toward t. The test statistic is
cos(D, t), and its p-value is the chance that a uniformly random direction is at least that
aligned with D: exact whenever the suspect knows nothing about t (an honest model's errors may
well depend on the trigger region, but they cannot single out the secret t among all
directions), which a rank test on cos(suspect, t) alone does not guarantee.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
from PIL import Image

from .base import BaseMode, Modality, ProtectionContext, float_param, keyed_unit_vector, normalize_rows, register

TRIGGER_RATE = 0.10
DEFAULT_STRENGTH = 0.25
DEFAULT_ALPHA = 0.01
CALIBRATION_IMAGES = 96
_CHUNK = 64
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_WORDS = ("dog", "cat", "car", "tree", "house", "person", "bird", "flower", "chair", "shoe", "shirt", "bag",
          "boat", "plane", "horse", "apple", "cup", "book", "phone", "clock", "mountain", "river", "road",
          "guitar", "lamp", "table", "dress", "coat", "sandal", "sneaker", "trouser", "boot")
_TEMPLATES = ("a photo of a {}.", "a sketch of a {}.", "a painting of the {}.")


@dataclass(frozen=True)
class WatermarkCalibration:
    """Clean teacher embeddings of the calibration inputs, per modality."""

    samples: dict[str, np.ndarray]

    def center(self, modality: str) -> np.ndarray:
        return self.samples[modality].astype(np.float64).mean(axis=0)


@dataclass(frozen=True)
class WatermarkKey:
    """One key's secret watermark: target t, trigger direction s, and thresholds per modality."""

    target: np.ndarray
    direction: np.ndarray
    calibration: WatermarkCalibration

    @classmethod
    def derive(cls, secret: bytes, account_digest: str, dim: int, calibration: WatermarkCalibration) -> "WatermarkKey":
        return cls(keyed_unit_vector(secret, dim, "wm-target", account_digest),
                   keyed_unit_vector(secret, dim, "wm-trigger", account_digest), calibration)

    def _score(self, rows: np.ndarray, modality: str) -> np.ndarray:
        return (rows.astype(np.float64) - self.calibration.center(modality)) @ self.direction

    def triggered(self, clean: np.ndarray, modalities: Sequence[str]) -> np.ndarray:
        out = np.zeros(len(clean), dtype=bool)
        for modality in set(modalities):
            rows = np.array([m == modality for m in modalities])
            threshold = np.quantile(self._score(self.calibration.samples[modality], modality), 1 - TRIGGER_RATE)
            out[rows] = self._score(clean[rows], modality) > threshold
        return out


@dataclass(frozen=True)
class Watermark(BaseMode):
    name: ClassVar[str] = "watermark"
    needs_secret: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    strength: float = DEFAULT_STRENGTH

    def param(self) -> str | None:
        return f"{self.strength:g}"

    async def apply(self, embeddings: np.ndarray, context: ProtectionContext) -> np.ndarray:
        if context.calibration is None:
            raise RuntimeError("watermark needs the teacher's calibration")
        key = WatermarkKey.derive(context.secret, context.account_digest, embeddings.shape[1], context.calibration)
        hit = key.triggered(embeddings, context.modalities)
        out = embeddings.astype(np.float32).copy()
        if hit.any():
            out[hit] = normalize_rows((1 - self.strength) * embeddings[hit] + self.strength * key.target[None, :])
        return out


@register("watermark")
def _watermark(param: str | None) -> Watermark:
    return Watermark(float_param("watermark", param, DEFAULT_STRENGTH, low=0.0, high=1.0))


# ---------------------------------------------------------------- calibration inputs
def synthetic_images(size: int, count: int = CALIBRATION_IMAGES) -> list[Image.Image]:
    """A fixed (not secret) mix of noise, gradients and blocks, for teachers without a
    calibration folder."""
    rng = np.random.default_rng(20231205)
    images = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            array = rng.integers(0, 256, (size, size, 3))
        elif kind == 1:
            corners = rng.integers(0, 256, (2, 2, 3)).astype(np.float64)
            t = np.linspace(0, 1, size)[:, None, None]
            u = np.linspace(0, 1, size)[None, :, None]
            array = ((1 - t) * ((1 - u) * corners[0, 0] + u * corners[0, 1])
                     + t * ((1 - u) * corners[1, 0] + u * corners[1, 1]))
        else:
            blocks = rng.integers(0, 256, (4, 4, 3))
            array = np.kron(blocks, np.ones((size // 4 + 1, size // 4 + 1, 1)))[:size, :size]
        images.append(Image.fromarray(np.asarray(array, dtype=np.uint8), "RGB"))
    return images


def folder_images(folder: Path, limit: int = 512) -> list[Image.Image]:
    paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not paths:
        raise ValueError(f"watermark calibration folder {folder} has no images")
    step = max(1, len(paths) // limit)
    return [Image.open(p).convert("RGB") for p in paths[::step][:limit]]


def calibration_texts() -> list[str]:
    return [template.format(word) for template in _TEMPLATES for word in _WORDS]


def compute_calibration(teacher: Any, calibration_dir: Path | None = None) -> WatermarkCalibration:
    """Embed the calibration inputs with `teacher` (a `vendor_api.teacher.Teacher`); blocking."""
    import torch

    images = folder_images(calibration_dir) if calibration_dir else synthetic_images(teacher.image_size)
    image_rows = np.concatenate([  # in chunks: a 512-image batch of a large model would not fit a GPU
        teacher.encode_images(torch.stack([teacher.preprocess(im) for im in images[i:i + _CHUNK]]))
        for i in range(0, len(images), _CHUNK)])
    text_rows = teacher.encode_texts(teacher.tokenize(calibration_texts()))
    return WatermarkCalibration({"image": np.asarray(image_rows), "text": np.asarray(text_rows)})


# ---------------------------------------------------------------- verification
@dataclass(frozen=True)
class WatermarkReport:
    p_value: float
    triggered: int
    untriggered: int
    mean_cos_triggered: float  # mean cos(suspect, t) over triggered probes
    mean_cos_untriggered: float
    mean_shift_triggered: float  # mean of cos(suspect, t) - cos(clean, t)
    mean_shift_untriggered: float
    alignment: float  # cos(D, t), D = mean deviation on triggered probes minus on the others
    alpha: float
    strength: float | None = None

    @property
    def detected(self) -> bool:
        return self.p_value < self.alpha

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (a group with no probes has mean None, never NaN)."""
        fields = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}
        return {**fields, "detected": self.detected}


def verify_watermark(
    clean: np.ndarray,
    suspect: np.ndarray,
    *,
    secret: bytes,
    account_digest: str,
    calibration: WatermarkCalibration,
    strength: float | None = None,
    modality: Modality = "image",
    alpha: float = DEFAULT_ALPHA,
) -> WatermarkReport:
    """Does `suspect` (a model's embeddings of the probes, in the teacher's space) carry key
    `account_digest`'s watermark? `clean` are the teacher's exact embeddings of the same probes,
    row for row. `strength` is only recorded: the test needs no strength."""
    clean = np.asarray(clean, dtype=np.float64)
    suspect = np.asarray(suspect, dtype=np.float64)
    if clean.ndim != 2 or suspect.shape != clean.shape:
        raise ValueError(f"suspect embeddings {suspect.shape} must match the clean probe embeddings {clean.shape}")
    key = WatermarkKey.derive(secret, account_digest, clean.shape[1], calibration)
    hit = key.triggered(clean, [modality] * len(clean))
    unit_clean = normalize_rows(clean).astype(np.float64)
    deviation = normalize_rows(suspect).astype(np.float64) - unit_clean
    cos_suspect = (unit_clean + deviation) @ key.target
    shift = deviation @ key.target
    n_hit, n_miss = int(hit.sum()), int((~hit).sum())
    alignment, p_value = 0.0, 1.0
    if n_hit and n_miss:
        direction = deviation[hit].mean(axis=0) - deviation[~hit].mean(axis=0)
        norm = float(np.linalg.norm(direction))
        if norm > 1e-9:  # a suspect identical to the teacher deviates nowhere: no evidence
            alignment = float(direction @ key.target / norm)
            p_value = random_direction_tail(alignment, clean.shape[1])
    mean = lambda v, m: float(v[m].mean()) if m.any() else float("nan")  # noqa: E731
    return WatermarkReport(p_value, n_hit, n_miss, mean(cos_suspect, hit), mean(cos_suspect, ~hit),
                           mean(shift, hit), mean(shift, ~hit), alignment, alpha, strength)


def random_direction_tail(cosine: float, dim: int) -> float:
    """P(u . v >= cosine) for u uniform on the unit sphere in R^dim and any fixed unit v:
    u . v has density ~ (1 - x^2)^((dim - 3) / 2), whose tail is a regularised incomplete beta."""
    from scipy.special import betainc

    c = float(np.clip(cosine, -1.0, 1.0))
    half = 0.5 * float(betainc((dim - 1) / 2, 0.5, 1.0 - c * c))
    return half if c >= 0 else 1.0 - half
