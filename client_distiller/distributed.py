"""Run a method's stages under ``torchrun`` with DistributedDataParallel (gloo on CPU, NCCL on GPU).

Typical use: Align on one process (it only trains a linear projection), then the expensive
Distill stage on every GPU of a machine::

    torchrun --nproc_per_node 8 -m client_distiller.distributed --data-root DATA --test-domain sketch \\
        --targets TARGETS_DIR --method vl2v-adip --stages distill --init align_state.safetensors \\
        --steps 5001 --out OUT

Every rank builds the same leave-one-out split; :func:`client_distiller.train.train_stage` wraps
the method in DDP, each rank draws its own per-domain batches, gradients are averaged and BatchNorm
statistics are broadcast from rank 0 before validation and at the end, so all ranks finish with
identical weights. Rank 0 writes ``method_state.safetensors``, ``history.json`` and, for methods
with teacher heads, the deployable ``student/`` folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from .data import DomainBedFolder, eval_transform, leave_one_out, train_transform
from .methods import Method, get_method
from .product import DistilledStudent
from .students import DEFAULT_STUDENT, create_student
from .targets import TeacherTargets
from .train import DistInfo, TrainConfig, TrainData, fit


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
    p = argparse.ArgumentParser(prog="python -m client_distiller.distributed", description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True, type=Path)
    p.add_argument("--test-domain", required=True)
    p.add_argument("--targets", type=Path, default=None, help="a TeacherTargets.save folder (teacher methods)")
    p.add_argument("--method", default="vl2v-adip")
    p.add_argument("--stages", default=None, help="comma-separated stages to run (default: all of the method's)")
    p.add_argument("--init", type=Path, default=None, help="method state to start from (save_method_state)")
    p.add_argument("--student", default=DEFAULT_STUDENT)
    p.add_argument("--no-pretrained", action="store_true", help="random-init student (tests)")
    p.add_argument("--steps", type=int, default=5001)
    p.add_argument("--batch-size", type=int, default=32, help="per source domain and per rank")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", choices=("best", "last"), default="best", help="end at the best validation state or the last")
    p.add_argument("--hparams", default="{}", help="JSON hyperparameter overrides")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--save-every-rank", action="store_true", help="also write rank<R>.safetensors on every rank")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    launched = "WORLD_SIZE" in os.environ
    if launched and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30))
    info = DistInfo.current()
    try:
        data = DomainBedFolder.scan(args.data_root)
        cls = get_method(args.method)
        targets = TeacherTargets.load(args.targets) if args.targets else None
        loo = leave_one_out(data, args.test_domain, seed=args.seed)
        train_items = [x for s in loo.sources for x in s.train]
        if targets is not None:  # never the test domain's (or validation) image targets
            targets = targets.restricted_to(p for p, _ in train_items)
        st = create_student(args.student, pretrained=not args.no_pretrained)
        size = args.image_size or st.input_size
        tdata = TrainData([s.train for s in loo.sources], [x for s in loo.sources for x in s.val],
                          train_transform(size, st.mean, st.std), eval_transform(size, st.mean, st.std),
                          targets if "images" in cls.needs else None)
        method = cls(st, len(data.classes), targets if cls.needs else None, json.loads(args.hparams))
        if args.init is not None:
            load_method_state(method, args.init)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, eval_every=args.eval_every, seed=args.seed,
                          keep=args.keep, show_progress=info.is_main)
        history = fit(method, tdata, cfg, stages=args.stages.split(",") if args.stages else None)
        method.cpu()
        if args.save_every_rank:
            save_method_state(method, args.out / f"rank{info.rank}.safetensors")
        if info.is_main:
            save_method_state(method, args.out / "method_state.safetensors")
            (args.out / "history.json").write_text(json.dumps({**history.as_dict(), "world_size": info.world_size},
                                                              indent=1))
            if cls.needs:
                DistilledStudent.from_method(method, image_size=size, class_names=data.class_names).save(
                    args.out / "student")
        if dist.is_initialized():
            dist.barrier()
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
