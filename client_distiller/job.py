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
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

from .argtypes import non_negative_int, positive_float, positive_int
from .data import DomainBedFolder, leave_one_out
from .errors import UsageError
from .ledger import Ledger
from .evaluate import read_jsonl
from .pipeline import RESULTS_FILE, run_job
from .modes import methods_for, needs_of
from .plan import ORDERINGS, buy_for_methods, buy_images, buy_probabilities
from .purchase import Purchaser
from .report import plot_accuracy, student_cost
from .settings import ClientSettings
from .students import DEFAULT_STUDENT
from .targets import TeacherTargets
from .teacher_client import TeacherClient

log = logging.getLogger(__name__)


class JobSetupError(UsageError):
    """A job cannot start: missing vendor URL or key, unknown domain, bad numbers."""


@dataclass(frozen=True)
class DistillOptions:
    data: Path
    out: Path
    test_domains: list[str]
    methods: list[str]
    student: str
    steps: int
    batch_size: int
    image_size: int | None
    eval_every: int
    seed: int
    hparams: dict[str, dict[str, float]]
    pretrained: bool = True
    holdout: float = 0.2
    align_steps: int | None = None

    @property
    def stage_steps(self) -> int | dict[str, int]:
        """``steps`` for every stage, or ``{"align": align_steps, "*": steps}`` when Align has its own."""
        return self.steps if self.align_steps is None else {"align": self.align_steps, "*": self.steps}


def add_distill_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vendor-url", help="vendor base URL (CLIENT_VENDOR_URL)")
    parser.add_argument("--api-key", help="vendor API key (CLIENT_API_KEY)")
    parser.add_argument("--budget", type=non_negative_int, help="hard ceiling on units for training targets (CLIENT_BUDGET)")
    parser.add_argument("--eval-budget", type=non_negative_int, help="separate ceiling for the teacher zero-shot row (CLIENT_EVAL_BUDGET)")
    parser.add_argument("--data", type=Path, required=True, help="DomainBed-layout dataset root/<domain>/<class>/<img>")
    parser.add_argument("--test-domain", action="append", dest="test_domains",
                        help="held-out domain (repeatable); default: every domain in turn")
    parser.add_argument("--out", type=Path, default=Path("runs/distill"), help="run folder (resumable)")
    parser.add_argument("--method", action="append", dest="methods", help="method (repeatable); default: erm, vl2v-adip")
    parser.add_argument("--student", default=DEFAULT_STUDENT, help="student backbone (a registered name or any timm model)")
    parser.add_argument("--random-init", action="store_true", help="start the student from random weights (ablations, tests)")
    parser.add_argument("--steps", type=positive_int, default=300, help="steps per training stage (Align: see --align-steps)")
    parser.add_argument("--align-steps", type=positive_int, default=None,
                        help="steps of the Align stage (projection on cached features; cheap); default: --steps")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per source domain per step")
    parser.add_argument("--image-size", type=positive_int, default=None,
                        help="student input size; default: the teacher's, from the vendor's /v1/models")
    parser.add_argument("--eval-every", type=positive_int, default=100)
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--cache-dir", type=Path, help="embedding cache (CLIENT_CACHE_DIR)")
    parser.add_argument("--selection", choices=sorted(ORDERINGS), help="which images to buy first (CLIENT_SELECTION)")
    parser.add_argument("--hparam", action="append", dest="hparams", default=[], metavar="METHOD.NAME=VALUE",
                        help="override a method hyperparameter, e.g. vl2v-adip.lr=1e-3 (repeatable)")
    parser.add_argument("--nproc", type=positive_int, default=1,
                        help="train under DDP on this many local processes (one per GPU; gloo on CPU); "
                             "--batch-size stays per domain and per process; only rank 0 buys")
    parser.add_argument("--dist-timeout-min", type=positive_float, default=720.0,
                        help="longest wait of one rank on another (the others wait while rank 0 buys)")


def settings_from(args: argparse.Namespace) -> ClientSettings:
    overrides = {k: v for k, v in {"vendor_url": args.vendor_url, "api_key": args.api_key, "budget": args.budget,
                                   "eval_budget": args.eval_budget, "cache_dir": args.cache_dir,
                                   "selection": args.selection}.items() if v is not None}
    return ClientSettings(**overrides)


def options_from(args: argparse.Namespace, data: DomainBedFolder) -> DistillOptions:
    for name in args.test_domains or []:
        data.domain_index(name)  # raises a clear error for an unknown domain
    if args.steps < 1 or args.batch_size < 1:
        raise JobSetupError("--steps and --batch-size must be positive")
    return DistillOptions(data=args.data, out=args.out, test_domains=list(args.test_domains or data.domains),
                          methods=options_methods(args), student=args.student, steps=args.steps,
                          batch_size=args.batch_size, image_size=args.image_size, eval_every=args.eval_every,
                          seed=args.seed, hparams=parse_hparams(getattr(args, "hparams", None) or [], options_methods(args)),
                          pretrained=not getattr(args, "random_init", False),
                          align_steps=getattr(args, "align_steps", None))


def options_methods(args: argparse.Namespace) -> list[str]:
    return list(args.methods or ["erm", "vl2v-adip"])


def parse_hparams(pairs: Sequence[str], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """`vl2v-adip.lr=1e-3` -> {"vl2v-adip": {"lr": 0.001}}; unknown methods or names are errors."""
    from .methods import get_method

    out: dict[str, dict[str, float]] = {}
    for pair in pairs:
        target, sep, value = pair.partition("=")
        method, dot, name = target.rpartition(".")
        if not sep or not dot or method not in methods:
            raise JobSetupError(f"--hparam {pair!r}: expected METHOD.NAME=VALUE with METHOD one of {', '.join(methods)}")
        known = get_method(method).HPARAMS
        if name not in known:
            raise JobSetupError(f"--hparam {pair!r}: {method} has no hyperparameter {name!r} (known: {', '.join(known)})")
        try:
            out.setdefault(method, {})[name] = float(value)
        except ValueError:
            raise JobSetupError(f"--hparam {pair!r}: {value!r} is not a number") from None
    return out


def _grouped(items: Sequence[tuple[Path, int]], domain: int, classes: int) -> list[tuple[Path, int]]:
    """Label each item by (domain, class) so the buying order balances domains as well as classes."""
    return [(path, domain * classes + label) for path, label in items]


def training_items(data: DomainBedFolder, options: DistillOptions) -> list[tuple[Path, int]]:
    """The union of the source domains' training splits over every requested job."""
    chosen: dict[Path, tuple[Path, int]] = {}
    for test_domain in options.test_domains:
        loo = leave_one_out(data, test_domain, seed=options.seed, holdout=options.holdout)
        for split in loo.sources:
            for item in _grouped(split.train, data.domain_index(split.domain), len(data.classes)):
                chosen.setdefault(item[0], item)
    return list(chosen.values())


def evaluation_items(data: DomainBedFolder, options: DistillOptions) -> list[tuple[Path, int]]:
    """Held-out images: every test domain, then the source out-splits (for the ID column)."""
    chosen: dict[Path, tuple[Path, int]] = {}
    for test_domain in options.test_domains:
        loo = leave_one_out(data, test_domain, seed=options.seed, holdout=options.holdout)
        for item in _grouped(loo.test, data.domain_index(test_domain), len(data.classes)):
            chosen.setdefault(item[0], item)
        for split in loo.sources:
            for item in _grouped(split.val, data.domain_index(split.domain), len(data.classes)):
                chosen.setdefault(item[0], item)
    return list(chosen.values())


def run_distill(args: argparse.Namespace, *, show_progress: bool = True) -> dict[str, Any]:
    """Buy, train, evaluate, report. Returns a summary (also written to OUT/summary.json); under
    DDP the other ranks return ``{}`` (rank 0 reports)."""
    from .distributed import broadcast_from_main, init_distributed
    from .train import DistInfo

    created = init_distributed(timedelta(minutes=getattr(args, "dist_timeout_min", 720.0)))
    import torch.distributed as dist

    try:
        info = DistInfo.current()
        bought = broadcast_from_main(lambda: _buy(args, show_progress), info)
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


def _buy(args: argparse.Namespace, show_progress: bool) -> _Bought:
    """Every purchase of the run (rank 0 only under DDP): class prompts, training images, the
    teacher's evaluation row; saves ``OUT/targets``."""
    settings = settings_from(args)
    if not settings.vendor_url or settings.api_key is None:
        raise JobSetupError("the vendor URL and API key are required (--vendor-url/--api-key or CLIENT_VENDOR_URL/CLIENT_API_KEY)")
    data = DomainBedFolder.scan(args.data)
    options = options_from(args, data)
    options.out.mkdir(parents=True, exist_ok=True)
    api_key = settings.api_key.get_secret_value()
    ledger = Ledger(options.out / "ledger.sqlite")
    with TeacherClient(settings.vendor_url, api_key, timeout_s=settings.timeout_s,
                       max_attempts=settings.max_attempts) as client:
        buyer = Purchaser(client, cache_dir=settings.cache_dir, ledger=ledger, budget=settings.budget, scope="train",
                          api_key=api_key, batch_size=settings.request_batch, show_progress=show_progress)
        try:
            options = _adapt_to_mode(buyer, args, options)  # issue 5: what this key's protection mode sells
            targets, plan = buy_for_methods(buyer, data.class_names, training_items(data, options),
                                            needs_of(options.methods), selection=settings.selection,
                                            seed=options.seed)
        finally:
            buyer.close()
        eval_targets = _buy_eval_targets(client, settings, ledger, api_key, data, options, targets, show_progress)
        card = buyer.card
    targets.save(options.out / "targets")
    if options.image_size is None:  # the teacher's input size: what its embeddings were computed at
        options = replace(options, image_size=card.image_size)
    units = {"units_train": ledger.settled("train"), "units_eval": ledger.settled("eval")}
    ledger.close()
    summary = {
        "teacher": card.id, "teacher_embedding_dim": card.embedding_dim, "protection": card.protection,
        "budget": settings.budget, "eval_budget": settings.eval_budget, **units,
        "images_bought": plan.images_known or plan.probabilities_known, "images_wanted": plan.images_wanted,
        "prompts": plan.prompts,
    }
    return _Bought(options, data, targets, eval_targets, units, summary)


def _train_and_report(bought: _Bought, *, show_progress: bool, main: bool = True) -> dict[str, Any]:
    """Every leave-one-domain-out job (on every rank under DDP), then rank 0's summary."""
    options, units = bought.options, bought.units
    results = []
    for test_domain in options.test_domains:
        result = run_job(options.data, test_domain, bought.targets, methods=options.methods, student=options.student,
                         pretrained=options.pretrained,
                         steps=options.stage_steps, batch_size=options.batch_size, eval_every=options.eval_every,
                         image_size=options.image_size, seed=options.seed, holdout=options.holdout,
                         out_dir=options.out, eval_targets=bought.eval_targets, units=units, hparams=options.hparams,
                         show_progress=show_progress)
        results.append(result)
    if not main:
        return {}
    deployed = [p for r in results for m, p in r.students.items() if m == "vl2v-adip"] or \
        [p for r in results for p in r.students.values()]
    cost = student_cost(deployed[-1]) if deployed else {}
    plot = plot_accuracy(read_jsonl(options.out / RESULTS_FILE), options.out / "results.png")
    summary = {
        **bought.summary, **cost, "plot": str(plot),
        "test_domains": options.test_domains, "methods": options.methods,
        "students": {r.test_domain: {m: str(p) for m, p in r.students.items()} for r in results},
        "table": results[-1].table if results else "",
    }
    (options.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _adapt_to_mode(buyer: Purchaser, args: argparse.Namespace, options: DistillOptions) -> DistillOptions:
    """Default methods follow the key's output (a probabilities key trains erm + kd, with a
    one-line notice); explicit methods it cannot feed are a clear error (`modes.ModeMismatch`)."""
    methods, notice = methods_for(buyer.card, args.methods)
    if notice:
        print(f"note: {notice}", flush=True)
    return replace(options, methods=methods)


def _buy_eval_targets(client: TeacherClient, settings: ClientSettings, ledger: Ledger, api_key: str,
                      data: DomainBedFolder, options: DistillOptions, train_targets: TeacherTargets,
                      show_progress: bool) -> TeacherTargets | None:
    if settings.eval_budget <= 0:
        return None
    buyer = Purchaser(client, cache_dir=settings.cache_dir, ledger=ledger, budget=settings.eval_budget, scope="eval",
                      api_key=api_key, batch_size=settings.request_batch, show_progress=show_progress)
    try:
        ordered = ORDERINGS["balanced"](evaluation_items(data, options), options.seed)
        if train_targets.text_embeddings is None:  # a probabilities key: the teacher's row from its probabilities
            probabilities = buy_probabilities(buyer, ordered, train_targets.class_names)
            return TeacherTargets(train_targets.class_names, None, {}, train_targets.logit_scale,
                                  train_targets.teacher_id, image_probabilities=probabilities,
                                  image_size=train_targets.image_size)
        images = buy_images(buyer, ordered)
    finally:
        buyer.close()
    return TeacherTargets(train_targets.class_names, train_targets.text_embeddings, images,
                          train_targets.logit_scale, train_targets.teacher_id, image_size=train_targets.image_size)
