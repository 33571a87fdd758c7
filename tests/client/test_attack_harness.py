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
                         "--data-dir", str(tmp_path / "vendor"), "--sweep", str(sweep), "--watermark-keys", "3",
                         "--popular", "0", "20", "--honest-keys", "4", "--flag-modes", "watermark"]) == 0
    table = out.read_text()
    for spec in modes:
        assert f"| `{spec}` |" in table
    published = json.loads(out.with_suffix(".json").read_text())
    results, flags = published["modes"], published["overlap_false_flags"]
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
    # classifications: capped at 5 rounded classes (3 decimals); 25 class lists per image for every key
    assert all(results[m]["invert"]["classes_returned"] == 5 and results[m]["invert"]["decimals"] == 3
               and results[m]["invert"]["adaptive_queries"] == 25 for m in modes)
    # plain least squares on the adaptive answers recovers nothing (cos ~0.01: the first harness's
    # column); the strong solver with the attacker's prior recovers the image from the same answers,
    # and designed lists as well: top-5 at 3 decimals does not stop an adaptive attacker
    for m in ("none", "probabilities:5"):
        inv = results[m]["invert"]
        assert inv["random_lists"]["plain"]["centred"] < 0.3 and inv["random_lists"]["plain"]["cos"] < 0.5
        assert inv["random_lists"]["prior"]["centred"] > 0.9 and inv["adaptive_centred"] > 0.9
        assert inv["adaptive"] > 0.99 and inv["prior_only"]["centred"] < 0.3  # not the prior alone
        assert len(inv["curve"]) == 25
    # rotate is an isometry: its classifications invert to the clean embedding like `none`'s
    assert rotate["invert"]["adaptive_centred"] > 0.9 and rotate["invert"]["prompt_rows"] == "clean"
    # noise: the answers pin down the key's noisy embedding, no closer to the clean one than its own answer
    assert noise["invert"]["prompt_rows"] == "own key"
    assert noise["invert"]["adaptive_centred"] < noise["invert"]["own_answer"]["centred"] + 0.1 < 0.6
    # the watermark: a student of the marked key is detected, a clean student is not; both strippings
    # (fine-tuning on clean answers, WARDEN's CSE) are measured, and CSE costs the student fidelity
    wm = marked["watermark"]
    assert wm["value"] < 0.001 and wm["clean_student"] > 0.001 and wm["clean_student_cse"] > 0.001
    assert set(wm["finetune"]) == {"25", "100", "300"} and set(wm["cse"]) == {"4", "16"}
    assert wm["cse"]["16"]["fidelity"] < wm["student_fidelity"] and wm["student_fidelity"] > 0.9
    assert wm["finetune_twin"]["p_twin"] < 0.001  # fine-tuned on another marked key: that key's mark shows
    # every one of 3 keys (own secret directions each): its student detected at p < 0.01 after stripping,
    # clean students and the other keys' students not (p uniform under the null: 1e-4 keeps this test stable)
    assert len(wm["keys"]) == 3 and len(wm["cross"]) == 6
    keys = wm["keys"].values()
    assert all(k["value"] < 0.001 and max(v["p"] for v in k["cse"].values()) < 0.01 for k in keys)
    # fine-tuning on a few clean answers (25, 100: fewer than the 300 marked ones) sometimes strips a
    # key (in-process, 1 of 40 random keys above 0.01 after 25 answers): at most one of the 3 here.
    # The refit on 300 clean answers is reported apart and not asserted (5 of 32 keys stripped so far).
    # The harness derives its keys from their names, so on one machine type this run is the same every
    # time; the margins are for other CPUs' floating point
    assert sum(k["after_strip"] >= 0.01 for k in keys) <= 1 and all("after_refit" in k for k in keys)
    assert wm["min_clean_student_p"] > 1e-4 and wm["min_cross_p"] > 1e-4
    assert "## Watermark, per key (`watermark`, 3 keys)" in table
    assert probs["fidelity"]["value"] is None and probs["sybil"]["value"] is None
    # false flags: with plain counts, 4 honest keys sharing 20 popular images were all flagged at the
    # default threshold of 20; weighted (1 / 3 per image asked by 4 keys) none is, while sybil pairs
    # sharing 50 / 200 are. A ring of 4 sybils sharing 50 scores 50 / 3 per pair (the price), 200: flagged
    rows = flags["modes"]["watermark"]
    assert flags["threshold"] == 20 and rows["honest"]["0"]["flagged"] == 0
    assert rows["honest"]["20"]["flagged"] == 0 and rows["honest"]["20"]["max_shared"] == 20
    # 20 / 3 from the exact images; near-duplicates among the tiny teacher's images add a little (7.5 measured)
    assert 20 / 3 - 1e-3 <= rows["honest"]["20"]["max_score"] < 10
    assert rows["sybil"]["50"]["flagged"] and rows["sybil"]["200"]["flagged"] and rows["sybil"]["200"]["shared"] == 200
    assert rows["ring"]["50"]["flagged"] == 0 and rows["ring"]["200"]["flagged"] == rows["ring"]["200"]["pairs"] == 6
    assert "## False flags of `vendor-admin suspects`" in table and "## Inverting classification answers" in table
