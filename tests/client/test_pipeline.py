"""run_job end to end (real tiny teacher, real benchmark, real student), evaluation and tables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from client_distiller.data import DomainBedFolder, leave_one_out
from client_distiller.lodo import JobError, run_job
from client_distiller.reporting.evaluate import TEACHER_ZERO_SHOT, markdown_table, read_jsonl, teacher_zero_shot
from client_distiller.targets import TeacherTargets
from client_distiller.training.recipe import Schedule
from tests.support.client import TEST_DOMAIN, TINY_STUDENT, one_thread  # noqa: F401  (one_thread: autouse in this module)

JOB = dict(schedule=Schedule(TINY_STUDENT, pretrained=False, steps=3, batch_size=4, eval_every=3, image_size=32),
           show_progress=False, hparams={"erm": {"lr": 1e-2}, "vl2v-adip": {"align_lr": 1e-2, "lr": 1e-2}})


def test_run_job_end_to_end(tiny_bench: Path, bench_targets: TeacherTargets, tmp_path: Path) -> None:
    result = run_job(tiny_bench, TEST_DOMAIN, bench_targets, out_dir=tmp_path / "job", units={"units_spent": 321},
                     job_id="job-1", **JOB)
    methods = [r["method"] for r in result.records]
    assert methods == [TEACHER_ZERO_SHOT, "erm", "vl2v-adip"]
    for r in result.records:
        assert r["test_domain"] == TEST_DOMAIN and r["job_id"] == "job-1" and "units_spent" in r
        assert r["id_acc"] is not None and 0.0 <= r["id_acc"] <= 1.0 and 0.0 <= r["ood_acc"] <= 1.0
    assert result.record("erm")["units_spent"] == 0 and result.record("vl2v-adip")["units_spent"] == 321
    assert result.record("vl2v-adip")["image_target_coverage"] == 1.0
    assert result.ignored_test_targets == 60  # the fixture's targets cover the test domain: unused
    assert set(result.students) == {"vl2v-adip"} and (result.students["vl2v-adip"] / "model.safetensors").is_file()
    assert result.students["vl2v-adip"] == tmp_path / "job" / "students" / TEST_DOMAIN / "vl2v-adip"
    assert read_jsonl(tmp_path / "job" / "results.jsonl") == json.loads(json.dumps(result.records))
    table = (tmp_path / "job" / "results.md").read_text()
    assert table == result.table and f"| {TEST_DOMAIN} |" in table and "| 321 |" in table
    assert "VL2V-ADiP student OOD" in table


def test_run_job_never_uses_test_domain_image_targets(tiny_bench: Path, bench_targets: TeacherTargets,
                                                      tmp_path: Path) -> None:
    """Garbage teacher embeddings for the test domain (and for validation images) change nothing."""
    loo = leave_one_out(DomainBedFolder.scan(tiny_bench), TEST_DOMAIN)
    held_out = {str(p.resolve()) for p, _ in list(loo.test) + [x for s in loo.sources for x in s.val]}
    g = torch.Generator().manual_seed(0)
    poisoned = {k: (F.normalize(torch.randn(64, generator=g), dim=0) if k in held_out else v)
                for k, v in bench_targets.image_embeddings.items()}
    clean = {k: v for k, v in bench_targets.image_embeddings.items() if k not in held_out}
    kw = dict(JOB, methods=("vl2v-adip",))
    weights = []
    for name, images in (("poisoned", poisoned), ("clean", clean)):
        t = TeacherTargets(bench_targets.class_names, bench_targets.text_embeddings, images,
                           bench_targets.logit_scale, "t")
        r = run_job(tiny_bench, TEST_DOMAIN, t, out_dir=tmp_path / name, **kw)
        weights.append(load_file(str(r.students["vl2v-adip"] / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_run_job_rejects_targets_for_other_classes(tiny_bench: Path, bench_targets: TeacherTargets,
                                                   tmp_path: Path) -> None:
    t = TeacherTargets(list(reversed(bench_targets.class_names)), bench_targets.text_embeddings, {})
    with pytest.raises(JobError, match="do not match"):
        run_job(tiny_bench, TEST_DOMAIN, t, out_dir=tmp_path, **JOB)


def test_teacher_zero_shot_uses_only_bought_images(tmp_path: Path) -> None:
    text = torch.eye(3)
    imgs = {str(tmp_path / "a.png"): torch.tensor([1.0, 0, 0]), str(tmp_path / "b.png"): torch.tensor([0, 0, 1.0])}
    t = TeacherTargets(["x", "y", "z"], text, imgs)
    zs = teacher_zero_shot(t, [(tmp_path / "a.png", 0), (tmp_path / "b.png", 1), (tmp_path / "c.png", 2)])
    assert (zs.accuracy, zs.covered, zs.total) == (0.5, 2, 3)
    assert teacher_zero_shot(t, [(tmp_path / "c.png", 2)]).accuracy is None


def test_markdown_table_means_standard_errors_and_units() -> None:
    recs = [
        {"job_id": "j1", "test_domain": "sketch", "method": "erm", "id_acc": 0.5, "ood_acc": 0.2, "units_spent": 0},
        {"job_id": "j2", "test_domain": "sketch", "method": "erm", "id_acc": 0.7, "ood_acc": 0.4, "units_spent": 0},
        {"job_id": "j1", "test_domain": "sketch", "method": "vl2v-adip", "id_acc": 0.6, "ood_acc": 0.5,
         "units_spent": 100},
        {"job_id": "j3", "test_domain": "photo", "method": "vl2v-adip", "id_acc": 0.9, "ood_acc": 0.8,
         "units_spent": 50},
    ]
    lines = markdown_table(recs).splitlines()
    assert lines[0].startswith("| Test domain | Teacher zero-shot ID")
    rows = {ln.split(" | ")[0].strip("| "): ln for ln in lines[2:]}
    assert "| 60.0 ± 10.0 | 30.0 ± 10.0 | 60.0 | 50.0 | 100 |" in rows["sketch"]
    assert rows["photo"].endswith("| - | - | 90.0 | 80.0 | 50 |")
    assert rows["**avg**"].startswith("| **avg** | - | - | - | - | 75.0 | 65.0 |")


def test_a_trial_run_again_counts_once_in_the_table() -> None:
    """The main job run twice in one folder (as the README's second run does) appended the same
    seed's records again, and its table read "71.0 ± 0.0" as if two seeds had run: the table now
    keeps the last record per (test domain, method, seed), and real seeds still average."""
    from client_distiller.reporting.evaluate import latest_per_trial

    def rec(seed: int, ood: float, job: str) -> dict:
        return {"job_id": job, "test_domain": "sketch", "method": "erm", "seed": seed, "id_acc": 0.5, "ood_acc": ood}

    once = latest_per_trial([rec(0, 0.2, "a"), rec(0, 0.3, "b")])
    assert [r["job_id"] for r in once] == ["b"]
    row = markdown_table(once, methods=("erm",)).splitlines()[2]
    assert row == "| sketch | 50.0 | 30.0 | - |"
    seeds = markdown_table(latest_per_trial([rec(0, 0.2, "a"), rec(1, 0.4, "b"), rec(0, 0.2, "c")]),
                           methods=("erm",)).splitlines()[2]
    assert seeds == "| sketch | 50.0 ± 0.0 | 30.0 ± 10.0 | - |"


def test_a_free_rerun_in_the_same_folder_is_not_counted_twice() -> None:
    """Records carry the run folder's cumulative ledger total: a rerun that bought nothing new
    repeats it, and the table must still show what was spent, not twice that."""
    first = {"job_id": "j1", "test_domain": "sketch", "method": "vl2v-adip", "id_acc": 0.6, "ood_acc": 0.5,
             "units_spent": 1270}
    rerun = {**first, "job_id": "j2"}
    sketch = next(ln for ln in markdown_table([first, rerun]).splitlines() if ln.startswith("| sketch"))
    assert sketch.endswith("| 1270 |")
