"""What a protection mode may use for one request, typed by what the modes need of it.

Why its own module, with Protocols: the contract (`base`) and every mode import this, and this
imports no mode. The concrete store (`b4b.RedisBucketStore`) and calibration
(`watermark.WatermarkCalibration`) satisfy the Protocols below structurally, so the contract never
depends on the modes that are built on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

Modality = Literal["image", "text"]


class BucketStore(Protocol):
    """Which LSH buckets each key's clean outputs fell in (b4b coverage), shared by replicas."""

    async def add(self, digest: str, buckets: list[int]) -> int:
        """Record buckets for a key; returns how many distinct buckets it has now."""

    async def count(self, digest: str) -> int: ...


class Calibration(Protocol):
    """Clean teacher embeddings of a fixed input set, per modality: what keyed LSH planes and
    watermark triggers are centred and thresholded on (CLIP embeddings sit in a narrow cone)."""

    @property
    def samples(self) -> dict[str, np.ndarray]: ...

    def center(self, modality: str) -> np.ndarray: ...


@dataclass(frozen=True)
class ProtectionContext:
    """What a mode may use for one request.

    `input_hashes` are request-byte hashes (computed only for modes that ask; no mode does since
    keyed noise moved to the clean embedding's LSH, see `lsh`); `modalities` says which tower each
    row came from (noise and watermark are calibrated per modality); `secret` is the vendor's
    protection secret. The service fills `secret` and `calibration` only for a mode that declares
    it needs them (`needs_secret`, `needs_calibration`), so a vendor selling only `none` never
    derives either.
    """

    account_digest: str
    input_hashes: list[str]
    secret: bytes = b""
    modalities: list[Modality] = field(default_factory=list)
    store: BucketStore | None = None
    calibration: Calibration | None = None
