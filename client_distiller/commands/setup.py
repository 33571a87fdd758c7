"""The steps the commands share before any training: the offline benchmark, a local vendor
serving the demo teacher with a fresh key, and the vendor/budget arguments (the command line that
reproduces a table is `reporting.command_line`).

``demo`` and ``compare --local`` meet the vendor exactly as a paying client would (a separate
`vendor-api serve` process on 127.0.0.1, a key made by `vendor-admin`), so this module only
arranges that meeting; it never imports the vendor's code.
"""

from __future__ import annotations

import argparse
import contextlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from client_distiller.buying.local_vendor import LocalVendor
from client_distiller.commands.argtypes import non_negative_int
from client_distiller.data import OFFLINE_BENCHMARK
from client_distiller.settings import ClientSettings

DEMO_WORKDIR = Path("var/demo")


def offline_benchmark(workdir: Path, size: str) -> Path:
    """The client split of the offline benchmark under ``workdir/data-<size>``, built on first use."""
    from offline_data import ensure_benchmark

    return ensure_benchmark(OFFLINE_BENCHMARK, workdir.resolve() / f"data-{size}", seed=0, split="client",
                            size=size)


@dataclass(frozen=True)
class LocalAccess:
    """A running local vendor and what a client needs to buy from it."""

    vendor: LocalVendor
    url: str
    api_key: str
    teacher_weights: str  # open_clip spec of the demo teacher, for the white-box methods (vl2v-sd)


@contextlib.contextmanager
def local_vendor(workdir: Path, *, teacher_size: str, quota: int, key_prefix: str) -> Iterator[LocalAccess]:
    """Build the demo teacher once (cached in ``workdir/vendor``), start the vendor, create a key
    with ``quota`` units; the vendor stops when the block ends."""
    vendor = LocalVendor(workdir.resolve() / "vendor")
    vendor.build_demo_teacher(size=teacher_size)
    with vendor:
        key = vendor.create_key(f"{key_prefix}-{uuid.uuid4().hex[:8]}", quota=quota)
        yield LocalAccess(vendor, vendor.url, key, f"local-dir:{vendor.data_dir / 'demo-teacher'}")


def add_vendor_arguments(parser: argparse.ArgumentParser) -> None:
    """Which vendor, which key, how many units: each also settable as a ``CLIENT_*`` variable."""
    parser.add_argument("--vendor-url", help="vendor base URL (CLIENT_VENDOR_URL)")
    parser.add_argument("--api-key", help="vendor API key (CLIENT_API_KEY)")
    parser.add_argument("--budget", type=non_negative_int, help="hard ceiling on units for training targets (CLIENT_BUDGET)")
    parser.add_argument("--eval-budget", type=non_negative_int,
                        help="separate ceiling for the teacher zero-shot row (CLIENT_EVAL_BUDGET)")
    parser.add_argument("--cache-dir", type=Path, help="embedding cache (CLIENT_CACHE_DIR)")


def client_settings(args: argparse.Namespace, **fallbacks: object) -> ClientSettings:
    """Flags over ``CLIENT_*`` variables over ``fallbacks`` over the defaults."""
    flags = {"vendor_url": args.vendor_url, "api_key": args.api_key, "budget": args.budget,
             "eval_budget": args.eval_budget, "cache_dir": args.cache_dir,
             "selection": getattr(args, "selection", None)}
    given = {k: v for k, v in flags.items() if v is not None}
    env = ClientSettings()
    chosen = {k: v for k, v in fallbacks.items() if k not in given and k not in env.model_fields_set}
    return ClientSettings(**{**chosen, **given})
