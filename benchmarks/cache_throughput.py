"""Cache throughput: the client's embedding cache vs LMDB on the same vectors, side by side.

Writes: batches of `--write-batch` vectors appended (each batch made durable: our cache fsyncs
per batch, LMDB commits one transaction per batch with its default sync). Reads: random batches
of `--read-batch` keys, as the training loop asks for them. Prints vectors/s for both and the
ratios; writes the Markdown result to benchmarks/results/cache_throughput.md.

    python benchmarks/cache_throughput.py            # 100k x 768 float32
    python benchmarks/cache_throughput.py --quick    # a short sanity run
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _report import cpu_summary, publish
from client_distiller.buying.cache import EmbeddingCache, CacheNamespace


def bench_ours(root: Path, keys: list[bytes], vectors: np.ndarray, write_batch: int, reads: list[list[int]]) -> tuple[float, float]:
    cache = EmbeddingCache(root, CacheNamespace("bench"), vectors.shape[1])
    start = time.perf_counter()
    for i in range(0, len(keys), write_batch):
        cache.put_many(keys[i:i + write_batch], vectors[i:i + write_batch])
    write_s = time.perf_counter() - start
    cache.close()
    start = time.perf_counter()
    cache = EmbeddingCache(root, CacheNamespace("bench"), vectors.shape[1])  # reopen: verify every checksum, map
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    for batch in reads:
        got, found = cache.get_many([keys[j] for j in batch])
    read_s = time.perf_counter() - start
    assert found.all() and np.array_equal(got, vectors[reads[-1]])
    return write_s, read_s, open_s


def bench_lmdb(root: Path, keys: list[bytes], vectors: np.ndarray, write_batch: int, reads: list[list[int]]) -> tuple[float, float]:
    import lmdb

    env = lmdb.open(str(root), map_size=vectors.nbytes * 3, metasync=True, sync=True)
    start = time.perf_counter()
    for i in range(0, len(keys), write_batch):
        with env.begin(write=True) as txn:
            for key, vector in zip(keys[i:i + write_batch], vectors[i:i + write_batch]):
                txn.put(key, vector.tobytes())
    write_s = time.perf_counter() - start
    env.close()
    start = time.perf_counter()
    env = lmdb.open(str(root), readonly=True, lock=False)
    open_s = time.perf_counter() - start
    dim = vectors.shape[1]
    start = time.perf_counter()
    for batch in reads:
        with env.begin() as txn:
            got = np.frombuffer(b"".join(txn.get(keys[j]) for j in batch), dtype=np.float32).reshape(-1, dim)
    read_s = time.perf_counter() - start
    assert np.array_equal(got, vectors[reads[-1]])
    env.close()
    return write_s, read_s, open_s


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--write-batch", type=int, default=256)
    parser.add_argument("--read-batch", type=int, default=1024)
    parser.add_argument("--read-batches", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cache_throughput.md")
    args = parser.parse_args()
    if args.quick:
        args.vectors, args.read_batches = 10_000, 20
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.vectors, args.dim), dtype=np.float32)
    keys = [rng.bytes(32) for _ in range(args.vectors)]
    reads = [rng.integers(0, args.vectors, args.read_batch).tolist() for _ in range(args.read_batches)]
    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    try:
        ours_w, ours_r, ours_open = bench_ours(work / "ours", keys, vectors, args.write_batch, reads)
        lmdb_w, lmdb_r, lmdb_open = bench_lmdb(work / "lmdb", keys, vectors, args.write_batch, reads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n_reads = args.read_batch * args.read_batches
    rows = [("client cache", args.vectors / ours_w, n_reads / ours_r, ours_open),
            ("LMDB", args.vectors / lmdb_w, n_reads / lmdb_r, lmdb_open)]
    lines = [
        "# Cache throughput: client cache vs LMDB",
        "",
        f"Machine: {cpu_summary()}. {args.vectors} vectors x {args.dim} float32; writes in durable batches of "
        f"{args.write_batch}; {args.read_batches} random read batches of {args.read_batch} after reopening.",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "| store | writes/s | batched reads/s | open (s) |",
        "|---|---|---|---|",
        *[f"| {name} | {w:,.0f} | {r:,.0f} | {o:.2f} |" for name, w, r, o in rows],
        "",
        f"Ratio client cache / LMDB: writes {rows[0][1] / rows[1][1]:.2f}x, batched reads {rows[0][2] / rows[1][2]:.2f}x.",
        "The client cache verifies every record's CRC32 once, when it opens the file (the `open` column; "
        "LMDB checks nothing), so corrupt entries are re-bought instead of trained on.",
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
