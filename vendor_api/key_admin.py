"""Key administration: create, look up, list, top up, revoke and re-mode API keys, and read
their ledgers. What the admin routes and `vendor-admin` do; the request path (`metering.Meter`)
never calls any of it.

Numbers. Lua numbers are doubles: integers are exact only below 2^53. Every admin number is
checked against the ranges below before anything is written, so quota arithmetic, GCRA times
(microseconds on Redis' clock) and `HINCRBY` never overflow or round (`lua/admit.lua` refuses an
account record outside them). Administration writes are not idempotent, so none is retried
(`redis_calls`); a key created twice under one name is a `Conflict`.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import time

from shared.hashing import api_key_digest

from . import redis_client
from .accounts import API_KEY_PREFIX, NAMES_KEY, Account, AccountKeys
from .errors import Conflict, InvalidRequest, NotFound
from .lua_scripts import lua_source
from .redis_calls import fail_closed

# Ranges the Lua arithmetic handles exactly (doubles: integers exact below 2^53 ~ 9.0e15).
MAX_UNITS = 10**15            #: largest quota, and largest single top-up
MIN_RATE_PER_S = 0.001        #: one request per ~17 minutes; the GCRA interval stays <= 1e9 us
MAX_RATE_PER_S = 1_000_000.0
MAX_BURST = 1_000_000         #: burst x interval <= 1e15 us, so tat stays far below 2^53
IMPORTED_KEY = re.compile(re.escape(API_KEY_PREFIX) + r"[A-Za-z0-9_-]{32,256}")  #: drawn keys: 43 characters


class KeyAdmin:
    """Async façade over the account records, the name index and `lua/top_up.lua`."""

    def __init__(self, client: redis_client.RedisClient) -> None:
        self.redis = client
        self._top_up = client.register_script(lua_source("top_up.lua"))

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 2.0) -> "KeyAdmin":
        """One node or a Redis Cluster, like the meter (`vendor_api/redis_client.py`)."""
        return cls(redis_client.connect(url, timeout_s=timeout_s))

    async def close(self) -> None:
        await self.redis.aclose()

    @fail_closed
    async def create_key(
        self, name: str, *, quota: int, rate_per_s: float, burst: int, protection: str = "none",
        api_key: str | None = None,
    ) -> tuple[str, Account]:
        """Create an account; the plain key is returned once and never stored.

        `api_key` imports a key made elsewhere (a billing system's, or a study's that must meet
        the same per-key secrets on every run: `studies/attack_harness.py`) instead of drawing
        one; it must look like a drawn key, at least 32 URL-safe characters after the prefix,
        and belong to no other account."""
        quota, rate_per_s, burst = validate_account_fields(name, quota, rate_per_s, burst)
        if api_key is None:
            api_key = API_KEY_PREFIX + secrets.token_urlsafe(32)
        elif not IMPORTED_KEY.fullmatch(api_key):
            raise InvalidRequest(f"an imported key must be {API_KEY_PREFIX!r} and 32-256 URL-safe characters")
        digest = api_key_digest(api_key)
        if not await self.redis.hsetnx(NAMES_KEY, name, digest):
            raise Conflict(f"a key named {name!r} already exists")
        keys = AccountKeys(digest)
        fields = {"quota": quota, "spent": 0, "active": 1, "rate_per_s": repr(rate_per_s),
                  "burst": burst, "protection": protection, "created_at": time.time()}
        claimed = False  # only a record this call claimed may be undone: never another account's
        try:
            # the account's first field, atomically: a key already in use keeps its account
            claimed = bool(await self.redis.hsetnx(keys.account, "name", name))
            if not claimed:
                await self.redis.hdel(NAMES_KEY, name)
                raise Conflict("that API key already belongs to another account")
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(keys.account, mapping=fields)
                pipe.xadd(keys.ledger, {"event": "create", "units": quota})
                await pipe.execute()
        except Conflict:
            raise
        except BaseException:  # the name must not stay taken by an account that was never written
            await asyncio.shield(self._forget(name, keys.account, claimed=claimed))
            raise
        return api_key, await self.get_account(name)

    async def _forget(self, name: str, account: str, *, claimed: bool) -> None:
        """Undo a half-made account: its name, and its record if this call wrote it. When the
        claim's reply was lost, the record is ours only if it holds nothing but our name (a live
        account has every field): another account's record is never deleted."""
        await self.redis.hdel(NAMES_KEY, name)
        if not claimed:
            held = await self.redis.hget(account, "name")
            claimed = held is not None and held.decode() == name and await self.redis.hlen(account) == 1
        if claimed:
            await self.redis.delete(account)

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
