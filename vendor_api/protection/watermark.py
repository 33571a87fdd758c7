"""`watermark`: EmbMarker (ACL 2023) adapted to images and texts, and its verification.

Per key, the secret gives DIRECTIONS = 4 pairs (target unit vector t_r, trigger direction s_r),
as in WARDEN (ACL 2024). An input triggers direction r when its clean embedding, centred on the
teacher's calibration mean for its modality, projects on s_r above the calibration's
1 - 0.20 / 4 quantile (so ~18% of typical inputs trigger some direction). A triggered output
becomes normalize((1 - W k) e + W k mean(t_r)) over the k directions it triggers (W = the
strength); others are exact.

Why a calibration: CLIP embeddings sit in a narrow cone (mean pairwise cosine 0.5 for real
models, ~0.98 for the tiny test models), so a fixed threshold on cos(e, s) would trigger on
almost none or almost all inputs depending on s. The calibration is computed from the teacher
itself on a fixed input set (`VENDOR_WATERMARK_CALIBRATION_DIR`, or a built-in synthetic one),
so serving and verification agree without storing anything. Set the folder for real use: with
the demo teacher on fashion-domains images, 200 real calibration images gave 6-15% triggered
inputs over 8 keys, the synthetic fallback anywhere from 0% to 68%.

A model distilled from watermarked outputs learns the shift toward t_r on region r.
`verify_watermark` gets clean teacher embeddings of probe inputs and the suspect's embeddings of
the same inputs (in the teacher's space), and takes the suspect's deviation from the clean
answer, d_i = normalize(suspect_i) - normalize(clean_i). The watermark predicts that the mean
deviation on probes triggering r minus that on untriggered probes, D_r, points toward t_r. The
per-direction statistic is cos(D_r, t_r), its p-value the chance that a uniformly random
direction is at least that aligned with D_r: exact whenever the suspect knows nothing about the
t_r (an honest model's errors may well depend on the trigger regions, but they cannot single out
the secret targets among all directions). The directions' p-values are independent under that
null and are combined by Fisher's method; detection is at p < 0.001, so the false-positive rate
is 0.1% by construction (measured: 0 of 100 clean-fitted students, `tests/vendor/test_protection_watermark.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
from PIL import Image

from .base import BaseMode, float_param, keyed_unit_vector, normalize_rows, register
from .context import Calibration, Modality, ProtectionContext

TRIGGER_RATE = 0.20  # all directions together; measured choice, see WatermarkKey
DIRECTIONS = 4
DEFAULT_STRENGTH = 0.25
DEFAULT_ALPHA = 0.001  # exact test: the false-positive rate is alpha (measured in tests: 0 of 100)
CALIBRATION_IMAGES = 96
_CHUNK = 64
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_WORDS = ("dog", "cat", "car", "tree", "house", "person", "bird", "flower", "chair", "shoe", "shirt", "bag",
          "boat", "plane", "horse", "apple", "cup", "book", "phone", "clock", "mountain", "river", "road",
          "guitar", "lamp", "table", "dress", "coat", "sandal", "sneaker", "trouser", "boot")
_TEMPLATES = ("a photo of a {}.", "a sketch of a {}.", "a painting of the {}.")


@dataclass(frozen=True)
class WatermarkCalibration:
    """Clean teacher embeddings of the calibration inputs, per modality (the `context.Calibration`
    every calibrated mode and the overlap detector's near codes use)."""

    samples: dict[str, np.ndarray]

    def center(self, modality: str) -> np.ndarray:
        return self.samples[modality].astype(np.float64).mean(axis=0)


@dataclass(frozen=True)
class WatermarkKey:
    """One key's secret watermark: DIRECTIONS (target t_r, trigger direction s_r) pairs, and the
    calibration their thresholds come from.

    Why several (WARDEN, ACL 2024): one direction is one point of failure. Its trigger region may
    hold none of a suspect's probe inputs (a domain the calibration did not cover), the student may
    not have learnt that one shift, and CSE-style removal finds and projects out a single dominant
    direction. Each direction triggers on its own ~TRIGGER_RATE / DIRECTIONS of typical inputs (so
    the share of altered answers stays ~TRIGGER_RATE), and verification combines the independent
    evidence of every direction that has triggered probes (Fisher's method).

    Trigger share and strength are calibrated on the tiny test teacher (random-feature ridge
    students fitted to the sold outputs of 300 images, 300 probes, 20 keys): 1 direction at 10%:
    20/20 keys detected at p < 0.001, mean 1 - cos(clean, sold) 0.005; 4 directions at 10% in all:
    17/20 (too few triggered probes per direction); 4 at 20%: 20/20 (largest p 7.5e-06), 0.014."""

    targets: np.ndarray  # (DIRECTIONS, dim)
    directions: np.ndarray  # (DIRECTIONS, dim)
    calibration: Calibration

    @classmethod
    def derive(cls, secret: bytes, account_digest: str, dim: int, calibration: Calibration) -> "WatermarkKey":
        targets = [keyed_unit_vector(secret, dim, "wm-target", account_digest, str(r)) for r in range(DIRECTIONS)]
        triggers = [keyed_unit_vector(secret, dim, "wm-trigger", account_digest, str(r)) for r in range(DIRECTIONS)]
        return cls(np.stack(targets), np.stack(triggers), calibration)

    @property
    def target(self) -> np.ndarray:
        """The first target (kept for callers of the one-direction version)."""
        return self.targets[0]

    def _scores(self, rows: np.ndarray, modality: str) -> np.ndarray:
        return (rows.astype(np.float64) - self.calibration.center(modality)) @ self.directions.T

    def triggered_by_direction(self, clean: np.ndarray, modalities: Sequence[str]) -> np.ndarray:
        """(n, DIRECTIONS) booleans: which directions each clean row triggers."""
        out = np.zeros((len(clean), DIRECTIONS), dtype=bool)
        for modality in set(modalities):
            rows = np.array([m == modality for m in modalities])
            thresholds = np.quantile(self._scores(self.calibration.samples[modality], modality),
                                     1 - TRIGGER_RATE / DIRECTIONS, axis=0)
            out[rows] = self._scores(clean[rows], modality) > thresholds
        return out

    def triggered(self, clean: np.ndarray, modalities: Sequence[str]) -> np.ndarray:
        return self.triggered_by_direction(clean, modalities).any(axis=1)


@dataclass(frozen=True)
class Watermark(BaseMode):
    """normalize((1 - W k) e + W sum_r hit_r t_r), k = number of directions the input triggers."""

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
        hits = key.triggered_by_direction(embeddings, context.modalities)
        out = embeddings.astype(np.float32).copy()
        rows = hits.any(axis=1)
        if rows.any():
            h = hits[rows].astype(np.float64)
            weight = np.minimum(self.strength * h.sum(axis=1, keepdims=True), 1.0)
            shift = (h @ key.targets) / h.sum(axis=1, keepdims=True)  # mean target of the triggered directions
            out[rows] = normalize_rows((1 - weight) * embeddings[rows] + weight * shift)
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
    p_value: float  # Fisher's combination of the per-direction p-values (1.0: no evidence at all)
    triggered: int  # probes that trigger at least one direction
    untriggered: int
    mean_cos_triggered: float  # mean cos(suspect, t_r) over probes triggering direction r, averaged over r
    mean_cos_untriggered: float
    mean_shift_triggered: float  # the same for cos(suspect, t_r) - cos(clean, t_r)
    mean_shift_untriggered: float
    alignment: float  # mean over tested directions of cos(D_r, t_r)
    alpha: float
    strength: float | None = None
    directions_tested: int = 0  # directions with triggered and untriggered probes
    direction_p_values: tuple[float, ...] = ()

    @property
    def detected(self) -> bool:
        return self.p_value < self.alpha

    @property
    def inconclusive(self) -> bool:
        """No direction had triggered probes: the probes say nothing (pick probes that trigger)."""
        return self.directions_tested == 0

    def to_json(self) -> dict[str, Any]:
        """Plain JSON (a group with no probes has mean None, never NaN)."""
        fields = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in asdict(self).items()}
        fields["direction_p_values"] = list(self.direction_p_values)
        return {**fields, "detected": self.detected, "inconclusive": self.inconclusive}


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
    row for row. `strength` is only recorded: the test needs no strength.

    Per direction r: D_r = mean deviation (normalised suspect minus clean) on probes triggering r
    minus that on probes triggering nothing; p_r = P(a uniformly random direction is at least as
    aligned with D_r as t_r is). The t_r are independent secrets, so under "the suspect knows
    nothing of them" the p_r are independent uniforms, and -2 sum log p_r ~ chi2(2 R)."""
    from scipy.stats import chi2

    clean = np.asarray(clean, dtype=np.float64)
    suspect = np.asarray(suspect, dtype=np.float64)
    if clean.ndim != 2 or suspect.shape != clean.shape:
        raise ValueError(f"suspect embeddings {suspect.shape} must match the clean probe embeddings {clean.shape}")
    key = WatermarkKey.derive(secret, account_digest, clean.shape[1], calibration)
    hits = key.triggered_by_direction(clean, [modality] * len(clean))
    any_hit = hits.any(axis=1)
    unit_clean = normalize_rows(clean).astype(np.float64)
    deviation = normalize_rows(suspect).astype(np.float64) - unit_clean
    p_values, alignments, cos_hit, cos_miss, shift_hit, shift_miss = [], [], [], [], [], []
    for r in range(DIRECTIONS):
        hit, miss = hits[:, r], ~any_hit
        if not hit.any() or not miss.any():
            continue
        cos_suspect, shift = (unit_clean + deviation) @ key.targets[r], deviation @ key.targets[r]
        cos_hit.append(cos_suspect[hit].mean()), cos_miss.append(cos_suspect[miss].mean())
        shift_hit.append(shift[hit].mean()), shift_miss.append(shift[miss].mean())
        direction = deviation[hit].mean(axis=0) - deviation[miss].mean(axis=0)
        norm = float(np.linalg.norm(direction))
        alignment = float(direction @ key.targets[r] / norm) if norm > 1e-9 else 0.0
        alignments.append(alignment)
        # a suspect identical to the teacher deviates nowhere: p = 1, no evidence
        p_values.append(random_direction_tail(alignment, clean.shape[1]) if norm > 1e-9 else 1.0)
    p_value = float(chi2.sf(-2 * np.sum(np.log(np.maximum(p_values, 1e-300))), 2 * len(p_values))) if p_values else 1.0
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return WatermarkReport(p_value, int(any_hit.sum()), int((~any_hit).sum()), mean(cos_hit), mean(cos_miss),
                           mean(shift_hit), mean(shift_miss), mean(alignments) if alignments else 0.0, alpha,
                           strength, len(p_values), tuple(float(p) for p in p_values))


def random_direction_tail(cosine: float, dim: int) -> float:
    """P(u . v >= cosine) for u uniform on the unit sphere in R^dim and any fixed unit v:
    u . v has density ~ (1 - x^2)^((dim - 3) / 2), whose tail is a regularised incomplete beta."""
    from scipy.special import betainc

    c = float(np.clip(cosine, -1.0, 1.0))
    half = 0.5 * float(betainc((dim - 1) / 2, 0.5, 1.0 - c * c))
    return half if c >= 0 else 1.0 - half
