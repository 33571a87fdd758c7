"""Run methods' stages under ``torchrun`` with DistributedDataParallel (gloo on CPU, NCCL on GPU).

Typical use, the Distill stage on every GPU of a machine from a saved Align state::

    torchrun --nproc_per_node 8 -m client_distiller.commands.torchrun --data-root DATA --test-domain sketch \\
        --targets TARGETS_DIR --method vl2v-adip --stages distill --init align_state.safetensors \\
        --steps 5001 --out OUT

or every stage of several methods in one launch (``--method`` is repeatable; each method's
initial weights are seeded from ``--seed`` and its name, as in ``client-distill distill``).

Every rank builds the same leave-one-out split; :func:`client_distiller.training.loop.train_stage` wraps
the method in DDP, every rank draws the same global batch and computes its share of it, the
features are gathered for the loss and gradients averaged (so a run on ``N`` ranks with
``--batch-size B`` follows the one-process run with ``--batch-size N*B``); BatchNorm statistics
are broadcast from rank 0 before validation and at the end, so all ranks finish with identical
weights. Rank 0 writes ``OUT/<method>/method_state.safetensors``, ``history.json`` and, for methods
with teacher heads, the deployable ``student/`` folder.

:func:`init_distributed` is the one place a process joins a ``torchrun`` launch (this module and
``client-distill distill --nproc``); :func:`launch` is ``--nproc``'s re-execution under
``torch.distributed.run``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from client_distiller.data import DomainBedFolder, eval_transform, leave_one_out, train_transform
from client_distiller.deployed import DistilledStudent
from client_distiller.errors import RunError
from client_distiller.targets import TeacherTargets
from client_distiller.training.loop import DistInfo, TrainConfig, TrainData, fit, init_seed, seed_everything
from client_distiller.training.methods import Method, get_method
from client_distiller.training.students import DEFAULT_STUDENT

DEFAULT_TIMEOUT = timedelta(minutes=30)
T = TypeVar("T")


class PeerFailed(RunError):
    """Rank 0 failed in a step the other ranks were waiting for (its own error is on its stderr)."""


def broadcast_from_main(produce: Callable[[], T], info: DistInfo) -> T:
    """``produce()`` on rank 0 only, its result sent to every rank (pickled over the process
    group): how purchases stay on one rank while the others wait. Without a process group it is
    just ``produce()``. A failure on rank 0 is sent too, so the others stop with
    :class:`PeerFailed` instead of waiting for the timeout."""
    if not dist.is_initialized() or info.world_size == 1:
        return produce()
    if info.is_main:
        try:
            value = produce()
        except BaseException as exc:
            dist.broadcast_object_list([("error", f"{type(exc).__name__}: {exc}")], src=0)
            raise
        dist.broadcast_object_list([("ok", value)], src=0)
        return value
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise PeerFailed(f"rank 0 failed: {value}")
    return value


def launched() -> bool:
    """Whether this process was started by ``torchrun`` / ``torch.distributed.run``."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(timeout: timedelta = DEFAULT_TIMEOUT) -> bool:
    """Join the launch's process group (NCCL with one GPU per local rank, else gloo); True if this
    call created it (the caller then destroys it). A no-op outside ``torchrun``. ``timeout`` bounds
    every collective, so it must cover the longest wait of one rank on another (rank 0 buying)."""
    if not launched() or dist.is_initialized():
        return False
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return True


def launch(module: str, argv: Sequence[str], nproc: int) -> int:
    """Re-run ``python -m module argv`` as ``nproc`` local ranks under ``torch.distributed.run``
    (``--standalone``: a rendezvous on a free local port) and return its exit code. For several
    machines call ``torchrun`` directly (docs/scaling.md)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", module, *argv]
    return subprocess.run(cmd).returncode


def method_hparams(spec: Mapping[str, Any], methods: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--hparams`` JSON: one mapping for every method, or ``{method: mapping}`` when its keys are
    all method names (a hyperparameter is never named like a method)."""
    if spec and all(k in methods for k in spec):
        return {m: dict(spec.get(m, {})) for m in methods}
    return {m: dict(spec) for m in methods}


def save_method_state(method: Method, path: Path | str) -> Path:
    """All of a method's weights and buffers (backbone + head), e.g. the best Align checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in method.state_dict().items()}, str(path))
    return path


def load_method_state(method: Method, path: Path | str) -> Method:
    method.load_state_dict(load_file(str(path)), strict=True)
    return method


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m client_distiller.commands.torchrun", description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--test-domain", required=True)
    p.add_argument("--targets", type=Path, default=None, help="a TeacherTargets.save folder (teacher methods)")
    p.add_argument("--method", action="append", dest="methods",
                   help="method to train (repeatable, one after another; default: vl2v-adip)")
    p.add_argument("--stages", default=None, help="comma-separated stages to run (default: all of the method's)")
    p.add_argument("--init", type=Path, default=None, help="method state to start from (save_method_state)")
    p.add_argument("--student", default=DEFAULT_STUDENT)
    p.add_argument("--teacher-weights", default=None, help="open_clip spec of the teacher (white-box vl2v-sd)")
    p.add_argument("--no-pretrained", action="store_true", help="random-init student (tests)")
    p.add_argument("--steps", type=int, default=5001)
    p.add_argument("--batch-size", type=int, default=32, help="per source domain and per rank")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", choices=("best", "last"), default="best", help="end at the best validation state or the last")
    p.add_argument("--hparams", default="{}", help="JSON hyperparameter overrides (or {method: overrides})")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--save-every-rank", action="store_true",
                   help="also write rank<R>.safetensors and rank<R>.history.json on every rank")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    methods = args.methods or ["vl2v-adip"]
    if args.init is not None and len(methods) > 1:
        parser.error("--init is one method's state: give one --method with it")
    created = init_distributed()
    info = DistInfo.current()
    try:
        data = DomainBedFolder.scan(args.data_root)
        targets = TeacherTargets.load(args.targets) if args.targets else None
        loo = leave_one_out(data, args.test_domain, seed=args.seed)
        train_items = [x for s in loo.sources for x in s.train]
        if targets is not None:  # never the test domain's (or validation) image targets
            targets = targets.restricted_to(p for p, _ in train_items)
        hparams = method_hparams(json.loads(args.hparams), methods)
        for name in methods:
            _train_one(args, name, data, loo, targets, hparams[name], info)
        if dist.is_initialized():  # on success only: a failed rank exits at once and torchrun stops the others
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
    return 0


def _train_one(args: argparse.Namespace, name: str, data: DomainBedFolder, loo: Any, targets: TeacherTargets | None,
               hparams: dict[str, Any], info: DistInfo) -> None:
    """One method through :func:`fit`; rank 0 (and with ``--save-every-rank`` every rank) writes it."""
    cls = get_method(name)
    seed_everything(init_seed(args.seed, name))  # the same initial weights on every rank and in one process
    st = cls.build_student(args.student, pretrained=not args.no_pretrained, teacher_weights=args.teacher_weights)
    size = args.image_size or st.input_size
    tdata = TrainData([s.train for s in loo.sources], [x for s in loo.sources for x in s.val],
                      train_transform(size, st.mean, st.std), eval_transform(size, st.mean, st.std),
                      targets if cls.needs & {"images", "class_probabilities"} else None)
    method = cls(st, len(data.classes), targets if cls.needs else None, hparams)
    if args.init is not None:
        load_method_state(method, args.init)
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every, seed=args.seed,
                      keep=args.keep, show_progress=info.is_main)
    history = fit(method, tdata, cfg, stages=args.stages.split(",") if args.stages else None)
    method.cpu()
    out = args.out / name
    record = json.dumps({**history.as_dict(), "world_size": info.world_size, "rank": info.rank}, indent=1)
    if args.save_every_rank:
        save_method_state(method, out / f"rank{info.rank}.safetensors")
        (out / f"rank{info.rank}.history.json").write_text(record)
    if info.is_main:
        save_method_state(method, out / "method_state.safetensors")
        (out / "history.json").write_text(record)
        if cls.needs:
            DistilledStudent.from_method(method, image_size=size, class_names=data.class_names).save(
                out / "student")


if __name__ == "__main__":
    sys.exit(main())
