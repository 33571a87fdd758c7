"""The protection sweep's settings: one frozen `SweepConfig` (what `client-distill experiment`
builds from its flags), its defaults and checks, and the command line that reproduces it."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.protocol import OUTPUT_PROBABILITIES

from client_distiller.errors import UsageError
from client_distiller.reporting.command_line import shell_command
from client_distiller.training.recipe import CPU_RECIPE

DEFAULT_MODES = ("none", "noise:0.1", "quantize:binary", "truncate:32", "rotate", "b4b", "watermark",
                 "probabilities:3")
DEFAULT_BUDGETS = (100, 370, 1270)  # 70 class prompts + 30 / 300 / 1200 images (small preset: 1200 in total)
DEFAULT_SEEDS = (0, 1)
# Which method each mode family trains by default (`--method-for MODE=METHOD` overrides).
DEFAULT_METHOD_FOR = {OUTPUT_PROBABILITIES: "kd"}
DEFAULT_METHOD = "vl2v-adip"
HOLDOUT = 0.2
TEACHER_SIZE_LABEL = "the teacher's"


class ExperimentError(UsageError):
    """The sweep cannot run as asked (bad mode list, unknown domain, an --out of another sweep)."""


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines the sweep; the training part is fingerprinted into `experiment.json`
    so a resumed sweep never mixes rows made under other settings."""

    out: Path
    modes: tuple[str, ...]
    budgets: tuple[int, ...]
    seeds: tuple[int, ...]
    data: Path | None
    preset: str
    test_domain: str | None
    teacher: str | None
    teacher_size: str
    vendor_dir: Path
    student: str
    random_init: bool
    steps: int
    batch_size: int
    image_size: int
    eval_every: int
    method_for: dict[str, str] = field(default_factory=dict)
    hparams: tuple[str, ...] = CPU_RECIPE.hparams  # the shared recipe (client_distiller/training/recipe.py)
    selection: str = "balanced"
    keep_students: bool = False
    publish: Path | None = None

    def method(self, mode: str) -> str:
        """The method trained against ``mode``: exact spec, then mode name, then the output default."""
        name = mode_name(mode)
        if mode in self.method_for:
            return self.method_for[mode]
        if name in self.method_for:
            return self.method_for[name]
        return DEFAULT_METHOD_FOR.get(name, DEFAULT_METHOD)

    def fingerprint(self) -> dict[str, Any]:
        keep = ("data", "preset", "test_domain", "teacher", "student", "random_init", "steps", "batch_size",
                "image_size", "eval_every", "hparams", "selection")
        values = {k: v for k, v in asdict(self).items() if k in keep}
        values["data"] = str(values["data"]) if values["data"] else None
        values["hparams"] = list(values["hparams"])
        return values


def mode_name(spec: str) -> str:
    return spec.partition(":")[0].strip()


def mode_slug(spec: str) -> str:
    """`noise:0.1` -> `noise-0.1`: a folder- and key-name-safe form of a mode spec."""
    return re.sub(r"[^a-z0-9.]+", "-", spec.strip().lower()).strip("-") or "mode"


def validate(cfg: SweepConfig) -> None:
    """One clear error for a sweep that cannot run, before anything starts."""
    from client_distiller.training.methods import MethodError, get_method, parse_hparams

    if len(set(cfg.modes)) != len(cfg.modes):
        raise ExperimentError(f"--modes lists a mode twice: {','.join(cfg.modes)}")
    if min(cfg.steps, cfg.batch_size, cfg.eval_every) < 1 or cfg.image_size < 0:
        raise ExperimentError("--steps, --batch-size and --eval-every must be positive (--image-size 0: the teacher's)")
    for mode in cfg.modes:
        try:
            get_method(cfg.method(mode))  # an unknown method is one clear error before anything starts
        except MethodError as exc:
            raise ExperimentError(f"--method-for: {exc}") from None
    unknown = set(cfg.method_for) - set(cfg.modes) - {mode_name(m) for m in cfg.modes}
    if unknown:
        raise ExperimentError(f"--method-for names modes that are not swept: {', '.join(sorted(unknown))}")
    used = sorted({cfg.method(m) for m in cfg.modes})
    parse_hparams([h for h in cfg.hparams if h.partition(".")[0] in used], used)


def command_line(cfg: SweepConfig) -> str:
    """The sweep as one explicit command (every setting spelled out, so it reproduces the sweep
    whatever the defaults become); written into `experiment.json` and `summary.md`."""
    parts = ["client-distill", "experiment", "--out", str(cfg.out), "--modes", ",".join(cfg.modes),
             "--budgets", ",".join(map(str, cfg.budgets)), "--seeds", ",".join(map(str, cfg.seeds))]
    parts += ["--data", str(cfg.data)] if cfg.data else ["--preset", cfg.preset]
    if cfg.test_domain:
        parts += ["--test-domain", cfg.test_domain]
    parts += ["--teacher", cfg.teacher] if cfg.teacher else ["--teacher-size", cfg.teacher_size]
    for m in cfg.method_for:
        parts += ["--method-for", f"{m}={cfg.method_for[m]}"]
    parts += ["--student", cfg.student, *(["--random-init"] if cfg.random_init else []), "--steps", str(cfg.steps),
              "--batch-size", str(cfg.batch_size), "--image-size", str(cfg.image_size),
              "--eval-every", str(cfg.eval_every)]
    for h in cfg.hparams:
        parts += ["--hparam", h]
    parts += ["--keep-students"] if cfg.keep_students else []
    parts += ["--publish", str(cfg.publish)] if cfg.publish else []
    return shell_command(parts)
