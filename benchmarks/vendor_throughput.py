"""Vendor throughput: raw `encode_image` in-process vs. the metered HTTP API, same model, same run.

Why: the API adds HTTP, JSON, base64, PNG decoding, preprocessing, an auth lookup and two Lua
scripts to every request. Dynamic batching across concurrent requests should hide almost all of
that behind the model, so the images/s served should stay close (goal: >= 0.9) to what the bare
model does on its own. One run, one machine, both sides:

* raw: `Teacher.encode_images` on already-preprocessed batches of `max_batch_size`;
* api: a real `vendor-api serve` subprocess (real Redis, real key) under N concurrent httpx
  clients each sending requests of k PNG images; images/s, latency, the batches it formed;
* metering: `Meter.debit` + `Meter.settle` timed directly against the same Redis.

Raw and API rounds alternate in ABBA order, so drift on a shared machine hits both alike. Each
side also reports the CPU it consumed per image (server + Redis + load generator for the API),
which other tenants of the machine cannot distort the way they distort wall-clock rates.

    python benchmarks/vendor_throughput.py            # full run (~4 min); writes the report
    python benchmarks/vendor_throughput.py --quick    # ~1 min sanity run; prints only
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The raw side's OpenMP workers sleep instead of spinning: on a shared 2-CPU machine a spinning
# worker burns the time slice its teammate needs, and 2-thread `encode_images` fell from ~25 to
# 5-10 images/s here. Without this the baseline would be unfairly weak. It must be set before torch
# loads; the server gets the caller's own setting (unset: OpenMP's default), not this one.
_CALLER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
os.environ["OMP_WAIT_POLICY"] = _CALLER_OMP_WAIT_POLICY or "PASSIVE"

import argparse
import asyncio
import base64
import io
import json
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import torch
from PIL import Image, ImageDraw
from _report import cpu_model
from prometheus_client.parser import text_string_to_metric_families

from vendor_api.embedded_redis import EmbeddedRedis
from vendor_api.key_admin import KeyAdmin
from vendor_api.metering import Meter
from vendor_api.model_files import write_seeded_weights
from vendor_api.settings import VendorSettings
from vendor_api.teacher import Teacher

REPORT = Path(__file__).resolve().parent / "results" / "vendor_throughput.md"
MODEL = "ViT-S-32"
GOAL = 0.9
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Config:
    """One benchmark configuration; the server settings travel as `VENDOR_*` variables."""

    rounds: int
    seconds: float
    warmup_s: float
    clients: int
    images_per_request: int
    image_side: int
    max_batch_size: int
    max_wait_ms: float
    preprocess_workers: int
    torch_threads: int
    lua_iterations: int

    def server_env(self) -> dict[str, str]:
        return {
            "VENDOR_MAX_BATCH_SIZE": str(self.max_batch_size),
            "VENDOR_MAX_WAIT_MS": f"{self.max_wait_ms:g}",
            "VENDOR_PREPROCESS_WORKERS": str(self.preprocess_workers),
            "VENDOR_TORCH_THREADS": str(self.torch_threads),
        }


@dataclass
class Round:
    """One measured round of either side."""

    images: float
    seconds: float
    cpu_s: float
    latencies_s: list[float] = field(default_factory=list)
    batched: tuple[float, float] = (0.0, 0.0)  # (items, batches) the server's image tower formed

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_s / self.images


# ---------------------------------------------------------------- the machine
def machine() -> str:
    """Enough to tell whether two reports are comparable."""
    cpu = cpu_model()
    return (f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {cpu}; Python "
            f"{platform.python_version()}, torch {torch.__version__} (default {torch.get_num_threads()} threads), "
            f"{platform.system()} {platform.release()}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


# ---------------------------------------------------------------- inputs
def synthetic_png(seed: int, side: int) -> bytes:
    """A photo-like PNG (gradients and shapes): compresses and decodes like a picture, unlike
    uniform noise, which would make PNG decoding a bottleneck it never is in practice."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, side, dtype=np.float32)
    base = rng.uniform(0, 255, size=3) * ramp[:, None, None] + rng.uniform(0, 255, size=3) * ramp[None, :, None]
    image = Image.fromarray((base / 2).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = (int(v) for v in rng.integers(0, side, size=2))
        x1, y1 = x0 + int(rng.integers(8, side // 2)), y0 + int(rng.integers(8, side // 2))
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def request_bodies(pngs: list[bytes], per_request: int, model_id: str) -> list[bytes]:
    """Serialised once, up front: the load generator shares the CPU with the server and must
    spend it on sockets, not on JSON and base64."""
    items = [{"type": "image", "image": base64.b64encode(png).decode()} for png in pngs]
    return [
        json.dumps({"model": model_id, "input": items[i:i + per_request], "encoding_format": "base64"}).encode()
        for i in range(0, len(items) - per_request + 1, per_request)
    ]


def preprocessed_batch(teacher: Teacher, pngs: list[bytes], size: int) -> torch.Tensor:
    images = [teacher.preprocess(Image.open(io.BytesIO(png)).convert("RGB")) for png in pngs]
    return torch.stack([images[i % len(images)] for i in range(size)])


# ---------------------------------------------------------------- raw model
def raw_round(teacher: Teacher, batch: torch.Tensor, seconds: float, threads: int) -> Round:
    """Back-to-back `encode_images` calls: the ceiling the API is measured against."""
    torch.set_num_threads(threads)
    teacher.encode_images(batch)
    done, started, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - started < seconds:
        teacher.encode_images(batch)
        done += len(batch)
    return Round(done, time.perf_counter() - started, time.process_time() - cpu)


# ---------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vendor_command(port: int) -> list[str]:
    """The installed `vendor-api` console script, as an operator runs it."""
    script = Path(sys.executable).with_name("vendor-api")
    exe = str(script) if script.exists() else shutil.which("vendor-api") or "vendor-api"
    return [exe, "serve", "--host", "127.0.0.1", "--port", str(port)]


def start_vendor(config: Config, teacher_spec: str, redis_url: str, data_dir: Path) -> tuple[subprocess.Popen, str]:
    """Start `vendor-api serve` and wait for /readyz; its log goes to `data_dir/vendor.log` (a
    pipe nobody reads could fill up and stall the server mid-benchmark)."""
    port = free_port()
    env = {**os.environ, **config.server_env(), "VENDOR_TEACHER": teacher_spec, "REDIS_URL": redis_url,
           "VENDOR_DATA_DIR": str(data_dir), "VENDOR_LOG_LEVEL": "warning", "VENDOR_DEVICE": "cpu"}
    if _CALLER_OMP_WAIT_POLICY is None:
        env.pop("OMP_WAIT_POLICY")
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "vendor.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(vendor_command(port), env=env, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vendor exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"vendor did not become ready within 180 s: {log.read_text()[-2000:]}")


def stop_vendor(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def image_batches(url: str) -> tuple[float, float]:
    """(items, batches) of the image tower so far, from the server's /metrics."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = {s.name: s.value for family in text_string_to_metric_families(text) if family.name == "vendor_batch_size"
              for s in family.samples if s.labels.get("tower") == "image"}
    return values.get("vendor_batch_size_sum", 0.0), values.get("vendor_batch_size_count", 0.0)


# ---------------------------------------------------------------- API load
async def client_loop(client: httpx.AsyncClient, bodies: list[bytes], offset: int, per_request: int,
                      stop_at: float, done: list[tuple[float, float, int]]) -> None:
    """Send requests back to back until `stop_at`; record (started, finished, images) of each."""
    index = offset
    while time.perf_counter() < stop_at:
        body = bodies[index % len(bodies)]
        index += 1
        started = time.perf_counter()
        response = await client.post("/v1/embeddings", content=body)
        if response.status_code != 200:
            raise RuntimeError(f"API answered {response.status_code}: {response.text[:300]}")
        done.append((started, time.perf_counter(), per_request))


def images_in_window(done: list[tuple[float, float, int]], start: float, end: float) -> float:
    """Each request's images, weighted by the share of its lifetime inside the window. Counting
    only completions would quantise the rate by whole batches (all requests of a batch finish
    together), an error of several percent in a 10 s window."""
    return sum(n * max(0.0, min(f, end) - max(s, start)) / (f - s) for s, f, n in done if f > s)


async def cpu_window(pids: list[int], start: float, end: float) -> float:
    """CPU consumed by `pids` plus this process between two `perf_counter` instants."""
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    before = sum(cpu_seconds(p) for p in pids) + time.process_time()
    await asyncio.sleep(max(0.0, end - time.perf_counter()))
    return sum(cpu_seconds(p) for p in pids) + time.process_time() - before


async def api_load(url: str, api_key: str, bodies: list[bytes], config: Config, pids: list[int]) -> Round:
    """`clients` concurrent clients for warm-up + measured seconds. Clients stop sending at the
    window's end and finish what is in flight, so the server is idle, not draining abandoned
    work, when the next raw round starts."""
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    limits = httpx.Limits(max_connections=config.clients, max_keepalive_connections=config.clients)
    done: list[tuple[float, float, int]] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        start = time.perf_counter() + config.warmup_s
        end = start + config.seconds
        cpu, *_ = await asyncio.gather(cpu_window(pids, start, end), *(
            client_loop(client, bodies, i * 3, config.images_per_request, end, done) for i in range(config.clients)
        ))
    latencies = [f - s for s, f, _ in done if start <= f < end]
    return Round(images_in_window(done, start, end), config.seconds, cpu, latencies)


def api_round(url: str, api_key: str, bodies: list[bytes], config: Config, pids: list[int]) -> Round:
    before = image_batches(url)
    result = asyncio.run(api_load(url, api_key, bodies, config, pids))
    after = image_batches(url)
    result.batched = (after[0] - before[0], after[1] - before[1])
    return result


# ---------------------------------------------------------------- metering overhead
async def lua_overhead(redis_url: str, iterations: int, response_bytes: int) -> dict[str, list[float]]:
    """Wall time of the two scripts every request runs, as the server's own client sees them."""
    meter = Meter.from_url(redis_url)
    body = b"x" * response_bytes
    timings: dict[str, list[float]] = {"debit": [], "settle": [], "debit + settle, with Idempotency-Key": []}
    try:
        _, account = await KeyAdmin(meter.redis).create_key("lua-bench", quota=10 * iterations, rate_per_s=1e6,
                                                            burst=10**6)
        for i in range(iterations):
            started = time.perf_counter()
            debit = await meter.debit(account, units=1, images=1, texts=0, fingerprint="f", idempotency_key=None)
            middle = time.perf_counter()
            await meter.settle(account, debit, outcome="delivered", idempotency_key=None)
            timings["debit"].append(middle - started)
            timings["settle"].append(time.perf_counter() - middle)
            started = time.perf_counter()
            debit = await meter.debit(account, units=1, images=1, texts=0, fingerprint="f", idempotency_key=f"k{i}")
            await meter.settle(account, debit, outcome="delivered", idempotency_key=f"k{i}", body=body)
            timings["debit + settle, with Idempotency-Key"].append(time.perf_counter() - started)
    finally:
        await meter.close()
    return timings


async def create_key(redis_url: str) -> str:
    keys = KeyAdmin.from_url(redis_url)
    try:
        key, _ = await keys.create_key("bench", quota=10**9, rate_per_s=1e6, burst=10**6)
        return key
    finally:
        await keys.close()


# ---------------------------------------------------------------- report
def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def round_order(rounds: int) -> Iterator[str]:
    """ABBA...: each side goes first equally often, so slow drift favours neither."""
    for r in range(rounds):
        yield from (("raw", "api") if r % 2 == 0 else ("api", "raw"))


def side_row(name: str, rounds: list[Round]) -> str:
    rate = statistics.median(r.rate for r in rounds)
    cpu = statistics.median(r.cpu_ms_per_image for r in rounds)
    cores = statistics.median(r.cpu_s / r.seconds for r in rounds)
    return f"| {name} | {rate:.1f} | {cpu:.1f} | {cores:.2f} | {', '.join(f'{r.rate:.1f}' for r in rounds)} |"


def render(config: Config, machine_line: str, raw: list[Round], api: list[Round],
           lua: dict[str, list[float]], loads: list[float], elapsed_s: float) -> str:
    paired = [a.rate / r.rate for r, a in zip(raw, api)]
    ratio = statistics.median(paired)
    of_medians = statistics.median(r.rate for r in api) / statistics.median(r.rate for r in raw)
    efficiency = statistics.median(r.cpu_ms_per_image for r in raw) / statistics.median(a.cpu_ms_per_image for a in api)
    latencies = [lat for r in api for lat in r.latencies_s]
    items, batches = (sum(r.batched[i] for r in api) for i in (0, 1))
    env = ", ".join(f"`{k}={v}`" for k, v in config.server_env().items())
    omp = _CALLER_OMP_WAIT_POLICY or "unset (OpenMP default)"
    return "\n".join([
        "# Vendor throughput: raw model vs. metered HTTP API",
        "",
        f"- Machine: {machine_line}.",
        f"- 1-minute load average over the run: {min(loads):.2f} to {max(loads):.2f} "
        f"(the machine has {os.cpu_count()} CPUs; above that, other processes were competing).",
        f"- Model: open_clip `{MODEL}` with seeded random weights, fp32 on CPU; inputs are {config.image_side} px "
        f"photo-like PNGs (the model's preprocessing resizes/crops to {224} px); answers as `encoding_format=base64`.",
        f"- Vendor: `vendor-api serve` subprocess with {env}, `OMP_WAIT_POLICY` {omp}; real Redis (AOF everysec).",
        f"- Load: {config.clients} concurrent httpx clients x {config.images_per_request} images per request, "
        f"bodies pre-encoded; {config.rounds} rounds x {config.seconds:.0f} s measured per side, ABBA order, "
        f"{config.warmup_s:.0f} s API warm-up per round.",
        f"- Raw: `Teacher.encode_images` on preprocessed batches of {config.max_batch_size} "
        f"(= `max_batch_size`), {config.torch_threads} torch thread(s) like the server, "
        f"`OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}`.",
        "",
        "| side | images/s (median) | CPU ms per image | cores busy | images/s per round |",
        "|---|---|---|---|---|",
        side_row("raw `encode_images`", raw),
        side_row("HTTP API (auth, debit, decode, preprocess, batch, settle; server + Redis + clients)", api),
        "",
        f"**API / raw = {ratio:.3f}** (median over adjacent raw/API pairs: {', '.join(f'{p:.2f}' for p in paired)}; "
        f"goal >= {GOAL}: {'met' if ratio >= GOAL else 'missed'}). Ratio of the medians: {of_medians:.3f}. "
        f"CPU efficiency (raw CPU per image / API CPU per image, server + Redis + clients): {efficiency:.3f}.",
        "",
        f"- Request latency ({config.images_per_request} images, {len(latencies)} requests): "
        f"p50 {pct(latencies, 50) * 1000:.0f} ms, p99 {pct(latencies, 99) * 1000:.0f} ms.",
        f"- Batches the server formed (`vendor_batch_size`, image tower): {batches:.0f} batches, "
        f"mean {items / max(batches, 1):.1f} images (max {config.max_batch_size}).",
        "",
        f"Metering overhead per request: {len(lua['debit'])} sequential iterations against the same Redis, "
        "through the server's own redis-py asyncio client (round trip included):",
        "",
        "| Lua | p50 ms | p99 ms |",
        "|---|---|---|",
        *(f"| {name} | {pct(v, 50) * 1000:.3f} | {pct(v, 99) * 1000:.3f} |" for name, v in lua.items()),
        "",
        f"Total benchmark time {elapsed_s:.0f} s; command: `python benchmarks/vendor_throughput.py"
        f"{''.join(' ' + a for a in sys.argv[1:])}`.",
        "",
    ])


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> tuple[Config, bool, Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short sanity run; prints, writes no report")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per side")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per round and side")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--images-per-request", type=int, default=8)
    parser.add_argument("--image-side", type=int, default=224, help="PNG side; 224 = the model's input size")
    # The vendor's own defaults: the benchmark measures what an operator gets out of the box.
    defaults = VendorSettings.model_fields
    parser.add_argument("--max-batch-size", type=int, default=defaults["max_batch_size"].default)
    parser.add_argument("--max-wait-ms", type=float, default=defaults["max_wait_ms"].default)
    parser.add_argument("--preprocess-workers", type=int, default=defaults["preprocess_workers"].default)
    parser.add_argument("--torch-threads", type=int, default=torch.get_num_threads(),
                        help="server and raw side (default: torch's, i.e. unset VENDOR_TORCH_THREADS)")
    parser.add_argument("--lua-iterations", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args(argv)
    config = Config(
        rounds=2 if args.quick else args.rounds, seconds=5.0 if args.quick else args.seconds,
        warmup_s=2.0 if args.quick else 3.0, clients=args.clients, images_per_request=args.images_per_request,
        image_side=args.image_side, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
        preprocess_workers=args.preprocess_workers, torch_threads=args.torch_threads,
        lua_iterations=300 if args.quick else args.lua_iterations,
    )
    return config, args.quick, args.out


def run(config: Config, work: Path) -> tuple[list[Round], list[Round], dict[str, list[float]], list[float]]:
    """Set up model, Redis and server in `work`, then alternate raw and API rounds."""
    weights = write_seeded_weights(work / f"{MODEL}.safetensors", MODEL)
    spec = f"{MODEL}:{weights}"
    teacher = Teacher.load(spec, device="cpu")
    pngs = [synthetic_png(seed, config.image_side) for seed in range(64)]
    bodies = request_bodies(pngs, config.images_per_request, teacher.model_id)
    batch = preprocessed_batch(teacher, pngs, config.max_batch_size)
    raw: list[Round] = []
    api: list[Round] = []
    loads = [os.getloadavg()[0]]
    with EmbeddedRedis(work / "redis", port=free_port()) as redis_server:
        api_key = asyncio.run(create_key(redis_server.url))
        process, url = start_vendor(config, spec, redis_server.url, work / "vendor")
        pids = [process.pid, redis_server.process.pid] if redis_server.process else [process.pid]
        try:
            for side in round_order(config.rounds):
                if side == "raw":
                    raw.append(raw_round(teacher, batch, config.seconds, config.torch_threads))
                else:
                    api.append(api_round(url, api_key, bodies, config, pids))
                latest = raw[-1] if side == "raw" else api[-1]
                loads.append(os.getloadavg()[0])
                print(f"{side:4} {latest.rate:6.1f} images/s  {latest.cpu_ms_per_image:5.1f} CPU ms/image  "
                      f"load {loads[-1]:.2f}", flush=True)
        finally:
            stop_vendor(process)
        response_bytes = (4 * teacher.embed_dim * 4 // 3) * config.images_per_request + 300
        lua = asyncio.run(lua_overhead(redis_server.url, config.lua_iterations, response_bytes))
    return raw, api, lua, loads


def main(argv: list[str] | None = None) -> int:
    config, quick, out = parse_args(argv)
    started = time.perf_counter()
    machine_line = machine()
    print(machine_line, flush=True)
    with tempfile.TemporaryDirectory(prefix="vendor-bench-") as tmp:
        raw, api, lua, loads = run(config, Path(tmp))
    report = render(config, machine_line, raw, api, lua, loads, time.perf_counter() - started)
    print(report)
    if not quick:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
