"""`client-distill` end to end against a real vendor on 127.0.0.1: the budget holds, a second
run spends nothing, a killed run resumes without paying twice, and every failure is one line."""

from __future__ import annotations

import os

import pytest

from client_distiller.cli import main
from client_distiller.data import DomainBedFolder
from client_distiller.deployed import DistilledStudent
from tests.support.client import PROMPTS, TRAIN_IMAGES, distill_argv, one_thread  # noqa: F401  (one_thread: autouse in this module)
from tests.conftest import free_port

def test_distill_end_to_end_within_budget_then_free_second_run(vendor, tiny_bench, tmp_path, capsys):
    key = vendor.create_key(quota=10_000)
    budget = PROMPTS + 40
    assert main(distill_argv(vendor, key, tiny_bench, tmp_path / "run1", tmp_path / "cache", budget,
                      "--eval-budget", "30")) == 0
    out = capsys.readouterr().out
    assert "VL2V-ADiP student OOD" in out and "ERM student OOD" in out and "Teacher zero-shot OOD" in out
    assert "units spent: training 110 of 110, evaluation 30 of 30; images bought 40 of 144" in out
    assert "deployed student:" in out and "ms/image" in out
    assert (tmp_path / "run1" / "results.png").stat().st_size > 5_000
    spent = vendor.account().spent
    assert spent == budget + 30  # every unit of both budgets used, none past them
    student = DistilledStudent.load(tmp_path / "run1" / "students" / "sketch" / "vl2v-adip")
    sketch = DomainBedFolder.scan(tiny_bench).files["sketch"][0][0]
    prediction = student.predict([sketch])[0]
    assert prediction.label in DomainBedFolder.scan(tiny_bench).class_names
    assert main(distill_argv(vendor, key, tiny_bench, tmp_path / "run1", tmp_path / "cache", budget,
                      "--eval-budget", "30")) == 0
    assert vendor.account().spent == spent  # the identical rerun: everything came from the cache
    capsys.readouterr()
    # A new run (its own ledger and budget) sharing the cache pays only for what is not cached: the
    # 70 prompts and 40 images are free, so 104 units buy the other 104 of the 144 training images.
    assert main(distill_argv(vendor, key, tiny_bench, tmp_path / "run2", tmp_path / "cache", budget + 4)) == 0
    assert "units spent: training 104 of 114, evaluation 0 of 0; images bought 144 of 144" in capsys.readouterr().out
    assert vendor.account().spent == spent + 104


def test_budget_smaller_than_the_prompts_is_one_line_and_costs_nothing(vendor, tiny_bench, tmp_path, capsys):
    key = vendor.create_key(quota=10_000)
    assert main(distill_argv(vendor, key, tiny_bench, tmp_path / "run", tmp_path / "cache", PROMPTS - 1)) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("client-distill: error: buying 70 texts costs 70 units") and "\n" not in err
    assert vendor.account().spent == 0


@pytest.mark.parametrize("change,code,needle", [
    (lambda a: a.__setitem__(a.index("--api-key") + 1, "vk-wrong"), 1, "401 invalid_api_key"),
    (lambda a: a.__setitem__(a.index("--test-domain") + 1, "mars"), 2, "unknown domain 'mars'"),
    (lambda a: a.__setitem__(a.index("--vendor-url") + 1, f"http://127.0.0.1:{free_port()}"), 1, "unreachable"),
    (lambda a: a.extend(["--hparam", "vl2v-adip.nope=1"]), 2, "has no hyperparameter 'nope'"),
])
def test_bad_inputs_are_one_clear_line(vendor, tiny_bench, tmp_path, capsys, change, code, needle):
    key = vendor.create_key(quota=10_000)
    args = distill_argv(vendor, key, tiny_bench, tmp_path / "run", tmp_path / "cache", 500)
    change(args)
    os.environ["CLIENT_MAX_ATTEMPTS"] = "2"
    try:
        assert main(args) == code
    finally:
        del os.environ["CLIENT_MAX_ATTEMPTS"]
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert vendor.account().spent == 0
