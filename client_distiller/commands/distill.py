"""`client-distill distill`: buy teacher targets under the budget, then run leave-one-domain-out
jobs, and print the result table.

Two budget scopes in the run's ledger (`OUT/ledger.sqlite`): `train` (class prompts and
training images; `--budget`) and `eval` (held-out images for the teacher's zero-shot row only;
`--eval-budget`). Evaluation purchases never feed training: each job restricts the targets to
its own source domains' training split.

``--nproc N`` (or a ``torchrun`` launch of ``python -m client_distiller.cli distill ...``) trains
under DDP. Only rank 0 buys: it alone opens the ledger and the embedding cache and talks to the
vendor, while the other ranks wait for its targets in a broadcast (no shared file system needed,
so ranks on other machines get them too); then every rank trains and evaluates, and rank 0 alone
writes the run folder.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, Sequence

from client_distiller.buying.ledger import Ledger
from client_distiller.buying.outputs import methods_for, needs_of
from client_distiller.buying.policy import (ORDERINGS, buy_evaluation_targets, buy_for_methods, evaluation_items,
                                            training_items)
from client_distiller.buying.purchaser import Purchaser
from client_distiller.buying.teacher_client import TeacherClient
from client_distiller.commands.argtypes import non_negative_int, positive_float, positive_int
from client_distiller.commands.setup import add_vendor_arguments, client_settings
from client_distiller.data import DomainBedFolder
from client_distiller.errors import UsageError
from client_distiller.lodo import RESULTS_FILE, run_job
from client_distiller.reporting.evaluate import latest_per_trial, read_jsonl
from client_distiller.reporting.student_cost import plot_accuracy, student_cost
from client_distiller.settings import ClientSettings
from client_distiller.targets import TeacherTargets
from client_distiller.training.methods import parse_hparams
from client_distiller.training.recipe import Recipe, Schedule
from client_distiller.training.students import DEFAULT_STUDENT

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("erm", "vl2v-adip")


class JobSetupError(UsageError):
    """A job cannot start: missing vendor URL or key, unknown domain, bad numbers."""


@dataclass(frozen=True)
class DistillConfig:
    """What ``client-distill distill`` was asked to do, typed and validated: the one object the
    command hands to :func:`run_distill` (and ``demo`` builds directly)."""

    settings: ClientSettings
    data: Path
    out: Path
    schedule: Schedule
    test_domains: tuple[str, ...] = ()   # empty: every domain of the dataset in turn
    methods: tuple[str, ...] = ()        # empty: DEFAULT_METHODS, adapted to what the key sells
    hparams: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    seed: int = 0
    nproc: int = 1
    dist_timeout_min: float = 720.0


@dataclass(frozen=True)
class DistillOptions:
    """One run's resolved plan: the config's choices checked against the dataset and the key's
    protection mode (what rank 0 broadcasts to the other ranks)."""

    data: Path
    out: Path
    test_domains: list[str]
    methods: list[str]
    schedule: Schedule
    seed: int
    hparams: Mapping[str, Mapping[str, float]]
    holdout: float = 0.2


def add_job_arguments(parser: argparse.ArgumentParser, *, data_required: bool = True,
                      methods_help: str = "method (repeatable); default: erm, vl2v-adip",
                      defaults: Recipe | None = None) -> None:
    """The leave-one-domain-out job's arguments (data, held-out domains, methods, student,
    schedule, hyperparameters), with ``defaults`` for the schedule (``compare``: the CPU recipe)."""
    r = defaults
    parser.add_argument("--data", type=Path, required=data_required,
                        help="DomainBed-layout dataset root/<domain>/<class>/<img>")
    parser.add_argument("--test-domain", action="append", dest="test_domains",
                        help="held-out domain (repeatable); default: every domain in turn")
    parser.add_argument("--out", type=Path, default=Path("runs/distill"), help="run folder (resumable)")
    parser.add_argument("--method", action="append", dest="methods", help=methods_help)
    parser.add_argument("--student", default=DEFAULT_STUDENT, help="student backbone (a registered name or any timm model)")
    parser.add_argument("--random-init", action="store_true", help="start the student from random weights (ablations, tests)")
    parser.add_argument("--steps", type=positive_int, default=r.steps if r else 300,
                        help="steps per training stage (Align: see --align-steps)")
    parser.add_argument("--align-steps", type=positive_int, default=r.align_steps if r else None,
                        help="steps of the Align stage (projection on cached features; cheap); default: --steps")
    parser.add_argument("--batch-size", type=positive_int, default=r.batch_size if r else 32,
                        help="images per source domain per step")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="student input size; default: the teacher's, from the vendor's /v1/models")
    parser.add_argument("--eval-every", type=positive_int, default=r.eval_every if r else 100,
                        help="steps between training-domain validations (model selection)")
    parser.add_argument("--selection", choices=sorted(ORDERINGS), help="which images to buy first (CLIENT_SELECTION)")
    parser.add_argument("--hparam", action="append", dest="hparams", default=[], metavar="METHOD.NAME=VALUE",
                        help="override a method hyperparameter, e.g. vl2v-adip.lr=1e-3 (repeatable)")


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    add_vendor_arguments(parser)
    add_job_arguments(parser)
    parser.add_argument("--seed", type=non_negative_int, default=0, help="trial seed (splits, initialisation, order)")
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="train under DDP on this many local processes (one per GPU; gloo on CPU); "
                             "--batch-size stays per domain and per process; only rank 0 buys")
    parser.add_argument("--dist-timeout-min", type=positive_float, default=720.0,
                        help="longest wait of one rank on another (the others wait while rank 0 buys)")


def schedule_from(args: argparse.Namespace) -> Schedule:
    return Schedule(student=args.student, pretrained=not args.random_init, steps=args.steps,
                    align_steps=args.align_steps, batch_size=args.batch_size, image_size=args.image_size,
                    eval_every=args.eval_every)


def config_from(args: argparse.Namespace) -> DistillConfig:
    """The typed config of a ``distill`` command line (flags over ``CLIENT_*`` variables)."""
    methods = tuple(args.methods or ())
    return DistillConfig(settings=client_settings(args), data=args.data, out=args.out, schedule=schedule_from(args),
                         test_domains=tuple(args.test_domains or ()), methods=methods,
                         hparams=parse_hparams(args.hparams or [], methods or DEFAULT_METHODS), seed=args.seed,
                         nproc=args.nproc, dist_timeout_min=args.dist_timeout_min)


def run_distill(cfg: DistillConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Buy, train, evaluate, report. Returns a summary (also written to OUT/summary.json); under
    DDP the other ranks return ``{}`` (rank 0 reports)."""
    from client_distiller.commands.torchrun import broadcast_from_main, init_distributed
    from client_distiller.training.loop import DistInfo

    created = init_distributed(timedelta(minutes=cfg.dist_timeout_min))
    import torch.distributed as dist

    try:
        info = DistInfo.current()
        bought = broadcast_from_main(lambda: _buy(cfg, show_progress), info)
        summary = _train_and_report(bought, show_progress=show_progress and info.is_main, main=info.is_main)
        if created:  # on success only: a failed rank exits at once and torchrun stops the others
            dist.barrier()
        return summary
    finally:
        if created:
            dist.destroy_process_group()


@dataclass
class _Bought:
    """What rank 0's purchases hand to every rank (picklable: it crosses the broadcast)."""

    options: DistillOptions
    data: DomainBedFolder
    targets: TeacherTargets
    eval_targets: TeacherTargets | None
    units: dict[str, int]
    summary: dict[str, Any]


def resolve(cfg: DistillConfig, data: DomainBedFolder) -> DistillOptions:
    """The config checked against the dataset: unknown held-out domains are a clear error."""
    for name in cfg.test_domains:
        data.domain_index(name)
    return DistillOptions(data=cfg.data, out=cfg.out, test_domains=list(cfg.test_domains or data.domains),
                          methods=list(cfg.methods or DEFAULT_METHODS), schedule=cfg.schedule, seed=cfg.seed,
                          hparams=cfg.hparams)


def _buy(cfg: DistillConfig, show_progress: bool) -> _Bought:
    """Every purchase of the run (rank 0 only under DDP): class prompts, training images, the
    teacher's evaluation row; saves ``OUT/targets``."""
    settings = cfg.settings
    if not settings.vendor_url or settings.api_key is None:
        raise JobSetupError("the vendor URL and API key are required (--vendor-url/--api-key or CLIENT_VENDOR_URL/CLIENT_API_KEY)")
    data = DomainBedFolder.scan(cfg.data)
    options = resolve(cfg, data)
    options.out.mkdir(parents=True, exist_ok=True)
    api_key = settings.api_key.get_secret_value()
    ledger = Ledger(options.out / "ledger.sqlite")
    with TeacherClient(settings.vendor_url, api_key, timeout_s=settings.timeout_s,
                       max_attempts=settings.max_attempts) as client:
        with purchaser(client, settings, ledger, "train", show_progress) as buyer:
            methods, notice = methods_for(buyer.card, cfg.methods or None)  # what this key's mode sells
            if notice:
                print(f"note: {notice}", flush=True)
            options = replace(options, methods=methods)
            items = training_items(data, options.test_domains, seed=options.seed, holdout=options.holdout)
            targets, plan = buy_for_methods(buyer, data.class_names, items, needs_of(options.methods),
                                            selection=settings.selection, seed=options.seed)
            card = buyer.card
        eval_targets = buy_teacher_row(client, settings, ledger, data, options.test_domains, targets,
                                       seed=options.seed, holdout=options.holdout, show_progress=show_progress)
    targets.save(options.out / "targets")
    if options.schedule.image_size is None:  # the teacher's input size: what its embeddings were computed at
        options = replace(options, schedule=replace(options.schedule, image_size=card.image_size))
    units = {"units_train": ledger.settled("train"), "units_eval": ledger.settled("eval")}
    ledger.close()
    summary = {
        "teacher": card.id, "teacher_embedding_dim": card.embedding_dim, "protection": card.protection,
        "budget": settings.budget, "eval_budget": settings.eval_budget, **units,
        "images_bought": plan.images_known or plan.probabilities_known, "images_wanted": plan.images_wanted,
        "prompts": plan.prompts,
    }
    return _Bought(options, data, targets, eval_targets, units, summary)


def purchaser(client: TeacherClient, settings: ClientSettings, ledger: Ledger, scope: str,
              show_progress: bool) -> Purchaser:
    """A purchaser of ``scope`` ("train" or "eval") under that scope's budget in ``settings``."""
    budget = settings.budget if scope == "train" else settings.eval_budget
    return Purchaser(client, cache_dir=settings.cache_dir, ledger=ledger, budget=budget, scope=scope,
                     api_key=settings.api_key.get_secret_value() if settings.api_key else "",
                     batch_size=settings.request_batch, show_progress=show_progress)


def buy_teacher_row(client: TeacherClient, settings: ClientSettings, ledger: Ledger, data: DomainBedFolder,
                    test_domains: Sequence[str], train_targets: TeacherTargets, *, seed: int, holdout: float = 0.2,
                    show_progress: bool) -> TeacherTargets | None:
    """The teacher's answers for the zero-shot row, under the separate ``eval`` budget (None when
    that budget is 0): never training targets."""
    if settings.eval_budget <= 0:
        return None
    with purchaser(client, settings, ledger, "eval", show_progress) as eval_buyer:
        items = evaluation_items(data, test_domains, seed=seed, holdout=holdout)
        return buy_evaluation_targets(eval_buyer, items, train_targets, seed=seed)


def _train_and_report(bought: _Bought, *, show_progress: bool, main: bool = True) -> dict[str, Any]:
    """Every leave-one-domain-out job (on every rank under DDP), then rank 0's summary."""
    options, units = bought.options, bought.units
    results = []
    for test_domain in options.test_domains:
        result = run_job(options.data, test_domain, bought.targets, methods=options.methods,
                         schedule=options.schedule, seed=options.seed, holdout=options.holdout,
                         out_dir=options.out, eval_targets=bought.eval_targets, units=units, hparams=options.hparams,
                         show_progress=show_progress)
        results.append(result)
    if not main:
        return {}
    deployed = [p for r in results for m, p in r.students.items() if m == "vl2v-adip"] or \
        [p for r in results for p in r.students.values()]
    cost = student_cost(deployed[-1]) if deployed else {}
    plot = plot_accuracy(latest_per_trial(read_jsonl(options.out / RESULTS_FILE)), options.out / "results.png")
    summary = {
        **bought.summary, **cost, "plot": str(plot),
        "test_domains": options.test_domains, "methods": options.methods,
        "students": {r.test_domain: {m: str(p) for m, p in r.students.items()} for r in results},
        "table": results[-1].table if results else "",
    }
    (options.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
