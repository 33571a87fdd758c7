"""``client-distill``: the client's command line, built from a registry of sub-commands.

Each command is a :class:`Command` (its help, how it adds arguments, how it runs), and a group is
a command whose ``subcommands`` dict holds more of them; ``COMMANDS`` is the top level, so adding
``distill`` or ``experiment`` is adding an entry. Every user error (a bad argument, an unknown
benchmark, an unwritable folder, a missing package) ends as one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NoReturn, Sequence

from client_distiller.commands.argtypes import non_negative_int, positive_int
from client_distiller.errors import EXIT_RUN, EXIT_USAGE, RunError, UsageError

PROG = "client-distill"


class CliError(UsageError):
    """A user error that the CLI reports as one line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


@dataclass(frozen=True)
class Command:
    """One sub-command: help text, an argument adder and a runner returning an exit code."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None
    run: Callable[[argparse.Namespace], int] | None = None
    subcommands: dict[str, "Command"] = field(default_factory=dict)


def _lazy(module: str, function: str) -> Callable[..., object]:
    """``client_distiller.<module>.<function>``, imported only when called: the heavy commands'
    modules import torch, which the light ones never need."""

    def call(*args: object) -> object:
        return getattr(importlib.import_module(f"{__package__}.{module}"), function)(*args)

    return call


# ----------------------------------------------------------------------------- data commands
def _add_data_build(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="benchmark name (see `client-distill data list`)")
    p.add_argument("--out", required=True, type=Path, help="output folder (DomainBed layout)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="build seed (default 0)")
    p.add_argument("--split", default="client", help="client (default) or vendor (the vendor-private split)")
    p.add_argument("--size", default="full", help="size preset: full (default), small or tiny")
    p.add_argument("--per-class", type=positive_int, default=None,
                   help="pictures per (domain, class), overriding the size preset")
    p.add_argument("--force", action="store_true", help="replace an existing build in --out")
    p.add_argument("--grid", type=Path, default=None, help="also write a domain x class picture grid PNG here")


def _run_data_build(args: argparse.Namespace) -> int:
    from offline_data import build_benchmark, picture_grid

    report = build_benchmark(args.name, args.out, seed=args.seed, split=args.split, size=args.size,
                             per_class=args.per_class, overwrite=args.force)
    print(f"built {report.name} ({report.split} split, seed {report.seed}): {report.n_images} images, "
          f"{len(report.domains)} domains x {len(report.classes)} classes x {report.per_class} "
          f"in {report.seconds:.1f} s -> {report.out}")
    print(f"domains: {', '.join(report.domains)}")
    if args.grid is not None:
        print(f"grid: {picture_grid(args.name, args.grid, split=args.split, seed=args.seed)}")
    return 0


def _run_data_list(args: argparse.Namespace) -> int:
    from offline_data import BENCHMARKS, CONCEPT_SETS

    for spec in BENCHMARKS.values():
        print(f"{spec.name}: {spec.description}")
        print(f"  classes ({len(spec.classes)}): {', '.join(c.key for c in spec.classes)}")
        for split, domains in spec.domains.items():
            sizes = ", ".join(f"{k}={v[split]}" for k, v in spec.sizes.items())
            print(f"  {split} domains: {', '.join(domains)}  (per domain and class: {sizes})")
        print(f"  image size: {spec.image_size} px")
    print("held-out concept sets (teacher evaluation only):")
    for cs in CONCEPT_SETS.values():
        print(f"  {cs.name}: {cs.description} [needs {cs.requires}]")
    return 0


# ----------------------------------------------------------------------------- predict
def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", required=True, type=Path, help="a saved student folder (DistilledStudent.save)")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files to classify")
    p.add_argument("--top", type=positive_int, default=1, help="classes to print per image (default 1)")


def _run_predict(args: argparse.Namespace) -> int:
    from PIL import UnidentifiedImageError

    from client_distiller.deployed import DistilledStudent, StudentFormatError

    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise CliError(f"no such image: {', '.join(missing)}")
    try:
        student = DistilledStudent.load(args.student)
        preds = student.predict(args.images)
    except StudentFormatError as exc:
        raise CliError(str(exc)) from None
    except UnidentifiedImageError as exc:
        raise CliError(f"not an image: {exc}") from None
    names = student.class_names
    for path, pred in zip(args.images, preds):
        ranked = sorted(range(len(names)), key=lambda k: -pred.probabilities[k])[:args.top]
        print(f"{path}\t" + "\t".join(f"{names[k]}\t{pred.probabilities[k]:.4f}" for k in ranked))
    return 0


# ----------------------------------------------------------------------------- distill and demo
def without_option(argv: Sequence[str], option: str) -> list[str]:
    """``argv`` less ``option VALUE`` / ``option=VALUE`` (each occurrence)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def _run_distill(args: argparse.Namespace) -> int:
    from client_distiller.commands.distill import config_from, run_distill
    from client_distiller.commands.torchrun import launch, launched

    cfg = config_from(args)  # argument errors surface before any rank starts
    if cfg.nproc > 1 and not launched():  # re-run this very command as N ranks under torch.distributed.run
        return launch(f"{__package__}.cli", without_option(args._argv, "--nproc"), cfg.nproc)
    summary = run_distill(cfg)
    if not summary:  # a rank other than 0: rank 0 reports
        return 0
    print(summary["table"])
    print(f"units spent: training {summary['units_train']} of {summary['budget']}, "
          f"evaluation {summary['units_eval']} of {summary['eval_budget']}; "
          f"images bought {summary['images_bought']} of {summary['images_wanted']}")
    if "student_ms_per_image" in summary:
        print(f"deployed student: {summary['student_params_m']}M parameters, {summary['student_mib_fp32']} MiB fp32, "
              f"{summary['student_ms_per_image']} ms/image on this CPU at {summary['student_image_size']} px; "
              f"plot: {summary['plot']}")
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from client_distiller.commands.compare import config_from, run_compare

    summary = run_compare(config_from(args))
    print(summary["table"])
    print(f"units spent: training {summary['units_train']} of {summary['budget']}, evaluation "
          f"{summary['units_eval']}; table: {summary['compare_md']}, {summary['compare_csv']}")
    return 0


COMMANDS: dict[str, Command] = {
    "data": Command(
        help="build or list the embedded offline benchmarks",
        subcommands={
            "build": Command("write a benchmark split in DomainBed layout", _add_data_build, _run_data_build),
            "list": Command("list the registered benchmarks", run=_run_data_list),
        },
    ),
    "predict": Command("classify images with a saved student (no vendor access)", _add_predict, _run_predict),
    "distill": Command("buy teacher embeddings under a budget and distil a student, leave-one-domain-out "
                       "(the default command)", _lazy("commands.distill", "add_distill_arguments"), _run_distill),
    "compare": Command("every method side by side: leave-one-domain-out over all domains and seeds, one shared "
                       "budget, a DomainBed-style table", _lazy("commands.compare", "add_compare_arguments"), _run_compare),
    "demo": Command("the main job on the embedded default: offline data, demo teacher, local vendor, distillation",
                    _lazy("commands.demo", "add_demo_arguments"), _lazy("commands.demo", "run_demo")),
    "tune": Command("choose each method's learning rate on training-domain validation, the same trials for "
                    "every method (tune.md, selected.json)", _lazy("commands.tune", "add_tune_arguments"),
                    _lazy("commands.tune", "run_tune_command")),
    "experiment": Command("sweep vendor protection modes x budgets x seeds against a local vendor: accuracy, "
                          "fidelity and cost per mode (runs.csv, summary.md, ood_vs_units.png)",
                          _lazy("commands.experiment", "add_experiment_arguments"), _lazy("commands.experiment", "run_experiment_command")),
}
DEFAULT_COMMAND = "distill"


# ----------------------------------------------------------------------------- parser and main
def _attach(sub: argparse._SubParsersAction, commands: dict[str, Command], path: tuple[str, ...],
            argv: Sequence[str] | None) -> None:
    for name, cmd in commands.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        # Only the command being run gets its arguments: adding the training commands' arguments
        # imports the training stack (seconds), which `data list` or `predict` never need.
        chosen = argv is None or (len(argv) > len(path) and argv[len(path)] == name)
        if chosen:
            cmd.add_arguments(p)
        if cmd.subcommands:
            inner = p.add_subparsers(dest=f"cmd_{len(path) + 1}", metavar="COMMAND", required=True)
            _attach(inner, cmd.subcommands, path + (name,), argv if chosen else ())
        else:
            p.set_defaults(_run=cmd.run)


def build_parser(commands: dict[str, Command] | None = None, argv: Sequence[str] | None = None
                 ) -> argparse.ArgumentParser:
    """The parser for ``commands`` (default: :data:`COMMANDS`): complete when ``argv`` is None,
    else with arguments only on the command path ``argv`` selects."""
    parser = _Parser(prog=PROG, description="Black-box VL2V-ADiP distillation client.")
    sub = parser.add_subparsers(dest="cmd_0", metavar="COMMAND", required=True, parser_class=_Parser)
    _attach(sub, COMMANDS if commands is None else commands, (), argv)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that are the user's to fix: the client's :class:`UsageError` branch, plus the two
    outside it (a bad setting in the environment, a bad offline-benchmark request). Exit 2."""
    from pydantic import ValidationError

    from offline_data import OfflineDataError

    return (UsageError, ValidationError, OfflineDataError)


def _run_errors() -> tuple[type[BaseException], ...]:
    """Failures while running: the client's :class:`RunError` branch, plus the operating system's
    (a full disk, a missing file). Exit 1, one line; nothing already bought is lost."""
    return (RunError, OSError)


def _with_default_command(argv: Sequence[str]) -> list[str]:
    """`client-distill --budget ...` means `client-distill distill --budget ...`."""
    argv = list(argv)
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        return [DEFAULT_COMMAND, *argv]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``client-distill``; returns the process exit code."""
    argv = _with_default_command(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv=argv).parse_args(argv)
    args._argv = argv  # `--nproc` re-runs the same command line under torch.distributed.run
    try:
        return int(args._run(args) or 0)
    except _user_errors() as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except _run_errors() as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_RUN
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        return f"invalid setting {'.'.join(map(str, first['loc']))}: {first['msg']}"
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
