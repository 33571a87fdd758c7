"""Content hashes: cache keys, idempotency keys, request fingerprints, API key digests.

SHA-256 everywhere, with a field separator that cannot occur inside a field, so two different
tuples of parts can never produce the same digest by concatenation.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Union

Part = Union[str, bytes, int, float]


def digest_parts(parts: Iterable[Part]) -> str:
    """Hex SHA-256 over length-prefixed parts (unambiguous concatenation)."""
    hasher = hashlib.sha256()
    for part in parts:
        raw = part if isinstance(part, bytes) else str(part).encode("utf-8")
        hasher.update(len(raw).to_bytes(8, "big"))
        hasher.update(raw)
    return hasher.hexdigest()


def fingerprint_json(payload: Any) -> str:
    """A stable digest of a JSON-able payload (key order and whitespace do not matter)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def api_key_digest(api_key: str) -> str:
    """What the vendor stores instead of the key itself.

    Keys are 256-bit random tokens, so an unsalted SHA-256 is not brute-forceable and lets the
    server find an account by digest in one Redis lookup (no per-key salt scan, no timing leak).
    """
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()
