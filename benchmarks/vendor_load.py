"""Sustained load on one vendor: does it keep serving, without errors and without growing?

Why: `vendor_throughput.py` measures how fast the metered path is; this measures whether it
*stays* right under sustained concurrent load: throughput and tail latency over a fixed time, the
5xx count (goal: 0; 429/402 would be the meter working, and are counted separately) and the
vendor process's resident memory at the start and end of the measured window (goal: flat, i.e.
no leak per request). Redis' own memory is reported too: it grows by design (the append-only
ledger, and one stored answer per Idempotency-Key until its TTL).

A real `vendor-api serve` subprocess (embedded real Redis, AOF everysec) serves either a tiny
seeded open_clip model (default: measures the server, not the model) or the offline demo teacher
(`--teacher demo --data-dir DIR`, where DIR already holds `demo-teacher/`, e.g. `var/vendor`).
A bounded asyncio load generator (httpx) runs N clients, each with its own API key, each sending
requests of k items (images and texts mixed, each request under a fresh Idempotency-Key) back to
back for the duration, after a warm-up that is not measured.

It then measures a zero-balance flood (issue 12): server CPU-seconds per request refused for
its balance (402) against per paid request, with the same expensive body (many large, highly
compressible PNGs: cheap to send, costly to decode), measured on the vendor process and its
embedded Redis with psutil. Goal: a refused request costs < 1% of a paid one, because nothing is
decoded before the balance check.

    python benchmarks/vendor_load.py                       # 16 clients, 60 s; writes the report
    python benchmarks/vendor_load.py --duration 10 --quick # sanity run; prints only
    python benchmarks/vendor_load.py --cluster             # debits/s, 1 Redis node vs a 3-primary cluster

`--cluster` is a separate run (`_cluster_load.py`, report `results/vendor_load_cluster.md`): the
same metering load against one Redis node and against a 3-primary Redis Cluster, as a ratio.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import asyncio
import base64
import io
import itertools
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import redis
from _report import cpu_summary, invocation, publish
from PIL import Image

from client_distiller.buying.local_vendor import LocalVendor
from vendor_api.model_files import write_seeded_local_dir

REPORT = Path(__file__).resolve().parent / "results" / "vendor_load.md"


@dataclass
class Tally:
    """What the load generator saw inside the measured window."""

    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    items: int = 0
    transport_errors: int = 0

    def add(self, status: int, items: int, latency_ms: float) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1
        if status == 200:
            self.items += items
            self.latencies_ms.append(latency_ms)


def _images(n: int, side: int) -> list[str]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


async def _client(url: str, key: str, model: str, client_id: int, images: list[str], items: int,
                  warm_until: float, stop_at: float, tally: Tally) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        for n in itertools.count():
            now = time.monotonic()
            if now >= stop_at:
                return
            batch: list[object] = [{"type": "image", "image": images[(client_id * 7 + n + i) % len(images)]}
                                   if i % 2 == 0 else f"client {client_id} request {n} text {i}" for i in range(items)]
            started = time.monotonic()
            try:
                r = await http.post("/v1/embeddings", json={"model": model, "input": batch, "encoding_format": "base64"},
                                    headers={"Idempotency-Key": f"load-{client_id}-{n}"})
                status = r.status_code
            except httpx.TransportError:
                status = -1
            ended = time.monotonic()
            if started >= warm_until and ended <= stop_at:
                if status == -1:
                    tally.transport_errors += 1
                else:
                    tally.add(status, items, (ended - started) * 1000)
            if status != 200:
                await asyncio.sleep(0.05)


async def _run_load(url: str, keys: list[str], model: str, images: list[str], items: int,
                    warm_s: float, duration_s: float, rss: list[tuple[float, int]], pid: int) -> Tally:
    tally = Tally()
    start = time.monotonic()
    warm_until, stop_at = start + warm_s, start + warm_s + duration_s
    process = psutil.Process(pid)

    async def sample_rss() -> None:
        while time.monotonic() < stop_at:
            if time.monotonic() >= warm_until:
                rss.append((time.monotonic() - warm_until, process.memory_info().rss))
            await asyncio.sleep(min(5.0, max(0.5, duration_s / 12)))
        rss.append((time.monotonic() - warm_until, process.memory_info().rss))

    await asyncio.gather(sample_rss(), *(
        _client(url, key, model, i, images, items, warm_until, stop_at, tally) for i, key in enumerate(keys)))
    return tally


def _heavy_images(n: int, side: int) -> list[str]:
    """Large, nearly uniform PNGs: a few KB each on the wire, `side`^2 pixels to decode."""
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.new("RGB", (side, side), (i * 7 % 256, 90, 160)).save(buffer, format="PNG", optimize=True)
        out.append(base64.b64encode(buffer.getvalue()).decode())
    return out


def _server_cpu_s(pid: int) -> tuple[float, float]:
    """(vendor process, vendor + its children such as the embedded Redis) CPU seconds so far."""
    process = psutil.Process(pid)
    own = sum(process.cpu_times()[:2])
    children = sum(sum(c.cpu_times()[:2]) for c in process.children(recursive=True))
    return own, own + children


@dataclass
class Flood:
    paid: int
    refused: int
    other: dict[int, int]
    paid_cpu: tuple[float, float]
    refused_cpu: tuple[float, float]
    body_bytes: int
    duration_s: float


async def _flood(url: str, model: str, paid_key: str, zero_keys: list[str], images: list[str], paid_n: int,
                 duration_s: float, pid: int) -> Flood:
    body = {"model": model, "input": [{"type": "image", "image": im} for im in images]}
    body_bytes = len(json.dumps(body))
    other: dict[int, int] = {}
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        before = _server_cpu_s(pid)
        paid = 0
        for n in range(paid_n):  # sequential: the server's CPU per paid request, nothing else running
            r = await http.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {paid_key}"})
            paid += r.status_code == 200
        after_paid = _server_cpu_s(pid)
        refused = 0
        stop_at = time.monotonic() + duration_s

        async def flooder(key: str) -> None:
            nonlocal refused
            while time.monotonic() < stop_at:
                r = await http.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"})
                if r.status_code == 402:
                    refused += 1
                else:
                    other[r.status_code] = other.get(r.status_code, 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(flooder(k) for k in zero_keys))
        elapsed = time.monotonic() - started
        after_flood = _server_cpu_s(pid)
    return Flood(paid, refused, other, (after_paid[0] - before[0], after_paid[1] - before[1]),
                 (after_flood[0] - after_paid[0], after_flood[1] - after_paid[1]), body_bytes, elapsed)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--items", type=int, default=4, help="items per request (half images, half texts)")
    parser.add_argument("--image-side", type=int, default=64)
    parser.add_argument("--teacher", choices=("tiny", "demo"), default="tiny")
    parser.add_argument("--data-dir", type=Path, help="vendor data dir (required for --teacher demo)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--flood-duration", type=float, default=10.0, help="seconds of zero-balance flood (0: skip)")
    parser.add_argument("--flood-clients", type=int, default=8)
    parser.add_argument("--flood-images", type=int, default=32, help="images per flood request")
    parser.add_argument("--flood-image-side", type=int, default=1536)
    parser.add_argument("--flood-paid", type=int, default=4, help="paid requests of the same body, for the ratio")
    parser.add_argument("--quick", action="store_true", help="print only; do not write the committed report")
    parser.add_argument("--cluster", action="store_true",
                        help="instead: debits/s on 1 Redis node against a 3-primary cluster, as a ratio")
    parser.add_argument("--cluster-duration", type=float, default=30.0, help="seconds per side of --cluster")
    parser.add_argument("--cluster-procs", type=int, default=2, help="load-generator processes of --cluster")
    parser.add_argument("--cluster-concurrency", type=int, default=16, help="asyncio tasks per process")
    parser.add_argument("--cluster-accounts", type=int, default=48)
    args = parser.parse_args()
    if args.cluster:
        from _cluster_load import cluster_main

        return cluster_main(args)

    work = Path(tempfile.mkdtemp(prefix="vendor-load-"))
    if args.teacher == "demo":
        if args.data_dir is None or not (args.data_dir / "demo-teacher" / "open_clip_config.json").is_file():
            print("vendor_load: --teacher demo needs --data-dir holding a built demo-teacher/", file=sys.stderr)
            return 2
        data_dir, teacher_spec, teacher_desc = args.data_dir, None, "the offline demo teacher"
    else:
        data_dir = work / "vendor"
        teacher_spec = f"local-dir:{write_seeded_local_dir(work / 'tiny-clip', seed=0)}"
        teacher_desc = "a tiny seeded open_clip model (32 px, 64-d; the server, not the model, is measured)"
    env = {"VENDOR_TORCH_THREADS": str(args.torch_threads), "VENDOR_LOG_LEVEL": "warning",
           "OMP_NUM_THREADS": str(args.torch_threads)}
    images = _images(32, args.image_side)
    began = time.monotonic()
    load_before = os.getloadavg()[0]
    with LocalVendor(data_dir, teacher=teacher_spec, extra_env=env, startup_timeout_s=600) as vendor:
        tag = f"{os.getpid()}-{int(time.time())}"
        keys = [vendor.create_key(f"load-{tag}-{i}", 10**9, rate_per_s=100_000, burst=100_000)
                for i in range(args.clients)]
        model = httpx.get(vendor.url + "/v1/models", headers={"Authorization": f"Bearer {keys[0]}"}).json()["data"][0]["id"]
        store = redis.Redis.from_url(f"unix://{data_dir.resolve() / 'redis' / 'redis.sock'}") \
            if len(str(data_dir.resolve() / "redis" / "redis.sock")) <= 100 else None
        redis_before = store.info("memory")["used_memory"] if store else None
        rss: list[tuple[float, int]] = []
        tally = asyncio.run(_run_load(vendor.url, keys, model, images, args.items, args.warmup, args.duration,
                                      rss, vendor.process.pid))
        redis_after = store.info("memory")["used_memory"] if store else None
        flood = None
        if args.flood_duration > 0:
            paid_key = vendor.create_key(f"flood-paid-{tag}", 10**9, rate_per_s=100_000, burst=100_000)
            zero_keys = [vendor.create_key(f"flood-zero-{tag}-{i}", 0, rate_per_s=100_000, burst=100_000)
                         for i in range(args.flood_clients)]
            flood = asyncio.run(_flood(vendor.url, model, paid_key, zero_keys,
                                       _heavy_images(args.flood_images, args.flood_image_side), args.flood_paid,
                                       args.flood_duration, vendor.process.pid))
        if store:
            store.close()
    load_after = os.getloadavg()[0]

    ok = tally.statuses.get(200, 0)
    fivexx = sum(n for s, n in tally.statuses.items() if s >= 500)
    requests = sum(tally.statuses.values())
    rss_mib = [r / 2**20 for _, r in rss]
    lines = [
        "# Vendor under sustained load",
        "",
        f"- Machine: {cpu_summary()}; 1-minute load average {load_before:.2f} before, {load_after:.2f} after "
        "(other engineers' jobs share this machine).",
        f"- Vendor: `vendor-api serve` subprocess serving {teacher_desc}, CPU, `VENDOR_TORCH_THREADS={args.torch_threads}`, "
        "default batching (`VENDOR_MAX_BATCH_SIZE=32`, `VENDOR_MAX_WAIT_MS=5`); embedded real Redis, AOF everysec.",
        f"- Load: {args.clients} concurrent asyncio httpx clients, each with its own API key, back to back; "
        f"{args.items} items per request ({(args.items + 1) // 2} PNG images of {args.image_side} px + "
        f"{args.items // 2} texts), a fresh Idempotency-Key each; {args.warmup:.0f} s warm-up, then "
        f"{args.duration:.0f} s measured.",
        "",
        "| metric | value |",
        "|---|---|",
        f"| requests answered 200 | {ok} |",
        f"| throughput | {tally.items / args.duration:.1f} items/s, {ok / args.duration:.1f} requests/s |",
        f"| latency p50 / p99 (200s) | {_percentile(tally.latencies_ms, 50):.0f} ms / {_percentile(tally.latencies_ms, 99):.0f} ms |",
        f"| 5xx | {fivexx} (goal 0) |",
        f"| other statuses | {', '.join(f'{s}: {n}' for s, n in sorted(tally.statuses.items()) if s != 200) or 'none'} |",
        f"| transport errors | {tally.transport_errors} |",
        f"| vendor RSS start / end | {rss_mib[0]:.1f} MiB / {rss_mib[-1]:.1f} MiB ({rss_mib[-1] - rss_mib[0]:+.1f} MiB) |",
        f"| vendor RSS samples (MiB) | {', '.join(f'{m:.0f}' for m in rss_mib)} |",
    ]
    if redis_before is not None:
        lines.append(f"| Redis used_memory start / end | {redis_before / 2**20:.1f} MiB / {redis_after / 2**20:.1f} MiB "
                     f"(ledger entries and stored idempotent answers: grows by design) |")
    if flood is not None:
        per_paid = [c / max(1, flood.paid) for c in flood.paid_cpu]
        per_refused = [c / max(1, flood.refused) for c in flood.refused_cpu]
        lines += [
            "",
            "## Zero-balance flood",
            "",
            f"Body: {args.flood_images} PNG images of {args.flood_image_side} x {args.flood_image_side} px, nearly "
            f"uniform ({flood.body_bytes / 1024:.0f} KiB of JSON, {args.flood_images * args.flood_image_side ** 2 / 1e6:.0f} "
            f"Mpixels to decode). {args.flood_paid} paid requests of it, one at a time, then {args.flood_clients} "
            f"clients with zero-balance keys (rate limit out of the way) sending it back to back for "
            f"{flood.duration_s:.0f} s. Server CPU from psutil (user + system) of the vendor process, and of it "
            "plus its embedded Redis.",
            "",
            "| | requests | CPU-s (vendor) | CPU-s (vendor + Redis) | CPU-ms per request (vendor) | CPU-ms per request (vendor + Redis) |",
            "|---|---|---|---|---|---|",
            f"| paid (200) | {flood.paid} | {flood.paid_cpu[0]:.2f} | {flood.paid_cpu[1]:.2f} | "
            f"{per_paid[0] * 1000:.1f} | {per_paid[1] * 1000:.1f} |",
            f"| refused (402) | {flood.refused} | {flood.refused_cpu[0]:.2f} | {flood.refused_cpu[1]:.2f} | "
            f"{per_refused[0] * 1000:.2f} | {per_refused[1] * 1000:.2f} |",
            "",
            f"A refused request costs **{100 * per_refused[1] / per_paid[1]:.2f}%** of a paid one "
            f"(vendor + Redis; {100 * per_refused[0] / per_paid[0]:.2f}% for the vendor process alone); goal < 1%. "
            f"Other statuses during the flood: {', '.join(f'{s}: {n}' for s, n in sorted(flood.other.items())) or 'none'}.",
        ]
    lines += [
        "",
        f"{requests} requests measured; total benchmark time {time.monotonic() - began:.0f} s; command: "
        f"{invocation('vendor_load.py')}.",
    ]
    publish(lines, REPORT, quick=args.quick)
    return 0 if fivexx == 0 and tally.transport_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
