"""DDP with 2 CPU processes (gloo, loopback): every registered method's loss on each rank equals the
one-process loss over the same global batch, the ranks end with identical weights, and under
``client-distill distill --nproc 2`` only rank 0 buys.

Why these equalities hold (``client_distiller/training/loop.py``, ``training/methods/base.py``): every rank draws
the one-process global batch of ``2 x batch_size`` images per domain and computes its half; the
features are gathered with a gradient, so the in-batch terms (CLIP-KD's CRD and ICL, DIME-FM's VL
and P-VL) see both ranks' images; DDP averages the gradients; BatchNorm is frozen. A method whose
loss skipped the gather would see only its rank's half and fail the loss comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from client_distiller.buying.ledger import Ledger
from client_distiller.commands.torchrun import main as distributed_main, save_method_state
from client_distiller.deployed import DistilledStudent
from client_distiller.targets import TeacherTargets
from client_distiller.training.loop import TrainingError, check_all_reached, global_order
from client_distiller.training.methods import METHODS, get_method
from tests.support.client import TEST_DOMAIN, TINY_STUDENT, one_thread, tiny_student  # noqa: F401  (one_thread: autouse in this module)
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
# Per method: a learning rate large enough that two steps move the weights visibly.
HPARAMS = {name: {"lr": 0.01, **({"align_lr": 0.01} if "align_lr" in cls.HPARAMS else {})}
           for name, cls in METHODS.items()}
LOSS_RTOL = 1e-4


def _torchrun(*args: str, timeout: float = 420) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return proc


def _losses(history_file: Path) -> list[float]:
    """The training loss of every step (the runs validate after every step)."""
    hist = json.loads(history_file.read_text())
    return [e["loss"] for s in hist["stages"] for e in s["evals"] if e["loss"] is not None]


def _logits(name: str, state: dict[str, torch.Tensor], targets: TeacherTargets, teacher_dir: Path) -> torch.Tensor:
    """Class scores of ``name`` with weights ``state`` on a fixed batch of random pixels."""
    cls = get_method(name)
    method = cls(cls.build_student(TINY_STUDENT, pretrained=False, teacher_weights=f"local-dir:{teacher_dir}"), 10,
                 targets if cls.needs else None)
    method.load_state_dict(state, strict=True)
    return method.eval().predict(torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1)))


@pytest.fixture(scope="module")
def ddp_targets(bench_targets: TeacherTargets) -> TeacherTargets:
    """The benchmark's white-box targets plus a seeded 24-sentence bank, so DIME-FM can run."""
    bank = F.normalize(torch.randn(24, bench_targets.embed_dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    return TeacherTargets(bench_targets.class_names, bench_targets.text_embeddings, bench_targets.image_embeddings,
                          bench_targets.logit_scale, bench_targets.teacher_id, sentence_embeddings=bank)


def test_global_order_restores_the_one_process_batch() -> None:
    # 2 domains x 2 ranks x 3 rows: rank-major local rows back into domain-major global rows
    local = {r: [f"d{d}r{r}k{k}" for d in range(2) for k in range(3)] for r in range(2)}
    gathered = local[0] + local[1]
    order = global_order(2, 3, 2)
    assert [gathered[i] for i in order] == [f"d{d}r{r}k{k}" for d in range(2) for r in range(2) for k in range(3)]


def test_a_parameter_outside_the_loss_is_named_before_ddp_fails(bench_targets: TeacherTargets) -> None:
    m = get_method("clip-kd")(tiny_student(), 10, bench_targets)
    stage = m.stage("distill")
    m.begin_stage(stage)
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    check_all_reached(m, stage)  # every trainable parameter reached: fine
    m.icl_scale.log_scale.grad = None
    with pytest.raises(TrainingError, match="icl_scale.log_scale.*may_leave_parameters_unused"):
        check_all_reached(m, stage)


@pytest.mark.slow
def test_every_method_under_ddp_matches_one_process_over_the_global_batch(
        tiny_bench: Path, ddp_targets: TeacherTargets, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    targets_dir = ddp_targets.save(tmp_path / "targets")
    common = ["--data-root", str(tiny_bench), "--test-domain", TEST_DOMAIN, "--targets", str(targets_dir),
              "--student", TINY_STUDENT, "--no-pretrained", "--image-size", "32", "--teacher-weights",
              f"local-dir:{tiny_teacher_dir}", "--steps", "2", "--eval-every", "1", "--keep", "last",
              "--hparams", json.dumps(HPARAMS), *[a for name in METHODS for a in ("--method", name)]]
    _torchrun("-m", "client_distiller.commands.torchrun", *common, "--batch-size", "2", "--out", str(tmp_path / "ddp"),
              "--save-every-rank")
    assert distributed_main([*common, "--batch-size", "4", "--out", str(tmp_path / "one")]) == 0
    for name in METHODS:
        ddp, one = tmp_path / "ddp" / name, tmp_path / "one" / name
        reference = _losses(one / "history.json")
        assert len(reference) == 2 * len(get_method(name).STAGES), name
        for rank in (0, 1):
            hist = json.loads((ddp / f"rank{rank}.history.json").read_text())
            assert (hist["rank"], hist["world_size"]) == (rank, 2)
            assert _losses(ddp / f"rank{rank}.history.json") == pytest.approx(reference, rel=LOSS_RTOL), \
                f"{name}: rank {rank}'s loss is not the one-process loss of the global batch"
        r0, r1 = load_file(str(ddp / "rank0.safetensors")), load_file(str(ddp / "rank1.safetensors"))
        single = load_file(str(one / "method_state.safetensors"))
        assert r0.keys() == r1.keys() == single.keys()
        assert all(torch.equal(r0[k], r1[k]) for k in r0), f"{name}: ranks diverged"
        # The trained functions agree. (Not every weight: a parameter whose gradient is exactly zero
        # in exact arithmetic, such as attention's key bias, gets rounding noise that Adam scales
        # up to ~lr in either run.)
        ddp_logits, one_logits = _logits(name, r0, ddp_targets, tiny_teacher_dir), \
            _logits(name, single, ddp_targets, tiny_teacher_dir)
        assert torch.allclose(ddp_logits, one_logits, rtol=1e-3, atol=1e-4), f"{name}: DDP and one process differ"


@pytest.mark.slow
def test_two_nodes_distill_stage_alone_keeps_the_projection_and_trains_the_backbone(
        tiny_bench: Path, bench_targets: TeacherTargets, tmp_path: Path) -> None:
    """The documented multi-node command (``torchrun --nnodes 2 --node_rank R --master_addr HOST``),
    two "nodes" of one process each on loopback, running the Distill stage from a saved state."""
    targets_dir = bench_targets.save(tmp_path / "targets")
    init = get_method("vl2v-adip")(tiny_student(), 10, bench_targets)
    init_file = save_method_state(init, tmp_path / "align_state.safetensors")
    out, port = tmp_path / "ddp", str(free_port())
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
         str(node), "--master_addr", "127.0.0.1", "--master_port", port, "-m", "client_distiller.commands.torchrun",
         "--data-root", str(tiny_bench), "--test-domain", TEST_DOMAIN, "--targets", str(targets_dir),
         "--student", TINY_STUDENT, "--no-pretrained", "--image-size", "32", "--stages", "distill",
         "--init", str(init_file), "--steps", "3", "--batch-size", "4", "--eval-every", "2", "--keep", "last",
         "--hparams", '{"lr": 0.01}', "--out", str(out), "--save-every-rank"],
        env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for proc in nodes:
        _, err = proc.communicate(timeout=420)
        assert proc.returncode == 0, err[-6000:]
    out = out / "vl2v-adip"
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    start = load_file(str(init_file))
    assert r0.keys() == r1.keys() == start.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "ranks diverged"
    assert any(not torch.equal(r0[k], start[k]) for k in r0 if k.startswith("backbone.")), "backbone did not train"
    assert all(torch.equal(r0[k], start[k]) for k in r0 if k.startswith("head.")), "projection must stay frozen"
    assert json.loads((out / "rank1.history.json").read_text())["world_size"] == 2
    assert (out / "student" / "config.json").is_file() and (out / "history.json").is_file()


@pytest.mark.slow
def test_distill_nproc_2_buys_once_on_rank_0_and_trains_like_one_process(vendor, tiny_bench: Path,
                                                                          tmp_path: Path, capsys) -> None:
    """``client-distill distill --nproc 2``: rank 0 alone buys (the other rank waits for its targets),
    the budget and the vendor's ledger are those of a one-process run, and training equals the
    one-process run at twice the per-process batch. CLIP-KD runs with ``icl_weight=0``, the ablation
    that leaves the ICL scale a zero gradient: DDP runs it without ``find_unused_parameters``."""
    from client_distiller.cli import main as cli_main
    from client_distiller.reporting.evaluate import read_jsonl

    budget = 10 * 7 + 40  # every class prompt (10 classes x 7 templates) and 40 training images

    def args(run: str, batch: int) -> list[str]:
        return ["distill", "--vendor-url", vendor.base_url, "--api-key", vendor.create_key(name=run, quota=10_000),
                "--budget", str(budget), "--data", str(tiny_bench), "--test-domain", TEST_DOMAIN,
                "--out", str(tmp_path / run), "--cache-dir", str(tmp_path / f"cache-{run}"), "--student", TINY_STUDENT,
                "--random-init", "--steps", "2", "--batch-size", str(batch), "--image-size", "32",
                "--eval-every", "2", "--method", "vl2v-adip", "--method", "clip-kd", "--hparam", "vl2v-adip.lr=0.01",
                "--hparam", "clip-kd.lr=0.01", "--hparam", "clip-kd.icl_weight=0"]

    proc = subprocess.run([sys.executable, "-m", "client_distiller.cli", *args("ddp", 2), "--nproc", "2"], env=ENV,
                          capture_output=True, text=True, timeout=420, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count("units spent: training 110 of 110") == 1  # rank 0 reports, alone
    assert "images bought 40 of 144" in proc.stdout
    assert cli_main(args("one", 4)) == 0
    assert "units spent: training 110 of 110" in capsys.readouterr().out
    for run in ("ddp", "one"):
        assert vendor.account(run).spent == budget
        ledger = Ledger(tmp_path / run / "ledger.sqlite")
        assert ledger.settled("train") == budget and not ledger.open_reservations("train")
        ledger.close()
    # the same paid requests as one buyer: a second rank buying concurrently would have sent more
    debits = {run: sorted(e["units"] for e in vendor.ledger(run) if e["event"] == "debit") for run in ("ddp", "one")}
    assert debits["ddp"] == debits["one"] and debits["ddp"]
    ddp = {r["method"]: r for r in read_jsonl(tmp_path / "ddp" / "results.jsonl")}
    one = {r["method"]: r for r in read_jsonl(tmp_path / "one" / "results.jsonl")}
    assert ddp.keys() == one.keys() and {"vl2v-adip", "clip-kd"} <= ddp.keys()
    for method in ("vl2v-adip", "clip-kd"):
        for k in ("id_acc", "ood_acc", "best_val_acc"):
            assert ddp[method][k] == one[method][k], (method, k)
        a = load_file(str(tmp_path / "ddp" / "students" / TEST_DOMAIN / method / "model.safetensors"))
        b = load_file(str(tmp_path / "one" / "students" / TEST_DOMAIN / method / "model.safetensors"))
        assert a.keys() == b.keys()
        # The deployed students' class scores, not raw weights: a parameter whose true gradient is
        # exactly zero gets rounding noise from the all-reduce, which Adam turns into updates of
        # about the learning rate, so single weights may differ while the function does not.
        probe = sorted(p for p in (tiny_bench / TEST_DOMAIN).rglob("*") if p.suffix in (".png", ".jpg"))[:16]
        students = [DistilledStudent.load(tmp_path / run / "students" / TEST_DOMAIN / method) for run in ("ddp", "one")]
        with torch.no_grad():
            scores = [st(st.pixels(probe)).float() for st in students]
        assert probe and torch.allclose(scores[0], scores[1], rtol=1e-3, atol=1e-3), method
