"""The protection sweep's local vendor: its secret and watermark-calibration images, made once per
sweep folder, and its API keys, kept so that a resumed sweep meets the same vendor state (the same
noise, rotations, watermark and per-key caches)."""

from __future__ import annotations

import json
import os
import secrets
import uuid
from pathlib import Path
from typing import Any

from client_distiller.buying.local_vendor import LocalVendor
from client_distiller.data import OFFLINE_BENCHMARK
from client_distiller.errors import UsageError


class KeyBookError(UsageError):
    """A sweep folder's saved key was made for another protection mode than the one now asked."""


class KeyBook:
    """The sweep's API keys, kept in `OUT/keys.json` (mode 0600) because the vendor shows a key
    once: a resumed sweep must use the same keys (per-key transforms and cache scopes)."""

    def __init__(self, path: Path, vendor: LocalVendor) -> None:
        self.path = path
        self.vendor = vendor
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self.data.setdefault("tag", uuid.uuid4().hex[:6])  # unique names even in a reused vendor folder
        self.data.setdefault("keys", {})

    def name(self, label: str) -> str:
        return f"x{self.data['tag']}-{label}"

    def get(self, label: str, *, quota: int, protection: str) -> tuple[str, str]:
        """(key name, API key) for ``label`` with at least ``quota`` units in all: created with
        ``protection`` on first use, topped up when a resumed sweep adds a larger budget."""
        name = self.name(label)
        entry = self.data["keys"].get(name)
        if entry is None:
            key = self.vendor.create_key(name, quota, protection=protection, rate_per_s=1000.0, burst=1000)
            entry = {"key": key, "protection": protection, "quota": quota}
            self.data["keys"][name] = entry
            self._save()
        elif entry["protection"] != protection:
            raise KeyBookError(f"{self.path}: key {name} was made for {entry['protection']!r}, not {protection!r}")
        elif entry["quota"] < quota:
            self.vendor.admin("top-up", name, str(quota - entry["quota"]))
            entry["quota"] = quota
            self._save()
        return name, entry["key"]

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def vendor_secrets(out: Path) -> dict[str, str]:
    """The local vendor's protection secret, made once per sweep folder (a resumed sweep must see
    the same noise, rotations and watermark); never a constant in code."""
    path = out / "vendor-secret"
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return {"VENDOR_PROTECTION_SECRET": path.read_text().strip(),
            "VENDOR_WATERMARK_CALIBRATION_DIR": str(vendor_calibration_images(out))}


def vendor_calibration_images(out: Path) -> Path:
    """Images from the vendor's *own* split of the offline benchmark (never the client's), for the
    watermark's trigger calibration: on real images ~10% of inputs trigger, while the vendor's
    synthetic fallback triggers anywhere from 0% to 68% of fashion images."""
    from offline_data import ensure_benchmark

    return ensure_benchmark(OFFLINE_BENCHMARK, out / "vendor-calibration", split="vendor", size="tiny")
