"""Rate-limits failed authentication per client address, so API keys cannot be guessed.

A key is 32 random bytes, so guessing is hopeless anyway; the guard exists so that a guesser (or a
misconfigured client hammering with a revoked key) costs the vendor one Redis round trip per
attempt and nothing else, and shows up as 429s instead of an unbounded stream of 401s. Why per address
and not per key: a guesser has no key; the only thing the attempts share is where they come from.

The counter lives in Redis (`vendor:authfail:{address}`, a fixed window: the first failure starts
it, `auth_failure_window_s` later it is forgotten), so every replica behind a load balancer sees
the same count. Once an address has `auth_max_failures` failures in its window, every further
request from it gets 429 with `Retry-After` until the window ends, whether its key is valid or
not, without the key ever being looked up: no account is touched. Redis unreachable fails closed
(503), as every other metered decision does.

The address is `request.client.host`. Behind a load balancer, set `FORWARDED_ALLOW_IPS` (read by
uvicorn) to the balancer's address so that uvicorn takes the client's address from
`X-Forwarded-For`; otherwise every client shares the balancer's address, and one guesser would
lock everybody out.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from starlette.requests import Request

from .errors import RateLimited
from .metering import fail_closed

KEY_PREFIX = "vendor:authfail:"

# One atomic step: count the failure and start the window on the first one. The key is a single
# key (its own Cluster slot), so the script is Cluster safe.
_RECORD_FAILURE = """
local count = redis.call('INCR', KEYS[1])
if count == 1 or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return {count, redis.call('PTTL', KEYS[1])}
"""


def client_address(request: Request) -> str:
    """The caller's address as the ASGI server saw it (after trusted proxy headers)."""
    return request.client.host if request.client else "unknown"


@dataclass
class AuthGuard:
    """Counts failed authentications per address and refuses addresses over the limit.

    `max_failures == 0` disables the guard (for deployments that rate-limit at the edge).
    """

    redis: aioredis.Redis
    max_failures: int
    window_s: int

    def __post_init__(self) -> None:
        self._record = self.redis.register_script(_RECORD_FAILURE)

    @staticmethod
    def key(address: str) -> str:
        # The hash tag makes the address the slot key, explicitly, as for the account keys.
        return f"{KEY_PREFIX}{{{address}}}"

    @property
    def enabled(self) -> bool:
        return self.max_failures > 0

    @fail_closed
    async def check(self, address: str) -> None:
        """Raise 429 if `address` has used up its failures in the current window."""
        if not self.enabled:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(self.key(address))
            pipe.pttl(self.key(address))
            raw_count, ttl_ms = await pipe.execute()
        if raw_count is not None and int(raw_count) >= self.max_failures:
            raise self._refusal(int(ttl_ms))

    @fail_closed
    async def record_failure(self, address: str) -> None:
        """Count one failed authentication of `address`."""
        if not self.enabled:
            return
        await self._record(keys=[self.key(address)], args=[self.window_s * 1000])

    def _refusal(self, ttl_ms: int) -> RateLimited:
        wait_s = max(1, -(-max(ttl_ms, 0) // 1000))
        return RateLimited(
            f"too many failed authentication attempts from this address; retry in {wait_s}s",
            headers={"Retry-After": str(wait_s)},
        )


def guard_for(request: Request) -> AuthGuard:
    """The app's guard, built once on the meter's Redis connection pool."""
    state = request.app.state
    guard = getattr(state, "auth_guard", None)
    if guard is None or guard.redis is not state.meter.redis:
        settings = state.settings
        guard = AuthGuard(state.meter.redis, settings.auth_max_failures, settings.auth_failure_window_s)
        state.auth_guard = guard
    return guard
