"""The vendor's protection secret: from `VENDOR_PROTECTION_SECRET`, else generated once and kept.

Every keyed transform (noise, rotate, b4b, watermark) is derived from it, so it must survive
restarts (else a key's rotation or noise would change under it) and be shared by replicas.
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from ..settings import VendorSettings

SECRET_FILE = "protection-secret"


def resolve_protection_secret(settings: VendorSettings) -> bytes:
    if settings.protection_secret is not None:
        return settings.protection_secret.get_secret_value().encode()
    return _persisted_secret(settings.data_dir / SECRET_FILE)


def _persisted_secret(path: Path) -> bytes:
    """Read the secret file, creating it (0600, exclusively: two racing starts agree) if absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    for _ in range(100):  # another process may have created it and not written it yet
        value = path.read_text().strip()
        if value:
            return value.encode()
        time.sleep(0.01)
    raise OSError(f"protection secret file {path} is empty; remove it or set VENDOR_PROTECTION_SECRET")
