"""`client-distill experiment` end to end at tiny scale: a real vendor process on 127.0.0.1 (its own
embedded Redis, the tiny seeded teacher), 3 protection modes x 2 budgets x 2 seeds, then the
resumability contract: a finished sweep reruns for 0 units and adds no rows; a run whose row was
lost is redone from the cache for free."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from client_distiller.buying.local_vendor import LocalVendor
from client_distiller.cli import main
from client_distiller.reporting.sweep_report import budget_to_target, summary_markdown
from tests.support.client import one_thread  # noqa: F401  (one_thread: autouse in this module)

MODES = ("none", "noise:0.1", "probabilities:3")
PROMPTS = 70  # 10 classes x 7 templates, bought by embedding keys only


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "runs.csv", newline="") as f:
        return list(csv.DictReader(f))


def _vendor_spent(out: Path) -> dict[str, int]:
    """Units each key spent, as the vendor's own ledger says (read with `vendor-admin list`)."""
    listing = LocalVendor(out / "vendor").admin("list")
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\S+): quota=\d+ spent=(\d+)", listing, re.M)}


def test_small_sweep_end_to_end_then_resumes_for_free(tiny_bench, tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["experiment", "--quick", "--out", str(out), "--data", str(tiny_bench),
            "--teacher", f"local-dir:{tiny_teacher_dir}", "--modes", ",".join(MODES), "--budgets", "80,110",
            "--publish", str(tmp_path / "results" / "protection_sweep.md")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "12 runs made, 0 already" in printed

    rows = _rows(out)
    assert sorted((r["mode"], int(r["budget"]), int(r["seed"])) for r in rows) == sorted(
        (m, b, s) for m in MODES for b in (80, 110) for s in (0, 1))
    for r in rows:
        budget, spent = int(r["budget"]), int(r["units_spent"])
        assert spent == budget  # every unit of each budget bought targets, none past it
        # Budgets grow by prefixes: the larger budget paid only its difference, the rest came from the cache.
        assert int(r["units_new"]) == (budget if budget == 80 else 30)
        assert 0.0 <= float(r["ood_acc"]) <= 1.0 and 0.0 <= float(r["id_acc"]) <= 1.0
        if r["mode"] == "probabilities:3":
            assert r["method"] == "kd" and int(r["images_bought"]) == budget and r["fidelity"] == ""
        else:
            assert r["method"] == "vl2v-adip" and int(r["images_bought"]) == budget - PROMPTS
            assert -1.0 <= float(r["fidelity"]) <= 1.0 and int(r["fidelity_dims"]) == int(r["embedding_dim"])
    spent = _vendor_spent(out)
    sweep_keys = {k: v for k, v in spent.items() if not k.endswith("clean-eval")}
    assert len(sweep_keys) == 6 and set(sweep_keys.values()) == {110}  # one key per (mode, seed), quota = max

    summary = (out / "summary.md").read_text()
    for mode in MODES:
        for budget in (80, 110):
            assert re.search(rf"^\| `{re.escape(mode)}` \| \S+ \| {budget} \|", summary, re.M), (mode, budget)
    assert "Budget needed to reach 90% of the unprotected OOD accuracy" in summary
    assert f"client-distill experiment --out {out} --modes {','.join(MODES)} --budgets 80,110 --seeds 0,1" in summary
    png = (out / "ood_vs_units.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5_000
    published = (tmp_path / "results" / "protection_sweep.md").read_text()
    assert "](protection_sweep.png)" in published and (tmp_path / "results" / "protection_sweep.png").is_file()
    assert not list(out.glob("runs/*/students"))  # students are measured, then dropped (--keep-students keeps them)

    # A finished sweep: nothing runs, nothing is bought, no row is added.
    assert main(args) == 0
    assert "0 runs made, 12 already" in capsys.readouterr().out
    assert _rows(out) == rows and _vendor_spent(out) == spent

    # A run whose row was lost (killed before writing it) is redone, its purchases from the cache.
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows[:-1])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 runs made, 11 already" in printed and "0 units spent by this invocation" in printed
    redone = _rows(out)
    assert len(redone) == 12 and redone[-1]["units_new"] == "0" and redone[-1]["units_spent"] == rows[-1]["units_spent"]
    assert _vendor_spent(out) == spent

    # Extending the sweep with a larger budget tops the keys up and pays only for the difference.
    wider = [a if a != "80,110" else "80,110,140" for a in args]
    wider[wider.index("--modes") + 1] = "none"
    assert main(wider) == 0
    printed = capsys.readouterr().out
    assert "2 runs made, 4 already" in printed and "60 units spent by this invocation" in printed
    added = [r for r in _rows(out) if r["budget"] == "140"]
    assert [(r["units_spent"], r["units_new"]) for r in added] == [("140", "30")] * 2


def test_watermark_and_b4b_runs_carry_their_measurements(tiny_bench, tiny_teacher_dir, tmp_path, capsys):
    """The mode-specific columns come from the vendor itself: its watermark test on the student's
    embeddings of the held-out images, and the b4b state of the key after the run."""
    out = tmp_path / "sweep"
    assert main(["experiment", "--quick", "--out", str(out), "--data", str(tiny_bench),
                 "--teacher", f"local-dir:{tiny_teacher_dir}", "--modes", "watermark,b4b,rotate",
                 "--budgets", "110", "--seeds", "0"]) == 0
    rows = {r["mode"]: r for r in _rows(out)}
    assert 0.0 <= float(rows["watermark"]["watermark_p_value"]) <= 1.0
    assert rows["watermark"]["watermark_detected"] in ("True", "False") and rows["b4b"]["watermark_p_value"] == ""
    assert 0.0 < float(rows["b4b"]["b4b_coverage"]) <= 1.0 and float(rows["b4b"]["b4b_noise"]) >= 0.0
    # rotate pads its output: the student learns the rotated space, compared on the shared dimensions.
    assert int(rows["rotate"]["embedding_dim"]) > int(rows["rotate"]["fidelity_dims"])
    capsys.readouterr()


def test_other_settings_in_the_same_folder_are_refused(tiny_bench, tmp_path, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "experiment.json").write_text('{"settings": {"steps": 999}}')
    assert main(["experiment", "--quick", "--out", str(out), "--data", str(tiny_bench)]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds a sweep made with other settings" in err and "\n" not in err


@pytest.mark.parametrize("flag,needle", [
    (["--method-for", "noise=nope"], "unknown method 'nope'"),
    (["--method-for", "rotate=kd"], "names modes that are not swept"),
    (["--budgets", "a,b"], "expected comma-separated integers"),
    (["--modes", "none,bogus:1"], "unknown protection mode 'bogus'"),
    (["--modes", "noise:-1"], "noise:-1: parameter must be in"),
])
def test_bad_sweep_arguments_are_one_line(tiny_bench, tmp_path, capsys, flag, needle):
    try:
        code = main(["experiment", "--quick", "--out", str(tmp_path / "s"), "--data", str(tiny_bench), *flag])
    except SystemExit as exc:  # argparse's own errors exit from the parser
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not (tmp_path / "s" / "vendor").exists()  # refused before a vendor was started


def test_budget_to_target_and_standard_errors():
    rows = [{"mode": "none", "budget": 100, "seed": s, "method": "vl2v-adip", "ood_acc": a, "units_spent": 100}
            for s, a in ((0, 0.5), (1, 0.7))]
    rows += [{"mode": "noise:0.1", "budget": b, "seed": 0, "method": "vl2v-adip", "ood_acc": a, "units_spent": b}
             for b, a in ((50, 0.4), (100, 0.55))]
    rows += [{"mode": "rotate", "budget": 100, "seed": 0, "method": "vl2v-adip", "ood_acc": 0.1, "units_spent": 100}]
    target, reached = budget_to_target(rows)
    assert target == pytest.approx(0.9 * 0.6)
    assert reached == {"none": "100 (100 units spent)", "noise:0.1": "100 (100 units spent)", "rotate": "not reached"}
    table = summary_markdown(rows)
    assert "| `none` | vl2v-adip | 100 | 100 | - | 60.0 ± 10.0 |" in table
