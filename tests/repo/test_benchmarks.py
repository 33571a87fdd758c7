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


def test_class_list_codes_reports_every_band_layout(tmp_path: Path, monkeypatch) -> None:
    """The script behind the class-list limit's choice of bands, on the tiny offline benchmark."""
    from offline_data import build_benchmark

    build_benchmark("fashion-domains", tmp_path / "data", seed=0, split="client", size="tiny")
    out = tmp_path / "codes.md"
    module = _script("class_list_codes")
    monkeypatch.setattr(sys, "argv", ["class_list_codes.py", "--data", str(tmp_path / "data"),
                                      "--out", str(out), "--items", "6"])
    module.main()
    rows = [line for line in out.read_text().splitlines() if line[:3] in {f"| {n}" for n in range(1, 10)}]
    assert len(rows) == len(module.LAYOUTS) and "(default)" in rows[1]
    assert rows[0].split("|")[2].strip() != ""  # JPEG q=90 column filled
