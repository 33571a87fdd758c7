"""`vendor_load.py --cluster`: paid-request debits per second on one Redis node against a
3-primary Redis Cluster, in one run, as a ratio.

Both sides get the same load: `--cluster-procs` load-generator processes, each with
`--cluster-concurrency` asyncio tasks sending admit + debit + settle (the Redis work of one paid
request, through the server's `Meter`; no Idempotency-Key) over `--cluster-accounts` keys, whose
hash tags spread them over the cluster's slots. The single node is the embedded `redis-server`
(AOF everysec) the vendor uses by default; the cluster is three of the same binary with
`--cluster-enabled yes`, formed by `redis-cli --cluster create` (`vendor_api/local_cluster.py`).
The CPU seconds of the Redis servers and of the load generators are reported, so that a ratio
limited by the load generators (or by the machine's cores) is seen as such.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import socket
import tempfile
import time
from pathlib import Path

import psutil
from _meter_load import create_accounts, run_load
from _report import cpu_summary, invocation, publish

from vendor_api.embedded_redis import EmbeddedRedis
from vendor_api.key_admin import KeyAdmin
from vendor_api.local_cluster import LocalRedisCluster
from vendor_api.metering import Meter

REPORT = Path(__file__).resolve().parent / "results" / "vendor_load_cluster.md"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _generate(url: str, names: list[str], concurrency: int, duration_s: float) -> int:
    meter = Meter.from_url(url)
    try:
        keys = KeyAdmin(meter.redis)
        accounts = [await keys.get_account(name) for name in names]
        result = await run_load(meter, accounts, concurrency=concurrency, duration_s=duration_s, body=b"{}",
                                idempotent=False)
        return result.requests
    finally:
        await meter.close()


def _generator(url: str, names: list[str], concurrency: int, duration_s: float, out: "multiprocessing.Queue") -> None:
    started = time.process_time()
    out.put((asyncio.run(_generate(url, names, concurrency, duration_s)), time.process_time() - started))


def _measure(url: str, server_pids: list[int], args) -> dict[str, float]:
    async def setup() -> list[str]:
        meter = Meter.from_url(url)
        try:
            accounts = await create_accounts(meter, f"bench-{os.getpid()}-{time.time_ns()}", args.cluster_accounts)
            return [a.name for a in accounts]
        finally:
            await meter.close()

    names = asyncio.run(setup())
    servers = [psutil.Process(pid) for pid in server_pids]
    cpu_before = sum(sum(p.cpu_times()[:2]) for p in servers)
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue = context.Queue()
    procs = [context.Process(target=_generator, args=(url, names, args.cluster_concurrency, args.cluster_duration, queue))
             for _ in range(args.cluster_procs)]
    started = time.monotonic()
    for p in procs:
        p.start()
    results = [queue.get(timeout=args.cluster_duration + 120) for _ in procs]
    for p in procs:
        p.join()
    elapsed = time.monotonic() - started
    requests = sum(r[0] for r in results)
    return {"requests": requests, "per_s": requests / args.cluster_duration, "elapsed": elapsed,
            "server_cpu_s": sum(sum(p.cpu_times()[:2]) for p in servers) - cpu_before,
            "client_cpu_s": sum(r[1] for r in results)}


def cluster_main(args) -> int:
    work = Path(tempfile.mkdtemp(prefix="cluster-load-"))
    began = time.monotonic()
    load_before = os.getloadavg()[0]
    with EmbeddedRedis(work / "single", port=_free_port()) as single:
        assert single.process is not None
        one = _measure(single.url, [single.process.pid], args)
    with LocalRedisCluster(work / "cluster", primaries=3) as cluster:
        three = _measure(cluster.url, [n.process.pid for n in cluster.nodes if n.process is not None], args)
    load_after = os.getloadavg()[0]
    ratio = three["per_s"] / one["per_s"] if one["per_s"] else float("nan")
    lines = [
        "# Debits per second: one Redis node against a 3-primary Redis Cluster",
        "",
        f"- Machine: {cpu_summary()}; 1-minute load average {load_before:.2f} before, {load_after:.2f} after "
        "(other jobs share this machine). Servers and load generators share these cores.",
        f"- Load: {args.cluster_procs} load-generator processes x {args.cluster_concurrency} asyncio tasks, each "
        "sending paid requests back to back (admit.lua + debit.lua + settle.lua through the server's `Meter`, "
        f"no Idempotency-Key) over {args.cluster_accounts} keys, {args.cluster_duration:.0f} s per side.",
        "- One node: the embedded `redis-server` 6.2 (AOF everysec). Cluster: three of the same binary with "
        "`--cluster-enabled yes`, formed by `redis-cli --cluster create`, metered through redis-py's `RedisCluster`.",
        "",
        "| Redis | paid requests | debits/s | Redis CPU-s | load-generator CPU-s |",
        "|---|---|---|---|---|",
        f"| 1 node | {one['requests']} | {one['per_s']:.0f} | {one['server_cpu_s']:.1f} | {one['client_cpu_s']:.1f} |",
        f"| 3-primary cluster | {three['requests']} | {three['per_s']:.0f} | {three['server_cpu_s']:.1f} | "
        f"{three['client_cpu_s']:.1f} |",
        "",
        f"**Ratio, cluster / 1 node: {ratio:.2f}.** Redis CPU per debit: "
        f"{1000 * one['server_cpu_s'] / max(1, one['requests']):.3f} ms (1 node), "
        f"{1000 * three['server_cpu_s'] / max(1, three['requests']):.3f} ms (cluster, all nodes).",
        "",
        f"Total benchmark time {time.monotonic() - began:.0f} s; command: "
        f"{invocation('vendor_load.py')}.",
    ]
    publish(lines, REPORT, quick=args.quick)
    return 0
