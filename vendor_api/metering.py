"""The meter: the request path in Redis. Authenticate a key, admit a request (rate limit,
replay, balance), debit it, renew its lease while it runs and settle it (keep the answer, or
refund).

Every decision that moves units happens inside one Lua script (`lua/admit.lua`, `lua/debit.lua`,
`lua/settle.lua`), so concurrent requests on any number of replicas can never overspend a quota
or charge one item twice. Each account's keys share a hash tag (`accounts.AccountKeys`), so every
script touches a single Redis Cluster slot. Redis unreachable is `MeteringUnavailable` (503):
the vendor fails closed and never serves an unmetered answer; every script here is idempotent per
request id and retried once on a fresh connection (`redis_calls`).

Creating, topping up and revoking keys is key administration (`key_admin.KeyAdmin`), which the
request path never needs.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from shared.hashing import api_key_digest
from shared.protocol import ErrorCode

from . import redis_client
from .accounts import API_KEY_PREFIX, Account, AccountKeys
from .errors import (
    AccountMisconfigured,
    AuthenticationFailed,
    IdempotencyInFlight,
    IdempotencyMismatch,
    IdempotencyStoreFull,
    InsufficientQuota,
    RateLimited,
)
from .lua_scripts import REQUEST_PRELUDE, lua_source
from .redis_calls import fail_closed, retry_once


@dataclass(frozen=True)
class RateState:
    """The key's GCRA limiter after this request, for `X-RateLimit-*` and `RateLimit` headers."""

    remaining: int
    limit: int
    reset_s: float      #: until the bucket is full again
    window_s: float     #: time to refill a whole burst (the IETF policy window)


@dataclass(frozen=True)
class Admission:
    """A request allowed to do work: its rate-limit slot is spent and the balance covered its
    price when it was admitted (the exact debit still follows validation)."""

    remaining: int
    rate: RateState


@dataclass(frozen=True)
class Debit:
    """A successful debit: the request id to settle later and the numbers for headers."""

    request_id: str
    units: int
    remaining: int
    rate_remaining: int = 0
    rate_limit: int = 0
    rate_reset_s: float = 0.0
    rate_window_s: float = 0.0


@dataclass(frozen=True)
class Settlement:
    """What settle did. `redebited`: the lease had expired and been refunded, and the answer was
    paid for again; `lapsed`: it could not be, so the answer must not be delivered;
    `unknown`: nothing was pending (already settled or refunded)."""

    status: str
    remaining: int


@dataclass(frozen=True)
class Replay:
    """A finished answer stored under the same Idempotency-Key: served again, free."""

    body: bytes
    remaining: int


class Meter:
    """Async façade over the request scripts: what one paid request does in Redis."""

    def __init__(self, client: redis_client.RedisClient, *, idempotency_ttl_s: int = 86400, inflight_lease_s: int = 60,
                 idempotency_max_bytes: int = 1024**3) -> None:
        self.redis = client
        self.idempotency_ttl_ms = idempotency_ttl_s * 1000
        self.idempotency_max_bytes = idempotency_max_bytes
        self.inflight_lease_ms = inflight_lease_s * 1000
        self._admit = client.register_script(lua_source("admit.lua", prelude=REQUEST_PRELUDE))
        self._debit = client.register_script(lua_source("debit.lua", prelude=REQUEST_PRELUDE))
        self._settle = client.register_script(lua_source("settle.lua"))
        self._renew = client.register_script(lua_source("renew.lua"))

    @property
    def lease_s(self) -> float:
        return self.inflight_lease_ms / 1000

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 2.0, **kwargs: Any) -> "Meter":
        """One node or a Redis Cluster (`redis+cluster://...`), without blanket retries
        (`vendor_api/redis_client.py`)."""
        return cls(redis_client.connect(url, timeout_s=timeout_s), **kwargs)

    async def close(self) -> None:
        await self.redis.aclose()

    @fail_closed
    @retry_once
    async def ping(self) -> bool:
        return await redis_client.ping(self.redis)

    # ------------------------------------------------------------------ requests
    @fail_closed
    @retry_once
    async def authenticate(self, api_key: str) -> Account:
        """The account behind a bearer key, or 401. Revoked keys are 401 too."""
        if not api_key or not api_key.startswith(API_KEY_PREFIX) or len(api_key) > 128:
            raise AuthenticationFailed("invalid API key")
        digest = api_key_digest(api_key)
        raw = await self.redis.hgetall(AccountKeys(digest).account)
        if not raw:
            raise AuthenticationFailed("invalid API key")
        account = Account.from_hash(digest, raw)
        if not account.active:
            raise AuthenticationFailed("this API key has been revoked", code=ErrorCode.KEY_REVOKED)
        return account

    @fail_closed
    @retry_once
    async def admit(self, account: Account, *, units: int, fingerprint: str,
                    idempotency_key: str | None) -> Admission | Replay:
        """Before any real work: replay a finished answer, or spend the request's rate-limit slot
        and check that the balance covers `units` (402 and 429 raise). Writes nothing else.

        Retried once on a connection error: a lost reply can at worst have spent one rate slot."""
        keys = AccountKeys(account.digest)
        idem_redis_key = keys.idempotency(idempotency_key) if idempotency_key else keys.no_idempotency
        result = await self._admit(keys=[keys.account, keys.ledger, keys.inflight, keys.pending, idem_redis_key,
                                         keys.tat, keys.idem_index],
                                   args=[units, "1" if idempotency_key else "0", fingerprint,
                                         _idem_digest(idempotency_key), self.idempotency_max_bytes])
        return _ADMIT_OUTCOMES[result[0].decode()](units, result[1:])

    @fail_closed
    @retry_once
    async def debit(
        self,
        account: Account,
        *,
        units: int,
        images: int,
        texts: int,
        fingerprint: str,
        idempotency_key: str | None,
        request_id: str | None = None,
        rate: RateState | None = None,
    ) -> Debit | Replay:
        """The exact debit, after validation. The rate limit is `admit`'s job, so it is not spent
        twice. Idempotent per request id, hence safe to retry."""
        keys = AccountKeys(account.digest)
        request_id = request_id or uuid.uuid4().hex
        idem_redis_key = keys.idempotency(idempotency_key) if idempotency_key else keys.no_idempotency
        result = await self._debit(
            keys=[keys.account, keys.ledger, keys.inflight, keys.pending, idem_redis_key],
            args=[
                units, images, texts, request_id, "1" if idempotency_key else "0", fingerprint,
                self.idempotency_ttl_ms, self.inflight_lease_ms, _idem_digest(idempotency_key),
            ],
        )
        status = result[0].decode()
        outcome = _DEBIT_OUTCOMES[status](request_id, units, result[1:])
        if isinstance(outcome, Debit) and rate is not None:
            outcome = Debit(request_id, units, outcome.remaining, rate.remaining, rate.limit, rate.reset_s,
                            rate.window_s)
        return outcome

    @fail_closed
    @retry_once
    async def renew(self, account: Account, debit: Debit) -> bool:
        """Heartbeat: extend the debit's lease by a whole lease. False once it is settled or reaped."""
        keys = AccountKeys(account.digest)
        return bool(await self._renew(keys=[keys.inflight, keys.pending],
                                      args=[debit.request_id, self.inflight_lease_ms]))

    @fail_closed
    @retry_once
    async def settle(
        self, account: Account, debit: Debit, *, outcome: str, idempotency_key: str | None,
        body: bytes = b"", reason: str = "", fingerprint: str = "",
    ) -> Settlement:
        """Close a debit, exactly once: `delivered` (keep the answer for replay, or pay again for
        a lease that expired), `failed` (refund) or `void` (refund a delivered answer that never
        reached the client). See lua/settle.lua."""
        if outcome not in ("delivered", "failed", "void"):
            raise ValueError(f"unknown settle outcome {outcome!r}")
        keys = AccountKeys(account.digest)
        result = await self._settle(
            keys=[keys.account, keys.ledger, keys.inflight, keys.pending,
                  keys.idempotency(idempotency_key) if idempotency_key else keys.no_idempotency,
                  keys.settled(debit.request_id), keys.idem_index],
            args=[debit.request_id, outcome, "1" if idempotency_key else "0", body, self.idempotency_ttl_ms,
                  reason or "inference_failed", debit.units, self.inflight_lease_ms + 60_000,
                  _idem_digest(idempotency_key), fingerprint],
        )
        return Settlement(result[0].decode(), int(result[1]))

    @fail_closed
    @retry_once
    async def rate_state(self, account: Account) -> tuple[int, float]:
        """(requests left in the burst now, seconds until the bucket is full) for headers."""
        keys = AccountKeys(account.digest)
        raw_tat, now = await self.redis.get(keys.tat), await self.redis.time()
        now_us = now[0] * 1_000_000 + now[1]
        interval = 1_000_000 / account.rate_per_s
        tat = max(float(raw_tat or 0), now_us)
        remaining = int((now_us - (tat - account.burst * interval)) // interval)
        return max(0, min(account.burst, remaining)), (tat - now_us) / 1e6


def _idem_digest(idempotency_key: str | None) -> str:
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:32] if idempotency_key else ""


# ---------------------------------------------------------------- script outcomes
def rate_headers(rate: RateState) -> dict[str, str]:
    """OpenAI-style `X-RateLimit-*` and the IETF draft's `RateLimit-Policy` / `RateLimit`
    (draft-ietf-httpapi-ratelimit-headers: quota `q` requests per window `w` seconds; `r`
    remaining, `t` seconds until the quota is whole again). GCRA's burst is the quota, the time to
    refill a whole burst the window."""
    reset = max(0.0, rate.reset_s)
    return {
        "X-RateLimit-Limit-Requests": str(rate.limit),
        "X-RateLimit-Remaining-Requests": str(max(0, rate.remaining)),
        "X-RateLimit-Reset-Requests": f"{reset:.3f}s",
        "RateLimit-Policy": f'"burst";q={rate.limit};w={max(1, math.ceil(rate.window_s))}',
        "RateLimit": f'"burst";r={max(0, rate.remaining)};t={math.ceil(reset)}',
    }


def _rate(rest: list[bytes]) -> RateState:
    remaining, burst, reset_us, window_us = (int(x) for x in rest)
    return RateState(remaining, burst, reset_us / 1e6, window_us / 1e6)


def _admitted(units: int, rest: list[bytes]) -> Admission:
    return Admission(int(rest[0]), _rate(rest[1:]))


def _admit_replay(units: int, rest: list[bytes]) -> Replay:
    return Replay(body=rest[0], remaining=int(rest[1]))


def _admit_rate_limited(units: int, rest: list[bytes]) -> Admission:
    wait_s = int(rest[0]) / 1e6
    rate = RateState(0, int(rest[2]), int(rest[3]) / 1e6, int(rest[4]) / 1e6)
    raise RateLimited(
        f"rate limit reached; retry in {wait_s:.2f}s",
        headers={"Retry-After": str(max(1, int(wait_s + 0.999))), "X-Units-Remaining": rest[1].decode(),
                 **rate_headers(rate)},
    )


def _admit_store_full(units: int, rest: list[bytes]) -> Admission:
    wait_s = max(1, math.ceil(int(rest[0]) / 1000))
    raise IdempotencyStoreFull(
        f"this key's stored answers for Idempotency-Key replays are at their size bound; a request with a new "
        f"Idempotency-Key can run in {wait_s}s, when the oldest expires (requests without one run now); "
        "nothing was charged",
        headers={"Retry-After": str(wait_s), "X-Units-Remaining": rest[1].decode()},
    )


def _admit_insufficient(units: int, rest: list[bytes]) -> Admission:
    raise InsufficientQuota(
        f"this request costs {units} units but only {int(rest[0])} remain; top up to continue",
        headers={"X-Units-Remaining": rest[0].decode(), **rate_headers(_rate(rest[1:]))},
    )


def _ok(request_id: str, units: int, rest: list[bytes]) -> Debit:
    return Debit(request_id, units, int(rest[0]))


def _replay(request_id: str, units: int, rest: list[bytes]) -> Replay:
    return Replay(body=rest[0], remaining=int(rest[1]))


def _insufficient(request_id: str, units: int, rest: list[bytes]) -> Debit:
    raise InsufficientQuota(
        f"this request costs {units} units but only {int(rest[0])} remain; top up to continue",
        headers={"X-Units-Remaining": rest[0].decode()},
    )


def _raise(exc_factory: Callable[[], Exception]) -> Callable[[str, int, list[bytes]], Debit]:
    def outcome(request_id: str, units: int, rest: list[bytes]) -> Debit:
        raise exc_factory()

    return outcome


_ACCOUNT_INVALID = lambda: AccountMisconfigured(  # noqa: E731
    "this key's account record holds numbers the meter cannot use exactly; the vendor must fix it "
    "(nothing was charged)")
_IDEM_MISMATCH = lambda: IdempotencyMismatch(  # noqa: E731
    "this Idempotency-Key was used with a different request body; use a new key")
_IDEM_INFLIGHT = lambda: IdempotencyInFlight(  # noqa: E731
    "a request with this Idempotency-Key is still being processed; retry after it finishes",
    headers={"Retry-After": "1"})


def _refuse(exc_factory: Callable[[], Exception]) -> Callable[[int, list[bytes]], Admission]:
    def outcome(units: int, rest: list[bytes]) -> Admission:
        raise exc_factory()

    return outcome


_ADMIT_OUTCOMES: dict[str, Callable[[int, list[bytes]], Admission | Replay]] = {
    "ok": _admitted,
    "replay": _admit_replay,
    "rate_limited": _admit_rate_limited,
    "insufficient": _admit_insufficient,
    "unknown_key": _refuse(lambda: AuthenticationFailed("invalid API key")),
    "revoked": _refuse(lambda: AuthenticationFailed("this API key has been revoked", code=ErrorCode.KEY_REVOKED)),
    "account_invalid": _refuse(_ACCOUNT_INVALID),
    "idem_mismatch": _refuse(_IDEM_MISMATCH),
    "idem_inflight": _refuse(_IDEM_INFLIGHT),
    "idem_store_full": _admit_store_full,
}

_DEBIT_OUTCOMES: dict[str, Callable[[str, int, list[bytes]], Debit | Replay]] = {
    "ok": _ok,
    "replay": _replay,
    "insufficient": _insufficient,
    "account_invalid": _raise(_ACCOUNT_INVALID),
    "unknown_key": _raise(lambda: AuthenticationFailed("invalid API key")),
    "revoked": _raise(lambda: AuthenticationFailed("this API key has been revoked", code=ErrorCode.KEY_REVOKED)),
    "idem_mismatch": _raise(_IDEM_MISMATCH),
    "idem_inflight": _raise(_IDEM_INFLIGHT),
}
