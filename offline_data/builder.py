"""Building a benchmark split: in memory (for the teacher builder) or on disk (DomainBed layout).

``iter_samples`` is the single place that decides which item is drawn in which domain with which
random stream; ``build_benchmark`` writes those samples as ``out/<domain>/<class>/<n>.png`` plus a
``benchmark.json`` manifest (and, for the vendor split, ``captions.jsonl``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from .captions import captions_for
from .classes import ClassInfo
from .domains import render
from .errors import InvalidArgumentError, OutputNotWritableError, UnknownNameError
from .registry import SPLITS, BenchmarkSpec, get_benchmark
from .seeding import rng_for
from .sources import BackgroundPool

MANIFEST = "benchmark.json"
CAPTIONS = "captions.jsonl"


@dataclass(frozen=True)
class Sample:
    """One rendered picture with its labels and captions."""

    domain: str
    cls: ClassInfo
    label: int
    index: int
    image: Image.Image
    captions: list[str]
    source: str  # "<source file>:<item index>", to check that splits never share an item


@dataclass
class BuildReport:
    """What a build wrote: where, how many per (domain, class), and how long it took."""

    name: str
    split: str
    seed: int
    out: str
    image_size: int
    per_class: int
    domains: list[str]
    classes: list[str]
    class_names: list[str]
    n_images: int
    seconds: float
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _resolve(name: str, split: str, size: str, per_class: int | None) -> tuple[BenchmarkSpec, int]:
    spec = get_benchmark(name)
    if split not in SPLITS:
        raise UnknownNameError("split", split, SPLITS)
    n = spec.per_class(size, split) if per_class is None else per_class
    if not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"per_class must be a positive integer, got {n!r}")
    return spec, n


def iter_samples(name: str, *, split: str = "client", seed: int = 0, size: str = "full",
                 per_class: int | None = None, domains: tuple[str, ...] | None = None,
                 n_captions: int = 2) -> Iterator[Sample]:
    """Render a split picture by picture, deterministically for ``seed``.

    Each domain gets different items (as in DomainBed, where domains share classes, not
    pictures), and every (domain, class) cell has its own random stream.
    """
    spec, n = _resolve(name, split, size, per_class)
    split_domains = spec.domains_for(split)
    chosen = split_domains if domains is None else domains
    for d in chosen:
        if d not in split_domains:
            raise UnknownNameError("domain", d, split_domains)
    items, labels = spec.items(split)
    pool = BackgroundPool.for_split(split)
    for label, cls in enumerate(spec.classes):
        idx = np.flatnonzero(labels == label)
        need = n * len(split_domains)
        if need > len(idx):
            raise InvalidArgumentError(
                f"{spec.name}/{split} has {len(idx)} items of class {cls.key}: at most "
                f"{len(idx) // len(split_domains)} per domain, asked {n}")
        order = rng_for(seed, spec.name, split, "items", cls.key).permutation(idx)
        for d in chosen:
            chunk = order[split_domains.index(d) * n:(split_domains.index(d) + 1) * n]
            rng = rng_for(seed, spec.name, split, d, cls.key)
            for i, item_idx in enumerate(chunk):
                image, attrs = render(d, items[item_idx], rng, pool, spec.image_size)
                caps = captions_for(d, cls, attrs, rng, n_captions)
                yield Sample(d, cls, label, i, image, caps, f"{spec.source_name(split)}:{int(item_idx)}")


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Create ``out`` (empty) or fail with one clear line."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputNotWritableError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputNotWritableError(f"output folder {out} is not empty (pass overwrite/--force to replace it)")
        if not (out / MANIFEST).is_file():
            raise OutputNotWritableError(f"refusing to clear {out}: it is not a benchmark built here (no {MANIFEST})")
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputNotWritableError(f"cannot write to output folder {out}: {exc.strerror or exc}") from None


def ensure_benchmark(name: str, out: Path, *, seed: int = 0, split: str = "client", size: str = "full",
                     announce: bool = False) -> Path:
    """``out``, with split ``split`` of ``name`` built there unless a finished build (its
    ``benchmark.json``) already is: the step every command that defaults to the offline data
    starts with, so a second run reuses the pictures."""
    out = Path(out)
    if not (out / "benchmark.json").is_file():
        if announce:
            print(f"building the offline {name} benchmark ({split} split, {size}) into {out}", flush=True)
        build_benchmark(name, out, seed=seed, split=split, size=size, overwrite=True)
    return out


def build_benchmark(name: str, out: Path, *, seed: int = 0, split: str = "client", size: str = "full",
                    per_class: int | None = None, overwrite: bool = False) -> BuildReport:
    """Write split ``split`` of benchmark ``name`` to ``out`` in DomainBed layout.

    Layout: ``out/<domain>/<class>/<nnnnn>.png``, plus ``benchmark.json`` (this report, with the
    class names) and, for the vendor split, ``captions.jsonl`` (``{"path", "captions"}`` lines).
    Argument errors are raised before anything is written.
    """
    spec, n = _resolve(name, split, size, per_class)
    out = Path(out)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InvalidArgumentError(f"seed must be an integer, got {seed!r}")
    spec.items(split)  # fail on a missing source before touching the output
    BackgroundPool.for_split(split)
    _prepare_out(out, overwrite)
    start = time.perf_counter()
    counts: dict[str, dict[str, int]] = {d: {c.key: 0 for c in spec.classes} for d in spec.domains_for(split)}
    cap_lines: list[str] = []
    for s in iter_samples(name, split=split, seed=seed, size=size, per_class=n):
        folder = out / s.domain / s.cls.key
        if s.index == 0:
            folder.mkdir(parents=True, exist_ok=True)
        rel = f"{s.domain}/{s.cls.key}/{s.index:05d}.png"
        s.image.save(out / rel, format="PNG", compress_level=1)
        counts[s.domain][s.cls.key] += 1
        if split == "vendor":
            cap_lines.append(json.dumps({"path": rel, "captions": s.captions}))
    if cap_lines:
        (out / CAPTIONS).write_text("\n".join(cap_lines) + "\n", encoding="utf-8")
    report = BuildReport(
        name=spec.name, split=split, seed=seed, out=str(out), image_size=spec.image_size, per_class=n,
        domains=list(spec.domains_for(split)), classes=[c.key for c in spec.classes],
        class_names=[c.name for c in spec.classes], n_images=sum(sum(v.values()) for v in counts.values()),
        seconds=round(time.perf_counter() - start, 2), counts=counts)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    return report
