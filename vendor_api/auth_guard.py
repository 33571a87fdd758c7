"""Rate-limits failed authentication per client address, so API keys cannot be guessed.

A key is 32 random bytes, so guessing is hopeless anyway; the guard exists so that a guesser (or a
misconfigured client hammering with a revoked key) costs the vendor one Redis round trip per
attempt and nothing else, and shows up as 429s instead of an unbounded stream of 401s. Why per address
and not per key: a guesser has no key; the only thing the attempts share is where they come from.

The counter lives in Redis (`vendor:authfail:{address}`, a fixed window: the first failure starts
it, `auth_failure_window_s` later it is forgotten), so every replica behind a load balancer sees
the same count. Once an address has `auth_max_failures` failures in its window, every further
*failed* authentication from it gets 429 with `Retry-After` until the window ends. A request
with a valid key still gets through: a key is 32 random bytes, so letting it through gives a
guesser nothing, while refusing it would let one guesser behind a shared NAT address lock out
every honest key there. Redis unreachable fails closed (503), as every other metered decision
does.

The address. By default it is the TCP peer, and `X-Forwarded-For` is ignored: a header anyone
can write must not choose whose counter a failure lands on (a guesser rotating it was never
limited; one forging someone else's address locked that address out). Behind reverse proxies,
list them in `VENDOR_TRUSTED_PROXIES` (addresses or CIDR networks): then, and only for requests
whose peer is one of them, the client is the right-most address of `X-Forwarded-For` that is not
itself a trusted proxy. Whatever its source, the address must parse as an IP address (else the
peer is used), and an IPv6 client is counted per /64 (one host owns a whole /64), so every Redis
key built from it is short and canonical. `vendor-api serve` starts uvicorn with its own proxy
header handling off, because it would trust `X-Forwarded-For` from 127.0.0.1.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache

import redis.asyncio as aioredis
from starlette.requests import Request

from .errors import RateLimited
from .redis_calls import fail_closed, retry_once

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


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def parse_trusted_proxies(spec: str) -> tuple[Network, ...]:
    """`VENDOR_TRUSTED_PROXIES`: comma-separated addresses or networks. A bad entry is an error
    at start-up (settings), never a silently trusted header."""
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip())


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip()[:64])
    except ValueError:
        return None


def _canonical(ip: IPAddress) -> str:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def resolve_client_address(peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]) -> str:
    """The address failures are counted against (see the module docstring)."""
    peer_ip = _ip(peer or "")
    if peer_ip is None:
        return "unknown"
    if trusted and forwarded_for and any(peer_ip in net for net in trusted):
        hops = [h for h in (_ip(part) for part in forwarded_for[:2048].split(",")) if h is not None]
        for hop in reversed(hops):
            if not any(hop in net for net in trusted):
                return _canonical(hop)
    return _canonical(peer_ip)


def client_address(request: Request) -> str:
    """The caller's address: the TCP peer, or, behind configured proxies, the client they name."""
    trusted = parse_trusted_proxies(request.app.state.settings.trusted_proxies)
    return resolve_client_address(request.client.host if request.client else None,
                                  request.headers.get("x-forwarded-for"), trusted)


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
    @retry_once
    async def check(self, address: str) -> None:
        """Raise 429 if `address` has used up its failures in the current window (called for
        failed authentications only)."""
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
