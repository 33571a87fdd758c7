"""IP-restriction modes: transforms applied to teacher outputs before they leave the server.

A registry keyed by mode name (`PROTECTION_MODES`); each account record names its mode spec
(`MODE[:PARAM]`, set by the vendor, never by the key holder). One module per mode family:
`transforms` (none, quantize, noise, truncate, rotate), `b4b`, `watermark`, `probabilities`;
the contract they implement is `base`, and what they may use per request is `context`.
Shared machinery: `lsh` (keyed noise as a function of the clean embedding's LSH cells, so inputs
the model sees alike get one answer), `overlap` (which keys asked for the same model inputs:
`vendor-admin suspects`), `attacks` (the extraction attacks the modes are measured against).
Every answer a key receives goes through its mode, class probabilities included
(`ProtectionMode.scoring_rows`).
"""

from __future__ import annotations

from . import b4b, probabilities, transforms, watermark  # noqa: F401  (registers the modes)
from .b4b import RedisBucketStore
from .base import PROTECTION_MODES, ProtectionMode, parse_protection, validate_protection
from .context import BucketStore, ProtectionContext
from .probabilities import top_k_probabilities
from .secret import resolve_protection_secret
from .teacher_record import read_teacher_dim, record_teacher_dim
from .watermark import WatermarkCalibration, WatermarkReport, compute_calibration, verify_watermark

__all__ = [
    "PROTECTION_MODES", "ProtectionContext", "ProtectionMode", "parse_protection", "validate_protection",
    "BucketStore", "RedisBucketStore", "top_k_probabilities", "resolve_protection_secret",
    "read_teacher_dim", "record_teacher_dim",
    "WatermarkCalibration", "WatermarkReport", "compute_calibration", "verify_watermark",
]
