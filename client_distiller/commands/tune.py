"""`client-distill tune`: choose each method's learning rate on training-domain validation, fairly.

Every method gets the same trials: the same grid of backbone-stage learning rates, each trained
for the same leave-one-domain-out jobs (test domains x seeds) under the same schedule. A trial's
score is the mean over those jobs of the best *source-domain validation* accuracy (DomainBed's
training-domain validation model selection); the held-out domain's accuracy is never read. The
best score wins (ties: the first in the grid). Results:

- ``OUT/tune.md`` - the validation accuracy of every (method, learning rate), the selection marked;
- ``OUT/selected.json`` - ``{method: {"lr": value}}`` plus the command, which
  :mod:`client_distiller.training.recipe` must agree with (a test checks it).

It trains on teacher targets bought earlier (``--targets``: the ``targets/`` folder that
``compare`` or ``distill`` saves), so tuning spends no units. Resumable: trials already in
``OUT/trials/`` are not trained again.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from client_distiller.commands.argtypes import non_negative_int, positive_float, positive_int
from client_distiller.reporting.command_line import shell_command
from client_distiller.errors import UsageError
from client_distiller.reporting.evaluate import read_jsonl
from client_distiller.training.recipe import ALIGN_LR, CPU_RECIPE, PROJECTION_METHODS, Schedule

DEFAULT_GRID = (3e-5, 1e-4, 3e-4)
DEFAULT_METHODS = ("erm", "kd", "vl2v-adip", "clip-kd", "dime-fm", "vl2v-sd")


class TuneError(UsageError):
    """The sweep cannot run as asked (no targets, unknown method or domain)."""


@dataclass(frozen=True)
class TuneConfig:
    data: Path
    targets: Path
    out: Path
    methods: tuple[str, ...]
    test_domains: tuple[str, ...]
    seeds: tuple[int, ...]
    grid: tuple[float, ...]
    steps: int
    align_steps: int
    batch_size: int
    eval_every: int
    image_size: int
    student: str
    teacher_weights: str | None

    @property
    def schedule(self) -> Schedule:
        """Every trial's schedule: the same for every method and learning rate."""
        return Schedule(self.student, steps=self.steps, align_steps=self.align_steps, batch_size=self.batch_size,
                        image_size=self.image_size, eval_every=self.eval_every)

    def command(self) -> str:
        parts = ["client-distill", "tune", "--data", str(self.data), "--targets", str(self.targets),
                 "--out", str(self.out), *[a for m in self.methods for a in ("--method", m)],
                 *[a for d in self.test_domains for a in ("--test-domain", d)],
                 "--seeds", *map(str, self.seeds), "--lr", *(f"{v:g}" for v in self.grid),
                 "--steps", str(self.steps), "--align-steps", str(self.align_steps),
                 "--batch-size", str(self.batch_size), "--eval-every", str(self.eval_every),
                 "--image-size", str(self.image_size), "--student", self.student]
        if self.teacher_weights:
            parts += ["--teacher-weights", self.teacher_weights]
        return shell_command(parts)


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, required=True, help="DomainBed-layout dataset the targets were bought for")
    p.add_argument("--targets", type=Path, required=True,
                   help="saved teacher targets (the targets/ folder of a compare or distill run)")
    p.add_argument("--out", type=Path, default=Path("runs/tune"), help="sweep folder: tune.md, selected.json, trials (resumable)")
    p.add_argument("--method", action="append", dest="methods", help="method (repeatable); default: all six")
    p.add_argument("--test-domain", action="append", dest="test_domains",
                   help="held-out domain of a tuning job (repeatable; its accuracy is never used); default: sketch")
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0], help="trial seeds (default 0)")
    p.add_argument("--lr", type=positive_float, nargs="+", default=list(DEFAULT_GRID), help="learning-rate grid")
    p.add_argument("--steps", type=positive_int, default=CPU_RECIPE.steps, help="steps per backbone stage (default: the recipe's)")
    p.add_argument("--align-steps", type=positive_int, default=CPU_RECIPE.align_steps,
                   help="steps of the Align stage (default: the recipe's)")
    p.add_argument("--batch-size", type=positive_int, default=CPU_RECIPE.batch_size,
                   help="images per source domain per step (default: the recipe's)")
    p.add_argument("--eval-every", type=positive_int, default=CPU_RECIPE.eval_every,
                   help="steps between training-domain validations (default: the recipe's)")
    p.add_argument("--image-size", type=positive_int, default=None, help="default: the input size of the targets' teacher (saved in targets.json)")
    p.add_argument("--student", default="efficientnet-lite0", help="student backbone (default efficientnet-lite0)")
    p.add_argument("--teacher-weights", default=None, metavar="SPEC", help="open_clip spec for vl2v-sd")


def config_from(args: argparse.Namespace) -> TuneConfig:
    from client_distiller.training.methods import get_method

    methods = tuple(args.methods or DEFAULT_METHODS)
    for m in methods:
        get_method(m)
    if "vl2v-sd" in methods and not args.teacher_weights:
        raise TuneError("vl2v-sd needs --teacher-weights SPEC (or leave it out with --method)")
    if not (args.targets / "targets.json").is_file():
        raise TuneError(f"{args.targets} holds no saved teacher targets (targets.json)")
    image_size = args.image_size or saved_teacher_image_size(args.targets)
    if image_size is None:
        raise TuneError(f"{args.targets} does not record the teacher's input size (targets saved by an older "
                        "version); pass --image-size")
    return TuneConfig(data=args.data, targets=args.targets, out=args.out, methods=methods,
                      test_domains=tuple(args.test_domains or ["sketch"]), seeds=tuple(args.seeds),
                      grid=tuple(args.lr), steps=args.steps, align_steps=args.align_steps,
                      batch_size=args.batch_size, eval_every=args.eval_every, image_size=image_size,
                      student=args.student, teacher_weights=args.teacher_weights)


def saved_teacher_image_size(folder: Path) -> int | None:
    """The teacher input size recorded with saved targets (read from their metadata only: loading
    every embedding to learn one number would be waste)."""
    from client_distiller.targets import META_FILE

    try:
        size = json.loads((folder / META_FILE).read_text()).get("image_size")
    except (OSError, ValueError) as exc:
        raise TuneError(f"cannot read {folder / META_FILE}: {exc}") from exc
    return int(size) if isinstance(size, int) and size > 0 else None


def trial_name(method: str, lr: float) -> str:
    return f"{method}-lr{lr:g}"


def run_tune(cfg: TuneConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Train every (method, lr, domain, seed) not done yet, then select and write the report."""
    from client_distiller.lodo import RESULTS_FILE, run_job
    from client_distiller.targets import TeacherTargets

    targets = TeacherTargets.load(cfg.targets)
    scores: dict[str, dict[float, list[float]]] = {}
    for method in cfg.methods:
        for lr in cfg.grid:
            folder = cfg.out / "trials" / trial_name(method, lr)
            done = {(r["test_domain"], int(r["seed"])) for r in read_jsonl(folder / RESULTS_FILE)
                    if r["method"] == method} if (folder / RESULTS_FILE).is_file() else set()
            hp: dict[str, float] = {"lr": lr}
            if method in PROJECTION_METHODS:
                hp["align_lr"] = ALIGN_LR
            for seed in cfg.seeds:
                for domain in cfg.test_domains:
                    if (domain, seed) in done:
                        continue
                    print(f"[tune] {method} lr={lr:g}: test domain {domain}, seed {seed}", flush=True)
                    run_job(cfg.data, domain, targets, methods=[method], schedule=cfg.schedule, seed=seed, out_dir=folder,
                            hparams={method: hp}, teacher_weights=cfg.teacher_weights, show_progress=show_progress)
            records = [r for r in read_jsonl(folder / RESULTS_FILE) if r["method"] == method
                       and r["test_domain"] in cfg.test_domains and int(r["seed"]) in cfg.seeds]
            scores.setdefault(method, {})[lr] = [float(r["best_val_acc"]) for r in records]
    selected = select(scores)
    write_report(cfg, scores, selected)
    return {"selected": selected, "scores": scores}


def select(scores: dict[str, dict[float, list[float]]]) -> dict[str, float]:
    """Each method's learning rate with the best mean validation accuracy (first in the grid on ties)."""
    out = {}
    for method, by_lr in scores.items():
        means = {lr: sum(v) / len(v) for lr, v in by_lr.items() if v}
        best = max(means.values())
        out[method] = next(lr for lr, m in means.items() if m == best)
    return out


def write_report(cfg: TuneConfig, scores: dict[str, dict[float, list[float]]], selected: dict[str, float]) -> None:
    from client_distiller.reporting.machine import machine
    from client_distiller.reporting.tables import mean_se

    cfg.out.mkdir(parents=True, exist_ok=True)
    header = ["Method", *(f"lr {lr:g}" for lr in cfg.grid), "Selected"]
    lines = ["# Learning-rate selection on training-domain validation", "",
             "Best source-domain validation accuracy (%) during training, mean ± standard error over the "
             f"tuning jobs (held-out domain {', '.join(cfg.test_domains)}: its accuracy is never used), seeds "
             f"{', '.join(map(str, cfg.seeds))}; every method gets the same {len(cfg.grid)} trials. Align "
             f"(projection-head methods) runs {cfg.align_steps} steps at lr {ALIGN_LR:g} on cached features; "
             f"backbone stages {cfg.steps} steps x {cfg.batch_size} images per source domain at "
             f"{cfg.image_size} px, validated every {cfg.eval_every} steps.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, by_lr in scores.items():
        cells = []
        for lr in cfg.grid:
            values = [100 * v for v in by_lr.get(lr, [])]
            if not values:
                cells.append("-")
                continue
            m, se = mean_se(values)
            cell = f"{m:.1f} ± {se:.1f}" if len(values) > 1 else f"{m:.1f}"
            cells.append(f"**{cell}**" if lr == selected[method] else cell)
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {selected[method]:g} |")
    lines += ["", f"Made by: `{cfg.command()}`", "", f"Machine: {machine()}."]
    (cfg.out / "tune.md").write_text("\n".join(lines) + "\n")
    (cfg.out / "selected.json").write_text(json.dumps(
        {"selected": {m: {"lr": lr} for m, lr in selected.items()}, "align_lr": ALIGN_LR,
         "grid": list(cfg.grid), "command": cfg.command()}, indent=1) + "\n")


def run_tune_command(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    summary = run_tune(cfg)
    print((cfg.out / "tune.md").read_text())
    print("selected: " + ", ".join(f"{m} lr={lr:g}" for m, lr in summary["selected"].items()))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="client-distill tune", description=__doc__.splitlines()[0])
    add_tune_arguments(parser)
    return run_tune_command(parser.parse_args(argv))
