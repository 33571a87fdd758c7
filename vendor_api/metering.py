"""The meter: API keys, quotas, rate limits, idempotency and the billing ledger, in Redis.

Every decision that moves units happens inside one Lua script (`lua/debit.lua`,
`lua/settle.lua`), so concurrent requests on any number of replicas can never overspend a quota
or charge one item twice. Each account's keys share a hash tag (`{digest}`), so every script
touches a single Redis Cluster slot.

Redis unreachable is `MeteringUnavailable` (503): the vendor fails closed and never serves an
unmetered answer.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from shared.hashing import api_key_digest

from shared.protocol import ErrorCode

from .errors import (
    AuthenticationFailed,
    Conflict,
    IdempotencyInFlight,
    IdempotencyMismatch,
    InsufficientQuota,
    InvalidRequest,
    MeteringUnavailable,
    NotFound,
    RateLimited,
)

T = TypeVar("T")
API_KEY_PREFIX = "vk-"
NAMES_KEY = "vendor:names"


def _script(name: str) -> str:
    return resources.files("vendor_api").joinpath("lua", name).read_text()


def fail_closed(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Any Redis connection/timeout problem becomes a 503, never an unmetered answer."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except ResponseError:
            raise
        except (RedisError, OSError) as exc:
            raise MeteringUnavailable(
                "metering is unavailable; no request is served unmetered, retry shortly",
                headers={"Retry-After": "1"},
            ) from exc

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
    def b4b_buckets(self) -> str:
        """SET of the LSH buckets this account's clean outputs fell in (b4b protection)."""
        return self._k("b4b")

    @property
    def no_idempotency(self) -> str:
        """A never-written key in the account's slot, for scripts called without idempotency."""
        return self._k("no-idempotency")

    def idempotency(self, idempotency_key: str) -> str:
        return self._k("idem:" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:32])


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
class Debit:
    """A successful debit: the request id to settle later and the numbers for headers."""

    request_id: str
    units: int
    remaining: int
    rate_remaining: int
    rate_limit: int
    rate_reset_s: float


@dataclass(frozen=True)
class Replay:
    """A finished answer stored under the same Idempotency-Key: served again, free."""

    body: bytes
    remaining: int


class Meter:
    """Async façade over the Lua scripts and the account records."""

    def __init__(self, client: aioredis.Redis, *, idempotency_ttl_s: int = 86400, inflight_lease_s: int = 300) -> None:
        self.redis = client
        self.idempotency_ttl_ms = idempotency_ttl_s * 1000
        self.inflight_lease_ms = inflight_lease_s * 1000
        self._debit = client.register_script(_script("debit.lua"))
        self._settle = client.register_script(_script("settle.lua"))

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 2.0, **kwargs: Any) -> "Meter":
        client = aioredis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=10
        )
        return cls(client, **kwargs)

    async def close(self) -> None:
        await self.redis.aclose()

    @fail_closed
    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    # ------------------------------------------------------------------ requests
    @fail_closed
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
    async def debit(
        self,
        account: Account,
        *,
        units: int,
        images: int,
        texts: int,
        fingerprint: str,
        idempotency_key: str | None,
    ) -> Debit | Replay:
        keys = AccountKeys(account.digest)
        request_id = uuid.uuid4().hex
        idem_redis_key = keys.idempotency(idempotency_key) if idempotency_key else keys.no_idempotency
        result = await self._debit(
            keys=[keys.account, keys.tat, keys.ledger, keys.inflight, keys.pending, idem_redis_key],
            args=[
                units, images, texts, request_id, "1" if idempotency_key else "0", fingerprint,
                self.idempotency_ttl_ms, self.inflight_lease_ms,
                hashlib.sha256(idempotency_key.encode()).hexdigest()[:32] if idempotency_key else "",
            ],
        )
        status = result[0].decode()
        return _DEBIT_OUTCOMES[status](request_id, units, result[1:])

    @fail_closed
    async def settle(
        self, account: Account, debit: Debit, *, delivered: bool, idempotency_key: str | None,
        body: bytes = b"", reason: str = "",
    ) -> int:
        """Close a debit: keep the answer for replay, or refund. Returns units remaining."""
        keys = AccountKeys(account.digest)
        result = await self._settle(
            keys=[keys.account, keys.ledger, keys.inflight, keys.pending,
                  keys.idempotency(idempotency_key) if idempotency_key else keys.no_idempotency],
            args=[debit.request_id, "delivered" if delivered else "failed", "1" if idempotency_key else "0",
                  body, self.idempotency_ttl_ms, reason or "inference_failed"],
        )
        return int(result[1])

    @fail_closed
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
        _validate_account_fields(name, quota, rate_per_s, burst)
        api_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        digest = api_key_digest(api_key)
        if not await self.redis.hsetnx(NAMES_KEY, name, digest):
            raise Conflict(f"a key named {name!r} already exists")
        keys = AccountKeys(digest)
        fields = {"name": name, "quota": quota, "spent": 0, "active": 1, "rate_per_s": rate_per_s,
                  "burst": burst, "protection": protection, "created_at": time.time()}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.account, mapping=fields)
            pipe.xadd(keys.ledger, {"event": "create", "units": quota})
            await pipe.execute()
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
        if units <= 0:
            raise InvalidRequest("top-up units must be a positive integer")
        keys = AccountKeys(await self._digest_of(name))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(keys.account, "quota", units)
            pipe.xadd(keys.ledger, {"event": "top_up", "units": units})
            await pipe.execute()
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


def _validate_account_fields(name: str, quota: int, rate_per_s: float, burst: int) -> None:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidRequest("key name must be 1-64 characters of letters, digits, '-', '_' or '.'")
    if quota < 0:
        raise InvalidRequest("quota must be >= 0")
    if rate_per_s <= 0:
        raise InvalidRequest("rate must be > 0 requests per second")
    if burst < 1:
        raise InvalidRequest("burst must be >= 1")


# ---------------------------------------------------------------- script outcomes
def _ok(request_id: str, units: int, rest: list[bytes]) -> Debit:
    remaining, rate_remaining, burst, reset_us = (int(x) for x in rest)
    return Debit(request_id, units, remaining, rate_remaining, burst, reset_us / 1e6)


def _replay(request_id: str, units: int, rest: list[bytes]) -> Replay:
    return Replay(body=rest[0], remaining=int(rest[1]))


def _rate_limited(request_id: str, units: int, rest: list[bytes]) -> Debit:
    wait_s = int(rest[0]) / 1e6
    raise RateLimited(
        f"rate limit reached; retry in {wait_s:.2f}s",
        headers={"Retry-After": str(max(1, int(wait_s + 0.999))), "X-Units-Remaining": rest[1].decode(),
                 "X-RateLimit-Limit-Requests": rest[2].decode(), "X-RateLimit-Remaining-Requests": "0",
                 "X-RateLimit-Reset-Requests": f"{wait_s:.3f}s"},
    )


def _insufficient(request_id: str, units: int, rest: list[bytes]) -> Debit:
    raise InsufficientQuota(
        f"this request costs {units} units but only {int(rest[0])} remain; top up to continue",
        headers={"X-Units-Remaining": rest[0].decode()},
    )


def _raise(exc_factory: Callable[[], Exception]) -> Callable[[str, int, list[bytes]], Debit]:
    def outcome(request_id: str, units: int, rest: list[bytes]) -> Debit:
        raise exc_factory()

    return outcome


_DEBIT_OUTCOMES: dict[str, Callable[[str, int, list[bytes]], Debit | Replay]] = {
    "ok": _ok,
    "replay": _replay,
    "rate_limited": _rate_limited,
    "insufficient": _insufficient,
    "unknown_key": _raise(lambda: AuthenticationFailed("invalid API key")),
    "revoked": _raise(lambda: AuthenticationFailed("this API key has been revoked", code=ErrorCode.KEY_REVOKED)),
    "idem_mismatch": _raise(lambda: IdempotencyMismatch(
        "this Idempotency-Key was used with a different request body; use a new key")),
    "idem_inflight": _raise(lambda: IdempotencyInFlight(
        "a request with this Idempotency-Key is still being processed; retry after it finishes",
        headers={"Retry-After": "1"})),
}
