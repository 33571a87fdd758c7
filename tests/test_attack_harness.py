"""The attack harness end to end at tiny scale: it starts its own vendor (a real `vendor-api
serve` with embedded Redis and the tiny teacher), runs every attack against a few modes and writes
the table; the numbers say what each mode stops."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_harness():
    spec = importlib.util.spec_from_file_location("attack_harness", ROOT / "experiments" / "attack_harness.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["attack_harness"] = module  # its dataclasses look their module up
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_the_harness_runs_every_attack_against_each_mode_and_writes_the_table(tmp_path):
    harness = load_harness()
    out = tmp_path / "attacks.md"
    modes = ["none", "noise:0.5", "rotate", "watermark", "probabilities:5"]
    assert harness.main(["--out", str(out), "--shared", "40", "--modes", *modes,
                         "--data-dir", str(tmp_path / "vendor")]) == 0
    table = out.read_text()
    for spec in modes:
        assert f"| `{spec}` |" in table
    results = json.loads(out.with_suffix(".json").read_text())
    assert set(results) == set(modes) and all(set(r) == set(harness.ATTACKS) for r in results.values())
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
    # the watermark: a student of the marked key is detected, a clean student is not
    assert marked["watermark"]["value"] < 0.001 and marked["watermark"]["clean_student"] > 0.001
    assert probs["fidelity"]["value"] is None and probs["sybil"]["value"] is None
