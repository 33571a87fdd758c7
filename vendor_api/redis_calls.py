"""How every Redis call of the vendor fails and which ones are retried.

Fail closed: Redis unreachable is `MeteringUnavailable` (503), so the vendor never serves an
unmetered answer and an admin command is one clear line.

Retries. redis-py's default retries any command on a connection error or timeout, which would
re-run a debit whose reply was merely lost. The client is built without blanket retries
(`redis_client`); instead every script that is idempotent per request id (debit, settle, renew)
is retried once on a fresh connection, as are plain reads, so a pool of connections left stale by
a Redis restart costs no request a 503. Writes that are not idempotent (top-up, key creation) are
never retried.
"""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, TypeVar

from redis.exceptions import ClusterDownError, RedisClusterException, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import MeteringUnavailable

T = TypeVar("T")


def fail_closed(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Any Redis connection/timeout problem becomes a 503, never an unmetered answer.

    On a Redis Cluster that includes the cluster saying it cannot serve the slot right now
    (CLUSTERDOWN, TRYAGAIN during a resharding, a slot no node covers): each is refused before
    the command runs, so nothing was written."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> T:
        try:
            return await fn(*args, **kwargs)
        except (ClusterDownError, TryAgainError, RedisClusterException) as exc:  # first: two are ResponseErrors
            raise _unavailable() from exc
        except ResponseError:  # the command ran and Redis refused it: a bug or bad data, not an outage
            raise
        except (RedisError, OSError) as exc:
            raise _unavailable() from exc

    return wrapper


def _unavailable() -> MeteringUnavailable:
    return MeteringUnavailable("metering is unavailable; no request is served unmetered, retry shortly",
                               headers={"Retry-After": "1"})


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
