"""The meter: API keys, quotas, rate limits, idempotency and the billing ledger, in Redis.

Every decision that moves units happens inside one Lua script (`lua/debit.lua`,
`lua/settle.lua`), so concurrent requests on any number of replicas can never overspend a quota
or charge one item twice. Each account's keys share a hash tag (`{digest}`), so every script
touches a single Redis Cluster slot.

Redis unreachable is `MeteringUnavailable` (503): the vendor fails closed and never serves an
unmetered answer.

Retries. redis-py's default retries any command on a connection error or timeout, which would
re-run a debit whose reply was merely lost. The client is built without blanket retries; instead
every script is idempotent per request id (debit, settle, renew) and is retried once on a fresh
connection, as are plain reads, so a pool of connections left stale by a Redis restart costs no
request a 503. Writes that are not idempotent (top-up, key creation) are never retried.

Numbers. Lua numbers are doubles: integers are exact only below 2^53. Every admin number is
checked against the ranges below before anything is written, so quota arithmetic, GCRA times
(microseconds on Redis' clock) and `HINCRBY` never overflow or round.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, Awaitable, Callable, TypeVar

from redis.exceptions import ClusterDownError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.hashing import api_key_digest

from shared.protocol import ErrorCode

from . import redis_client
from .errors import (
    AccountMisconfigured,
    AuthenticationFailed,
    Conflict,
    IdempotencyInFlight,
    IdempotencyMismatch,
    IdempotencyStoreFull,
    InsufficientQuota,
    InvalidRequest,
    MeteringUnavailable,
    NotFound,
    RateLimited,
)

T = TypeVar("T")
API_KEY_PREFIX = "vk-"
NAMES_KEY = "vendor:names"

# Ranges the Lua arithmetic handles exactly (doubles: integers exact below 2^53 ~ 9.0e15).
MAX_UNITS = 10**15            #: largest quota, and largest single top-up
MIN_RATE_PER_S = 0.001        #: one request per ~17 minutes; the GCRA interval stays <= 1e9 us
MAX_RATE_PER_S = 1_000_000.0
MAX_BURST = 1_000_000         #: burst x interval <= 1e15 us, so tat stays far below 2^53


def _script(name: str) -> str:
    return resources.files("vendor_api").joinpath("lua", name).read_text()


def fail_closed(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Any Redis connection/timeout problem becomes a 503, never an unmetered answer.

    On a Redis Cluster that includes the cluster saying it cannot serve the slot right now
    (CLUSTERDOWN, TRYAGAIN during a resharding, a slot no node covers): each is refused before
    the command runs, so nothing was written."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except (ClusterDownError, TryAgainError, RedisClusterException) as exc:
            raise MeteringUnavailable(
                "metering is unavailable; no request is served unmetered, retry shortly",
                headers={"Retry-After": "1"},
            ) from exc
        except ResponseError:
            raise
        except (RedisError, OSError) as exc:
            raise MeteringUnavailable(
                "metering is unavailable; no request is served unmetered, retry shortly",
                headers={"Retry-After": "1"},
            ) from exc

    return wrapper


def retry_once(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Run an *idempotent* Redis operation again, once, on a fresh connection after a
    connection error or timeout: the first attempt may have met a connection that a Redis
    restart left stale. Only for reads and for the scripts that are idempotent per request id."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError):
            return await fn(*args, **kwargs)

    return wrapper


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
    """Async façade over the Lua scripts and the account records."""

    def __init__(self, client: redis_client.RedisClient, *, idempotency_ttl_s: int = 86400, inflight_lease_s: int = 60,
                 idempotency_max_bytes: int = 1024**3) -> None:
        self.redis = client
        self.idempotency_ttl_ms = idempotency_ttl_s * 1000
        self.idempotency_max_bytes = idempotency_max_bytes
        self.inflight_lease_ms = inflight_lease_s * 1000
        self._admit = client.register_script(_script("admit.lua"))
        self._debit = client.register_script(_script("debit.lua"))
        self._settle = client.register_script(_script("settle.lua"))
        self._renew = client.register_script(_script("renew.lua"))
        self._top_up = client.register_script(_script("top_up.lua"))

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
        result = await self._admit(keys=[keys.account, keys.tat, idem_redis_key, keys.ledger, keys.inflight,
                                         keys.pending, keys.idem_index],
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

    # ------------------------------------------------------------------ administration
    @fail_closed
    async def create_key(
        self, name: str, *, quota: int, rate_per_s: float, burst: int, protection: str = "none"
    ) -> tuple[str, Account]:
        """Create an account; the plain key is returned once and never stored."""
        quota, rate_per_s, burst = validate_account_fields(name, quota, rate_per_s, burst)
        api_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        digest = api_key_digest(api_key)
        if not await self.redis.hsetnx(NAMES_KEY, name, digest):
            raise Conflict(f"a key named {name!r} already exists")
        keys = AccountKeys(digest)
        fields = {"name": name, "quota": quota, "spent": 0, "active": 1, "rate_per_s": repr(rate_per_s),
                  "burst": burst, "protection": protection, "created_at": time.time()}
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.account, mapping=fields)
                pipe.xadd(keys.ledger, {"event": "create", "units": quota})
                await pipe.execute()
        except BaseException:  # the name must not stay taken by an account that was never written
            await asyncio.shield(self.redis.hdel(NAMES_KEY, name))
            raise
        return api_key, await self.get_account(name)

    @fail_closed
    async def _digest_of(self, name: str) -> str:
        digest = await self.redis.hget(NAMES_KEY, name)
        if digest is None:
            raise NotFound(f"no key named {name!r}")
        return digest.decode()

    @fail_closed
    async def get_account(self, name: str) -> Account:
        digest = await self._digest_of(name)
        raw = await self.redis.hgetall(AccountKeys(digest).account)
        if not raw:
            raise NotFound(f"key {name!r} has no account record")
        return Account.from_hash(digest, raw)

    @fail_closed
    async def list_accounts(self) -> list[Account]:
        names = await self.redis.hgetall(NAMES_KEY)
        accounts = []
        for digest in sorted(d.decode() for d in names.values()):
            raw = await self.redis.hgetall(AccountKeys(digest).account)
            if raw:
                accounts.append(Account.from_hash(digest, raw))
        return sorted(accounts, key=lambda a: a.name)

    @fail_closed
    async def top_up(self, name: str, units: int) -> Account:
        """Add units; the check that the new quota stays exact and the write are one script."""
        units = _check_int("top-up units", units, 1, MAX_UNITS)
        keys = AccountKeys(await self._digest_of(name))
        status, *rest = await self._top_up(keys=[keys.account, keys.ledger], args=[units, MAX_UNITS])
        if status == b"unknown_key":
            raise NotFound(f"key {name!r} has no account record")
        if status == b"too_large":
            raise InvalidRequest(f"top-up of {units} would take the quota of {name!r} from {int(rest[0])} past "
                                 f"the largest allowed, {MAX_UNITS}", param="units")
        return await self.get_account(name)

    @fail_closed
    async def revoke(self, name: str) -> Account:
        keys = AccountKeys(await self._digest_of(name))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.account, "active", 0)
            pipe.xadd(keys.ledger, {"event": "revoke", "units": 0})
            await pipe.execute()
        return await self.get_account(name)

    @fail_closed
    async def set_protection(self, name: str, protection: str) -> Account:
        keys = AccountKeys(await self._digest_of(name))
        await self.redis.hset(keys.account, "protection", protection)
        return await self.get_account(name)

    @fail_closed
    async def ledger(self, name: str, count: int | None = None) -> list[dict[str, str]]:
        """The account's billing events, oldest first."""
        keys = AccountKeys(await self._digest_of(name))
        entries = await self.redis.xrange(keys.ledger, count=count)
        return [{"id": eid.decode(), **{k.decode(): v.decode() for k, v in fields.items()}} for eid, fields in entries]


def _check_int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{what} must be a whole number from {low} to {high}; got {value!r}",
                             param=what.split()[0])
    return value


def validate_account_fields(name: str, quota: object, rate_per_s: object, burst: object) -> tuple[int, float, int]:
    """One clear error for any admin number the Lua arithmetic could not handle exactly."""
    if not name or len(name) > 64 or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
        raise InvalidRequest("key name must be 1-64 characters of letters, digits, '-', '_' or '.'", param="name")
    quota = _check_int("quota", quota, 0, MAX_UNITS)
    burst = _check_int("burst", burst, 1, MAX_BURST)
    if isinstance(rate_per_s, bool) or not isinstance(rate_per_s, (int, float)) or not math.isfinite(rate_per_s) \
            or not MIN_RATE_PER_S <= rate_per_s <= MAX_RATE_PER_S:
        raise InvalidRequest(f"rate must be from {MIN_RATE_PER_S} to {MAX_RATE_PER_S:.0f} requests per second; "
                             f"got {rate_per_s!r}", param="rate_per_s")
    return quota, float(rate_per_s), burst


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
