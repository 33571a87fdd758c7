"""The Distill stage under torchrun: 2 CPU processes (gloo) end with identical weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from client_distiller.data import DomainBedFolder
from client_distiller.distributed import save_method_state
from client_distiller.methods import get_method
from client_distiller.targets import TeacherTargets
from tests.client_fixtures import (TEST_DOMAIN, TINY_STUDENT, bench_targets, one_thread, tiny_bench,  # noqa: F401
                                   tiny_clip, tiny_student)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distill_under_torchrun_two_processes(tiny_bench: Path, bench_targets: TeacherTargets, tmp_path: Path) -> None:
    targets_dir = bench_targets.save(tmp_path / "targets")
    init = get_method("vl2v-adip")(tiny_student(), 10, bench_targets)
    init_file = save_method_state(init, tmp_path / "align_state.safetensors")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "client_distiller.distributed",
           "--data-root", str(tiny_bench), "--test-domain", TEST_DOMAIN, "--targets", str(targets_dir),
           "--student", TINY_STUDENT, "--no-pretrained", "--image-size", "32", "--stages", "distill",
           "--init", str(init_file), "--steps", "3", "--batch-size", "4", "--eval-every", "2", "--keep", "last",
           "--hparams", '{"lr": 0.01}', "--out", str(out), "--save-every-rank"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    start = load_file(str(init_file))
    assert r0.keys() == r1.keys() == start.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    assert any(not torch.equal(r0[k], start[k]) for k in r0 if k.startswith("backbone.")), "backbone did not train"
    assert all(torch.equal(r0[k], start[k]) for k in r0 if k.startswith("head.")), "projection must stay frozen"
    assert (out / "student" / "config.json").is_file() and (out / "history.json").is_file()
