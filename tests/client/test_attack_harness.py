"""The attack harness end to end at tiny scale: it starts its own vendor (a real `vendor-api
serve` with embedded Redis and the tiny teacher), runs every attack against a few modes and writes
the table; the numbers say what each mode stops."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_harness():
    spec = importlib.util.spec_from_file_location("attack_harness", ROOT / "studies" / "attack_harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["attack_harness"] = module  # its dataclasses look their module up
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_the_harness_runs_every_attack_against_each_mode_and_writes_the_table(tmp_path):
    harness = load_harness()
    out = tmp_path / "attacks.md"
    modes = ["none", "noise:0.5", "rotate", "watermark", "probabilities:5"]
    sweep = tmp_path / "sweep.md"  # the format `client-distill experiment --publish` writes (one mode only)
    sweep.write_text("# Protection sweep\n\n| Mode | Method | Budget | Units spent | Images bought | OOD acc | ID acc "
                     "| Fidelity | Watermark detected (p per seed) | B4B coverage | B4B noise | Seeds |\n"
                     "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
                     "| `none` | vl2v-adip | 100 | 100 | 30 | 38.3 ± 1.1 | 46.0 ± 1.7 | 0.210 ± 0.005 | n/a | n/a | n/a | 2 |\n"
                     "| `noise:0.1` | vl2v-adip | 100 | 100 | 30 | 38.5 ± 0.9 | 43.5 ± 0.2 | 0.187 ± 0.012 | n/a | n/a | n/a | 2 |\n")
    assert harness.main(["--out", str(out), "--shared", "40", "--modes", *modes,
                         "--data-dir", str(tmp_path / "vendor"), "--sweep", str(sweep)]) == 0
    table = out.read_text()
    for spec in modes:
        assert f"| `{spec}` |" in table
    results = json.loads(out.with_suffix(".json").read_text())
    assert set(results) == set(modes) and all(set(r) == set(harness.ATTACKS) | {"extraction"} for r in results.values())
    # extraction is read from the sweep's results, never run here: other parameters named, the rest "not run"
    assert "from results/protection_sweep.md" in table and "| `noise:0.5` |" in table
    assert "(`noise:0.1`) 38.5% / 0.19 @ 100 u" in table and results["rotate"]["extraction"]["rows"] == []
    assert table.count("| not run |") == 3  # rotate, watermark, probabilities:5
    assert "| legitimate client (`none` key, no attack) | 1.000 / 1.000 |" in table and "38.3% / 0.21 @ 100 u" in table
    none, noise, rotate, marked, probs = (results[m] for m in modes)
    assert none["fidelity"]["value"] > 0.9999 and rotate["fidelity"]["geometry"] > 0.9999
    # pixel-identical re-encodings and token-identical texts: averaging gains nothing
    assert abs(noise["re-encodings"]["value"] - noise["re-encodings"]["one"]) < 1e-6
    assert abs(noise["text variants"]["value"] - noise["text variants"]["one"]) < 1e-6
    assert noise["re-encodings"]["one"] < 0.95
    # rotate alone does not stop sybils sharing queries, but the vendor sees them
    assert rotate["sybil"]["before"] < 0.5 and rotate["sybil"]["value"] > 0.99 and rotate["sybil"]["flagged"]
    assert noise["sybil"]["flagged"] and noise["sybil"]["units"] > 0
    # classifications: capped at 5 rounded classes, they no longer invert to the embedding
    assert all(results[m]["invert"]["classes_returned"] == 5 for m in modes)
    assert all(results[m]["invert"]["value"] < 0.9 for m in modes)
    # the watermark: a student of the marked key is detected, a clean student is not; both strippings
    # (fine-tuning on clean answers, WARDEN's CSE) are measured, and CSE costs the student fidelity
    wm = marked["watermark"]
    assert wm["value"] < 0.001 and wm["clean_student"] > 0.001 and wm["clean_student_cse"] > 0.001
    assert set(wm["finetune"]) == {"25", "100", "300"} and set(wm["cse"]) == {"4", "16"}
    assert wm["cse"]["16"]["fidelity"] < wm["student_fidelity"] and wm["student_fidelity"] > 0.9
    assert wm["finetune_twin"]["p_twin"] < 0.001  # fine-tuned on another marked key: that key's mark shows
    # adaptive inversion (25 class lists per image) is measured for every key
    assert all(results[m]["invert"]["adaptive_queries"] == 25 for m in modes)
    assert probs["fidelity"]["value"] is None and probs["sybil"]["value"] is None
