"""Which Redis client the meter uses: one node (`redis://`, `rediss://`, `unix://`) or a Redis
Cluster (`redis+cluster://`, `rediss+cluster://`, or any URL with `VENDOR_REDIS_CLUSTER=true`).

Why one place: the meter's guarantees depend on how the client retries. redis-py's clients retry
a command after a connection error or a timeout by default, which would re-run a debit whose
reply was merely lost; both clients are built here with no blanket retries (see
`vendor_api/metering.py` for the retries that are safe). The cluster client is redis-py's own
`RedisCluster`: it maps each call to its slot's node, follows MOVED/ASK, and its `register_script`
objects re-send a script's source after `NOSCRIPT` (`SCRIPT LOAD` goes to every primary), so a
primary restarted with an empty script cache costs no request.

A cluster URL names one or more seed nodes: `redis+cluster://[user:password@]host:port[,host:port...]`.
The client discovers the rest (`CLUSTER SLOTS`).
"""

from __future__ import annotations

from typing import Union
from urllib.parse import unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError

RedisClient = Union[aioredis.Redis, RedisCluster]

CLUSTER_SCHEMES = {"redis+cluster": False, "rediss+cluster": True}  # scheme -> TLS


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def as_cluster_url(url: str) -> str:
    """`redis://h:p/0` -> `redis+cluster://h:p` (for `VENDOR_REDIS_CLUSTER=true`). A cluster has
    only database 0 and no unix sockets, so those are refused with a clear message."""
    if is_cluster_url(url):
        return url
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss"):
        raise ValueError(f"VENDOR_REDIS_CLUSTER needs a redis:// or rediss:// REDIS_URL, got {scheme or url!r}")
    netloc, _, path = rest.partition("/")
    if path.split("?", 1)[0] not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0; drop the database number from REDIS_URL")
    return f"{scheme.lower()}+cluster://{netloc}"


def parse_cluster_url(url: str) -> tuple[list[ClusterNode], dict[str, object]]:
    scheme, _, rest = url.partition("://")
    tls = CLUSTER_SCHEMES[scheme.lower()]
    netloc, _, path = rest.partition("/")
    if path.split("?", 1)[0] not in ("", "0"):
        raise ValueError("a Redis Cluster has only database 0; drop the database number from the URL")
    options: dict[str, object] = {"ssl": tls}
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        user, _, password = credentials.partition(":")
        options["username"] = unquote(user) or None
        options["password"] = unquote(password) or None
    nodes = []
    for part in filter(None, netloc.split(",")):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"cluster node {part!r} must be host:port")
        nodes.append(ClusterNode(host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError("a cluster URL needs at least one host:port")
    return nodes, options


def connect(url: str, *, timeout_s: float) -> RedisClient:
    """A client for `url` with no blanket retries; a cluster client for a cluster URL.

    A pooled connection idle for over a second is PINGed before use, so one that a Redis restart
    closed is replaced rather than failed on."""
    common = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, health_check_interval=1)
    if not is_cluster_url(url):
        return aioredis.from_url(url, retry=Retry(NoBackoff(), 0), **common)
    nodes, options = parse_cluster_url(url)
    # require_full_coverage=False: while one primary is down, the keys of the other primaries'
    # slots keep being served (the down node's keys fail closed, 503), if the servers allow it
    # (`cluster-require-full-coverage no`).
    return RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 0), require_full_coverage=False,
                        **options, **common)  # type: ignore[arg-type]


async def ping(client: RedisClient) -> bool:
    """One node: PING. A cluster: True if at least one primary answers (raises otherwise).

    Why not every primary: with one primary down only its slots' keys are unavailable (503 per
    request); a readiness check that failed on every replica would turn that partial outage into
    a total one behind the load balancer."""
    if not isinstance(client, RedisCluster):
        return bool(await client.ping())
    await client.initialize()
    last: Exception | None = None
    for node in client.get_primaries():
        try:
            return bool(await client.execute_command("PING", target_nodes=node))
        except Exception as exc:  # noqa: BLE001 - the next primary may answer
            last = exc
    raise last or ConnectionError("no Redis Cluster primary is known")
