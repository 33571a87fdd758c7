"""Where an account lives in Redis, and what its record holds.

Each account's keys share a hash tag (`{digest}`, the digest of its API key), so every script
and transaction on one account touches a single Redis Cluster slot. The name index
(`NAMES_KEY`, name -> digest) is the one record outside any account's slot: only key
administration reads it, never the request path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

API_KEY_PREFIX = "vk-"
NAMES_KEY = "vendor:names"


@dataclass(frozen=True)
class AccountKeys:
    """Redis key names of one account; all carry the same `{digest}` hash tag."""

    digest: str

    def _k(self, suffix: str) -> str:
        return f"vendor:{{{self.digest}}}:{suffix}"

    @property
    def account(self) -> str:
        return self._k("acct")

    @property
    def tat(self) -> str:
        return self._k("tat")

    @property
    def ledger(self) -> str:
        return self._k("ledger")

    @property
    def inflight(self) -> str:
        return self._k("inflight")

    @property
    def pending(self) -> str:
        return self._k("pending")

    @property
    def idem_index(self) -> str:
        """ZSET of the stored answers ("idem digest|request id|bytes" -> expiry ms): the replay
        store's size bound (`lua/admit.lua`)."""
        return self._k("idem-index")

    @property
    def export_cursors(self) -> str:
        """HASH consumer -> id of the last ledger entry that consumer exported (`ledger_export`)."""
        return self._k("export")

    @property
    def b4b_buckets(self) -> str:
        """SET of the LSH buckets this account's clean outputs fell in (b4b protection)."""
        return self._k("b4b")

    @property
    def no_idempotency(self) -> str:
        """A never-written key in the account's slot, for scripts called without idempotency."""
        return self._k("no-idempotency")

    def class_lists(self, image_code: str) -> str:
        """SET of the class-list hashes this account asked of images with one perceptual code
        (`protection/class_lists.py`)."""
        return self._k("lists:" + image_code)

    def idempotency(self, idempotency_key: str) -> str:
        return self._k("idem:" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:32])

    def settled(self, request_id: str) -> str:
        """Short-lived marker of how a request was settled: makes settle exactly-once."""
        return self._k("settled:" + request_id)


@dataclass(frozen=True)
class Account:
    digest: str
    name: str
    quota: int
    spent: int
    active: bool
    rate_per_s: float
    burst: int
    protection: str
    created_at: float

    @property
    def remaining(self) -> int:
        return self.quota - self.spent

    @classmethod
    def from_hash(cls, digest: str, raw: dict[bytes, bytes]) -> "Account":
        get = lambda k, d="": raw.get(k.encode(), d.encode()).decode()  # noqa: E731
        return cls(
            digest=digest,
            name=get("name"),
            quota=int(get("quota", "0")),
            spent=int(get("spent", "0")),
            active=get("active", "0") == "1",
            rate_per_s=float(get("rate_per_s", "1")),
            burst=int(get("burst", "1")),
            protection=get("protection", "none"),
            created_at=float(get("created_at", "0")),
        )
