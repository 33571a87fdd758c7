"""`vendor-admin verify-watermark` and `trace-watermark`: clean probe embeddings from the teacher,
the suspect's from a file, and the statistical test of `vendor_api.protection.watermark`, for one
named key or for every key at a family-wise threshold (when the vendor does not know which leaked).

`WatermarkVerifier` holds what the test needs besides the key (teacher, calibration, secret), so
a caller that checks many suspects (the attack harness: about ten students per watermark key)
loads the teacher and embeds the calibration set once instead of once per check."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .accounts import Account
from .errors import InvalidRequest
from .key_admin import KeyAdmin
from .protection import WatermarkCalibration, compute_calibration, resolve_protection_secret, verify_watermark
from .protection.base import parse_protection
from .protection.watermark import DEFAULT_ALPHA, WatermarkReport, folder_images
from .settings import VendorSettings


def _load_suspect(path: Path) -> np.ndarray:
    if path.suffix != ".npy" or not path.is_file():
        raise InvalidRequest(f"--suspect must be an existing .npy file, got {path}")
    return np.load(path, allow_pickle=False)


@dataclass(frozen=True)
class WatermarkVerifier:
    """The vendor's side of the watermark test, loaded once: the teacher (for clean probe
    embeddings), its calibration (which fixes every key's trigger regions, so it must be the one
    the serving vendor computed: same teacher, same `watermark_calibration_dir`) and the secret."""

    teacher: Any  # a `vendor_api.teacher.Teacher`
    calibration: WatermarkCalibration
    secret: bytes

    @classmethod
    def load(cls, settings: VendorSettings) -> "WatermarkVerifier":
        """Load the teacher and embed the calibration inputs; blocking (seconds to minutes)."""
        from .runtime import load_teacher

        teacher = load_teacher(settings, show_progress=False)
        return cls(teacher, compute_calibration(teacher, settings.watermark_calibration_dir),
                   resolve_protection_secret(settings))

    def clean_embeddings(self, probe: Path) -> np.ndarray:
        """Clean teacher embeddings of the probe images (folder, sorted), or precomputed (.npz)."""
        if probe.suffix == ".npz":
            with np.load(probe, allow_pickle=False) as data:
                return np.asarray(data["clean"] if "clean" in data else data[data.files[0]])
        if not probe.is_dir():
            raise InvalidRequest(f"--probe must be a folder of images or an .npz, got {probe}")
        import torch

        teacher = self.teacher
        images = folder_images(probe, limit=10**9)
        rows = [teacher.encode_images(torch.stack([teacher.preprocess(im) for im in images[i:i + 64]]))
                for i in range(0, len(images), 64)]
        return np.concatenate(rows)

    def verify(self, account: Account, clean: np.ndarray, suspect: np.ndarray) -> WatermarkReport:
        """Does `suspect` (rows = the probes, in the teacher's space) carry `account`'s watermark?"""
        if suspect.shape != clean.shape:
            raise InvalidRequest(f"suspect embeddings {suspect.shape} do not match the probes' {clean.shape} "
                                 "(same rows, in the teacher's space)")
        strength = getattr(parse_protection(account.protection), "strength", None)
        return verify_watermark(clean, suspect, secret=self.secret, account_digest=account.digest,
                                calibration=self.calibration, strength=strength)


async def verify_key_watermark(
    keys: KeyAdmin, settings: VendorSettings, name: str, *, probe: Path, suspect: Path,
    verifier: WatermarkVerifier | None = None,
) -> WatermarkReport:
    """`vendor-admin verify-watermark NAME --probe P --suspect S`; pass `verifier` to reuse a
    loaded teacher and calibration across calls."""
    account = await keys.get_account(name)
    suspect_rows = _load_suspect(suspect)  # a bad file fails before the teacher is loaded
    if verifier is None:
        verifier = await asyncio.to_thread(WatermarkVerifier.load, settings)
    clean = await asyncio.to_thread(verifier.clean_embeddings, probe)
    return verifier.verify(account, clean, suspect_rows)


@dataclass(frozen=True)
class KeyVerdict:
    """One key's line in a trace: its report and whether it passes the family-wise threshold."""

    name: str
    protection: str
    report: WatermarkReport
    detected: bool

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "protection": self.protection, **self.report.to_json(), "detected": self.detected}


@dataclass(frozen=True)
class WatermarkTrace:
    """Which key's watermark a suspect carries, when the vendor does not know which key leaked.

    Testing N keys at alpha each would flag an innocent key with probability up to N * alpha (at
    0.001 and 1,000 keys, about one false accusation per suspect). Each key is therefore detected
    at p < alpha / N (Bonferroni): the chance that *any* key is flagged for a suspect that learnt
    none of them stays below alpha, whatever the dependence between the keys' tests."""

    alpha: float
    verdicts: tuple[KeyVerdict, ...]  # every key tested, smallest p-value first

    @property
    def threshold(self) -> float:
        return self.alpha / max(len(self.verdicts), 1)

    @property
    def detected(self) -> tuple[KeyVerdict, ...]:
        return tuple(v for v in self.verdicts if v.detected)

    def to_json(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "keys_tested": len(self.verdicts), "threshold": self.threshold,
                "detected": [v.name for v in self.detected], "keys": [v.to_json() for v in self.verdicts]}


async def trace_watermark(
    keys: KeyAdmin, settings: VendorSettings, *, probe: Path, suspect: Path, alpha: float = DEFAULT_ALPHA,
    verifier: WatermarkVerifier | None = None,
) -> WatermarkTrace:
    """`vendor-admin trace-watermark --probe P --suspect S`: test every key, revoked ones and keys
    whose mode is no longer `watermark` included (a key's watermark is fixed by its digest, and the
    answers it bought while watermarked keep it), and detect at the family-wise threshold."""
    if not 0.0 < alpha < 1.0:
        raise InvalidRequest(f"--alpha must be between 0 and 1, got {alpha}")
    suspect_rows = _load_suspect(suspect)
    accounts = await keys.list_accounts()
    if not accounts:
        raise InvalidRequest("there are no keys to test")
    if verifier is None:
        verifier = await asyncio.to_thread(WatermarkVerifier.load, settings)
    clean = await asyncio.to_thread(verifier.clean_embeddings, probe)
    threshold = alpha / len(accounts)
    reports = [(account, verifier.verify(account, clean, suspect_rows)) for account in accounts]
    verdicts = [KeyVerdict(a.name, a.protection, r, r.p_value < threshold) for a, r in reports]
    return WatermarkTrace(alpha, tuple(sorted(verdicts, key=lambda v: (v.report.p_value, v.name))))
