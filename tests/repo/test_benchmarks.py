"""The benchmark scripts keep working against today's APIs: each one's cheapest building block
runs here for real (a real Redis), so a refactor that breaks a script fails CI instead of the
next person who tries to reproduce a committed number. Timings are not checked."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _script(name: str) -> ModuleType:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the scripts import their sibling `_report`
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_vendor_throughput_times_the_metering_scripts(redis_url: str) -> None:
    timings = asyncio.run(_script("vendor_throughput").lua_overhead(redis_url, 3, 64))
    assert {k: len(v) for k, v in timings.items()} == {"debit": 3, "settle": 3,
                                                       "debit + settle, with Idempotency-Key": 3}
    assert all(t > 0 for series in timings.values() for t in series)
