"""`client-distill experiment`: the protection sweep's flags, turned into one frozen
`SweepConfig` (flags over `--quick` over the defaults) and handed to `sweep.runner.run_experiment`;
the sweep itself is documented in `client_distiller/sweep/`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from client_distiller.sweep.config import (DEFAULT_BUDGETS, DEFAULT_MODES, DEFAULT_SEEDS, ExperimentError, SweepConfig,
                                           validate)
from client_distiller.sweep.runner import run_experiment
from client_distiller.training.recipe import CPU_RECIPE

QUICK = {"modes": ("none", "noise:0.1", "probabilities:3"), "budgets": (80, 110), "seeds": (0, 1),
         "preset": "tiny", "student": "test_efficientnet", "random_init": True, "steps": 2, "batch_size": 2,
         "image_size": 32, "eval_every": 2}

def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _str_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return values


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/protection-sweep"),
                   help="sweep folder: runs.csv, summary.md, ood_vs_units.png, keys, caches (resumable)")
    p.add_argument("--modes", type=_str_list, default=None,
                   help=f"comma-separated protection specs (default {','.join(DEFAULT_MODES)})")
    p.add_argument("--budgets", type=_int_list, default=None,
                   help=f"comma-separated training budgets in units (default {','.join(map(str, DEFAULT_BUDGETS))})")
    p.add_argument("--seeds", type=_int_list, default=None, help="comma-separated seeds (default 0,1)")
    p.add_argument("--data", type=Path, default=None,
                   help="DomainBed-layout dataset (default: the offline fashion-domains benchmark, built into --out)")
    p.add_argument("--preset", choices=["tiny", "small", "full"], default=None,
                   help="size of the offline benchmark when --data is not given (default small)")
    p.add_argument("--test-domain", default=None, help="held-out domain (default sketch, else the last domain)")
    p.add_argument("--teacher", default=None,
                   help="open_clip spec the local vendor serves (default: the offline demo teacher)")
    p.add_argument("--teacher-size", choices=["tiny", "full"], default="full", help="demo teacher size")
    p.add_argument("--vendor-dir", type=Path, default=None,
                   help="the local vendor's data folder (Redis, demo teacher); default OUT/vendor. Point it at "
                        "the demo's WORKDIR/vendor to reuse an already built demo teacher")
    p.add_argument("--method-for", action="append", default=[], metavar="MODE=METHOD",
                   help="method trained against a mode (repeatable), e.g. noise=kd; default vl2v-adip, kd for "
                        "probabilities")
    p.add_argument("--student", default=None, help="student backbone (default efficientnet-lite0)")
    p.add_argument("--random-init", action="store_true", default=None, help="random student weights (tests)")
    p.add_argument("--steps", type=int, default=None, help="steps per backbone training stage (default: the shared recipe's)")
    p.add_argument("--batch-size", type=int, default=None, help="images per source domain per step (default: the recipe's)")
    p.add_argument("--image-size", type=int, default=None, help="student input size (default 0: the teacher's)")
    p.add_argument("--eval-every", type=int, default=None, help="validation interval in steps (default: the recipe's)")
    p.add_argument("--hparam", action="append", dest="hparams", default=None, metavar="METHOD.NAME=VALUE",
                   help="method hyperparameters (default: the shared recipe's, client_distiller/training/recipe.py)")
    p.add_argument("--keep-students", action="store_true",
                   help="keep every run's deployable student (about 17 MiB each for EfficientNet-Lite0); default: "
                        "delete it once accuracy, fidelity and the watermark test are measured")
    p.add_argument("--publish", type=Path, default=None, metavar="FILE.md",
                   help="also write summary.md here (and the plot beside it as FILE.png), e.g. "
                        "results/protection_sweep.md")
    p.add_argument("--quick", action="store_true",
                   help="a tiny smoke sweep (3 modes x 2 budgets x 2 seeds, tiny data and student, 2 steps)")


def config_from(args: argparse.Namespace) -> SweepConfig:
    """Flags over `--quick` over the defaults."""
    quick = QUICK if args.quick else {}

    def pick(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return value if value is not None else quick.get(name, default)

    out = Path(args.out)  # as given: the published command line stays portable
    method_for: dict[str, str] = {}
    for pair in args.method_for or []:
        mode, sep, method = pair.partition("=")
        if not sep or not mode.strip() or not method.strip():
            raise ExperimentError(f"--method-for {pair!r}: expected MODE=METHOD")
        method_for[mode.strip()] = method.strip()
    cfg = SweepConfig(
        out=out, modes=tuple(pick("modes", DEFAULT_MODES)),
        budgets=tuple(sorted(set(pick("budgets", DEFAULT_BUDGETS)))),
        seeds=tuple(dict.fromkeys(pick("seeds", DEFAULT_SEEDS))), data=args.data.resolve() if args.data else None,
        preset=pick("preset", "small"), test_domain=args.test_domain, teacher=args.teacher,
        teacher_size=args.teacher_size, vendor_dir=(args.vendor_dir or out / "vendor").resolve(),
        student=pick("student", "efficientnet-lite0"), random_init=bool(pick("random_init", False)),
        steps=pick("steps", CPU_RECIPE.steps), batch_size=pick("batch_size", CPU_RECIPE.batch_size),
        image_size=pick("image_size", 0),
        eval_every=pick("eval_every", CPU_RECIPE.eval_every), method_for=method_for,
        hparams=tuple(args.hparams) if args.hparams is not None else CPU_RECIPE.hparams,
        keep_students=bool(args.keep_students), publish=args.publish)
    validate(cfg)
    return cfg


def run_experiment_command(args: argparse.Namespace) -> int:
    """The CLI entry: run the sweep, print where its outputs are."""
    cfg = config_from(args)
    result = run_experiment(cfg)
    print(f"{result.ran} runs made, {result.skipped} already in {result.files['runs']}; "
          f"{result.units_new} units spent by this invocation")
    print(f"summary: {result.files['summary']}\nplot: {result.files['plot']}")
    if "published" in result.files:
        print(f"published: {result.files['published']} and {result.files['published_plot']}")
    return 0
