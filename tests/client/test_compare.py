"""`client-distill compare` end to end at tiny scale: a real vendor on 127.0.0.1, the tiny offline
benchmark, a random-init tiny student; then the rerun resumes (no training, no spending)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

from client_distiller.cli import main
from client_distiller.commands.compare import Row, compare_markdown
from client_distiller.reporting.evaluate import read_jsonl
from tests.support.client import TINY_STUDENT, one_thread  # noqa: F401  (one_thread: autouse in this module)


def test_compare_end_to_end_and_resume(vendor, tiny_bench: Path, tmp_path: Path, capsys) -> None:
    key = vendor.create_key(quota=2000)
    out = tmp_path / "cmp"
    argv = ["compare", "--vendor-url", vendor.base_url, "--api-key", key, "--data", str(tiny_bench),
            "--method", "kd", "--method", "dime-fm", "--method", "vl2v-sd", "--test-domain", "sketch",
            "--test-domain", "photo", "--seeds", "0", "1", "--student", TINY_STUDENT, "--random-init",
            "--steps", "2", "--batch-size", "4", "--image-size", "32", "--eval-every", "2", "--bank-size", "30",
            "--budget", "1500", "--eval-budget", "300", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    t0 = time.perf_counter()
    assert main(argv) == 0
    first = time.perf_counter() - t0
    printed = capsys.readouterr().out
    assert "skipping vl2v-sd: white-box" in printed
    spent = vendor.account().spent
    assert 0 < spent <= 1800

    records = read_jsonl(out / "results.jsonl")
    trained = {(r["method"], r["test_domain"], r["seed"]) for r in records if r["method"] != "teacher-zero-shot"}
    assert trained == {(m, d, s) for m in ("kd", "dime-fm") for d in ("sketch", "photo") for s in (0, 1)}
    dime = next(r for r in records if r["method"] == "dime-fm")
    kd = next(r for r in records if r["method"] == "kd")
    assert dime["units_spent"] == kd["units_spent"] + 30      # the sentence bank is dime-fm's alone

    md = (out / "compare.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert header == "| Method | sketch | photo | Avg | ID avg | Units |"
    for title in ("Teacher zero-shot", "KD student", "DIME-FM student"):
        assert f"| {title} |" in md
    assert "±" in md and "vl2v-sd skipped" in md and "client-distill compare" in md
    assert key not in md and "--api-key $CLIENT_API_KEY" in md    # the reproducing command, never the key
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert {(r["method"], r["test_domain"]) for r in rows} >= {("kd", "sketch"), ("dime-fm", "avg")}
    assert all(r["n_seeds"] == "2" for r in rows if r["test_domain"] == "sketch")

    # resumed: nothing is trained again and nothing is bought again
    t0 = time.perf_counter()
    assert main(argv) == 0
    assert time.perf_counter() - t0 < first
    assert vendor.account().spent == spent
    assert len(read_jsonl(out / "results.jsonl")) == len(records)
    assert (out / "compare.md").read_text() == md


def test_compare_table_means_and_standard_errors() -> None:
    rows = [Row("kd", {"a": [0.5, 0.7], "b": [0.2]}, {"a": [0.9], "b": [0.8]}, 120.0),
            Row("erm", {"a": [0.4], "b": []}, {"a": [0.6], "b": []}, 0.0)]
    lines = compare_markdown(rows, ["a", "b"]).splitlines()
    assert lines[2] == "| KD student | 60.0 ± 10.0 | 20.0 | 40.0 | 85.0 | 120 |"
    assert lines[3] == "| ERM student | 40.0 | - | - | - | 0 |"


def test_compare_without_a_vendor_is_a_usage_error(tiny_bench: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("CLIENT_VENDOR_URL", raising=False)
    monkeypatch.delenv("CLIENT_API_KEY", raising=False)
    assert main(["compare", "--data", str(tiny_bench), "--out", str(tmp_path / "x")]) == 2
    assert "--local" in capsys.readouterr().err


def test_select_methods_skips_what_cannot_run_with_reasons() -> None:
    from client_distiller.commands.compare import select_methods

    run, skipped = select_methods(None, teacher_weights=None)
    assert run == ["erm", "kd", "vl2v-adip", "clip-kd", "dime-fm"] and set(skipped) == {"vl2v-sd"}
    run, skipped = select_methods(None, teacher_weights="local-dir:/t", output="probabilities")
    assert run == ["erm", "kd"] and "class_texts" in skipped["vl2v-sd"] and "sentences" in skipped["dime-fm"]
    assert select_methods(["vl2v-sd"], teacher_weights="local-dir:/t") == (["vl2v-sd"], {})


def test_compare_runs_vl2v_sd_from_teacher_weights(vendor, tiny_bench: Path, tiny_teacher_dir: Path,
                                                  tmp_path: Path) -> None:
    from client_distiller.deployed import DistilledStudent

    key = vendor.create_key(quota=2000)
    out = tmp_path / "sd"
    assert main(["compare", "--vendor-url", vendor.base_url, "--api-key", key, "--data", str(tiny_bench),
                 "--method", "vl2v-sd", "--teacher-weights", f"local-dir:{tiny_teacher_dir}", "--test-domain",
                 "sketch", "--seeds", "0", "--steps", "1", "--batch-size", "2", "--image-size", "32",
                 "--eval-every", "1", "--budget", "1000", "--eval-budget", "0",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    (record,) = [r for r in read_jsonl(out / "results.jsonl") if r["method"] == "vl2v-sd"]
    assert record["ood_acc"] is not None and "| VL2V-SD student |" in (out / "compare.md").read_text()
    student = DistilledStudent.load(out / "students" / "sketch" / "vl2v-sd")
    assert student.config["backbone"]["kind"] == "open_clip_visual"


def test_a_run_folder_refuses_records_from_another_teacher(tmp_path: Path) -> None:
    """Resuming a compare must not average two teachers: the demo teacher built on another CPU
    answers differently, and its earlier records would be mixed into this one's table."""
    import torch
    import torch.nn.functional as F

    from client_distiller.commands.compare import CompareError, check_same_teacher
    from client_distiller.lodo import RESULTS_FILE
    from client_distiller.targets import TeacherTargets

    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(3, 16, generator=g), dim=-1)
    image = F.normalize(torch.randn(16, generator=g), dim=0)
    mine = TeacherTargets(["a", "b", "c"], text, {"/x.png": image}, 20.0, "t")
    check_same_teacher(tmp_path, mine)  # an empty folder: nothing to protect
    mine.save(tmp_path / "targets")
    (tmp_path / RESULTS_FILE).write_text('{"method": "erm"}\n')
    check_same_teacher(tmp_path, mine)  # the same answers: resuming is fine
    noisy = TeacherTargets(["a", "b", "c"], F.normalize(text + 1e-6, dim=-1), {"/x.png": image}, 20.0, "t")
    check_same_teacher(tmp_path, noisy)  # float noise is not another teacher
    other = TeacherTargets(["a", "b", "c"], text, {"/x.png": F.normalize(image + 0.05 * torch.randn(16, generator=g),
                                                                          dim=0)}, 20.0, "t")
    with pytest.raises(CompareError, match="another teacher"):
        check_same_teacher(tmp_path, other)
    with pytest.raises(CompareError, match="another teacher"):
        check_same_teacher(tmp_path, TeacherTargets(["a", "b", "z"], text, {}, 20.0, "t"))
