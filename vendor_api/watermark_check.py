"""`vendor-admin verify-watermark`: clean probe embeddings from the teacher, the suspect's from a
file, and the statistical test of `vendor_api.protection.watermark` for one key's watermark."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from .errors import InvalidRequest
from .metering import Meter
from .protection import compute_calibration, resolve_protection_secret, verify_watermark
from .protection.base import parse_protection
from .protection.watermark import WatermarkReport, folder_images
from .settings import VendorSettings


def _load_suspect(path: Path) -> np.ndarray:
    if path.suffix != ".npy" or not path.is_file():
        raise InvalidRequest(f"--suspect must be an existing .npy file, got {path}")
    return np.load(path, allow_pickle=False)


def _clean_embeddings(probe: Path, teacher: object) -> np.ndarray:
    """Clean teacher embeddings of the probe images (folder, sorted), or precomputed (.npz)."""
    if probe.suffix == ".npz":
        with np.load(probe, allow_pickle=False) as data:
            return np.asarray(data["clean"] if "clean" in data else data[data.files[0]])
    if not probe.is_dir():
        raise InvalidRequest(f"--probe must be a folder of images or an .npz, got {probe}")
    import torch

    images = folder_images(probe, limit=10**9)
    rows = [teacher.encode_images(torch.stack([teacher.preprocess(im) for im in images[i:i + 64]]))  # type: ignore[attr-defined]
            for i in range(0, len(images), 64)]
    return np.concatenate(rows)


async def verify_key_watermark(
    meter: Meter, settings: VendorSettings, name: str, *, probe: Path, suspect: Path
) -> WatermarkReport:
    from .runtime import load_teacher

    account = await meter.get_account(name)
    mode = parse_protection(account.protection)
    strength = getattr(mode, "strength", None)
    suspect_rows = _load_suspect(suspect)
    teacher = await asyncio.to_thread(load_teacher, settings, show_progress=False)
    clean = await asyncio.to_thread(_clean_embeddings, probe, teacher)
    calibration = await asyncio.to_thread(compute_calibration, teacher, settings.watermark_calibration_dir)
    if suspect_rows.shape != clean.shape:
        raise InvalidRequest(f"suspect embeddings {suspect_rows.shape} do not match the probes' {clean.shape} "
                             "(same rows, in the teacher's space)")
    return verify_watermark(clean, suspect_rows, secret=resolve_protection_secret(settings),
                            account_digest=account.digest, calibration=calibration, strength=strength)
