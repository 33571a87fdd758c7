"""`client-distill compare`: every method side by side, leave-one-domain-out, over seeds, one budget.

1. Decide which methods run: every registered one (or ``--method``), minus white-box methods without
   teacher weights and methods the key's output mode cannot feed, each skip printed with its reason.
2. Buy, once, the union of what they need (:func:`client_distiller.buying.policy.buy_for_methods`) under one
   ``--budget`` into the shared cache: comparing five methods costs what the most demanding set of
   outputs costs, not five budgets. A method's "units" column is what *its* outputs cost.
3. For each seed and test domain, :func:`client_distiller.lodo.run_job` trains the methods not
   yet finished (resumable: records already in ``OUT/results.jsonl`` are skipped) with
   training-domain validation model selection. A folder whose records were made with another
   teacher's answers (``OUT/targets`` differs) is refused rather than mixed into one table.
4. Write ``OUT/compare.md`` (DomainBed-style: rows = teacher zero-shot + methods, columns = each
   test domain's OOD accuracy mean ± standard error over seeds, the average, the ID average, units)
   and ``OUT/compare.csv``; the per-record JSON lines stay in ``OUT/results.jsonl``.

``--local`` starts the same local vendor as ``client-distill demo`` (:class:`LocalVendor` with the
offline demo teacher) and uses the demo teacher's local dir as VL2V-SD's teacher weights.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from pydantic import SecretStr

from shared.protocol import OUTPUT_EMBEDDINGS, OutputKind

from client_distiller.commands.argtypes import non_negative_int, positive_int
from client_distiller.commands.distill import add_job_arguments
from client_distiller.commands.setup import (DEMO_WORKDIR, add_vendor_arguments, client_settings, local_vendor,
                                             offline_benchmark)
from client_distiller.data import DomainBedFolder
from client_distiller.errors import UsageError
from client_distiller.lodo import RESULTS_FILE, run_job
from client_distiller.reporting.command_line import shell_command
from client_distiller.reporting.evaluate import TEACHER_ZERO_SHOT, read_jsonl
from client_distiller.reporting.tables import mean_se
from client_distiller.settings import ClientSettings
from client_distiller.training.recipe import Schedule
from client_distiller.training.recipe import CPU_RECIPE

if TYPE_CHECKING:
    from client_distiller.targets import TeacherTargets

COMPARE_MD, COMPARE_CSV = "compare.md", "compare.csv"


class CompareError(UsageError):
    """A comparison cannot start: no method left to run, no vendor, bad arguments."""


LOCAL_BUDGET, LOCAL_EVAL_BUDGET = 3000, 1000  # --local's defaults: the offline benchmark's training split fits


@dataclass(frozen=True)
class CompareConfig:
    """What ``client-distill compare`` was asked to do, typed: the vendor (or ``local``), the
    data (None with ``local``: the offline benchmark), the methods (empty: every registered one),
    the schedule every method shares, the seeds, and the hyperparameter overrides on top of the
    recipe's (raw ``METHOD.NAME=VALUE``: validated once the methods that run are known)."""

    settings: ClientSettings
    out: Path
    schedule: Schedule
    seeds: tuple[int, ...]
    data: Path | None = None
    test_domains: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    hparams: tuple[str, ...] = ()
    local: bool = False
    workdir: Path = DEMO_WORKDIR
    data_size: str = "small"
    teacher_size: str = "full"
    teacher_weights: str | None = None
    sentences: Path | None = None
    bank_size: int = 300


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    add_vendor_arguments(p)
    add_job_arguments(p, data_required=False,  # --local builds the offline benchmark
                      methods_help="method (repeatable); default: every registered method", defaults=CPU_RECIPE)
    p.set_defaults(out=Path("runs/compare"))
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2], help="trial seeds (default 0 1 2)")
    p.add_argument("--local", action="store_true",
                   help="start a local vendor with the offline demo teacher (as `client-distill demo`)")
    p.add_argument("--workdir", type=Path, default=DEMO_WORKDIR,
                   help="--local: where the demo teacher, vendor data and offline benchmark live")
    p.add_argument("--data-size", choices=["tiny", "small", "full"], default="small",
                   help="--local without --data: the offline benchmark preset")
    p.add_argument("--teacher-size", choices=["tiny", "full"], default="full", help="--local: demo teacher size")
    p.add_argument("--teacher-weights", default=None, metavar="SPEC",
                   help="open_clip spec of the teacher's weights for white-box methods (vl2v-sd): local-dir:PATH, "
                        "hf-hub:ORG/REPO or ARCH:WEIGHTS; --local uses the demo teacher's")
    p.add_argument("--sentences", type=Path, default=None, metavar="FILE",
                   help="sentence bank for dime-fm / clip-kd, one per line (default: built from the class names)")
    p.add_argument("--bank-size", type=positive_int, default=300, help="size of the default sentence bank")


def config_from(args: argparse.Namespace) -> CompareConfig:
    """The typed config of a ``compare`` command line; ``--local`` brings its own budget and cache
    defaults (the demo's cache: what the demo bought is not paid again), below flags and ``CLIENT_*``."""
    from client_distiller.commands.distill import schedule_from
    from client_distiller.training.methods import parse_hparams
    from client_distiller.training.methods import METHODS

    if args.data is None and not args.local:
        raise CompareError("--data is required (or --local, which builds the offline benchmark)")
    parse_hparams(args.hparams or [], list(args.methods or METHODS))  # a bad --hparam fails before any purchase
    local_defaults = {"budget": LOCAL_BUDGET, "eval_budget": LOCAL_EVAL_BUDGET,
                      "cache_dir": args.workdir / "cache"} if args.local else {}
    return CompareConfig(settings=client_settings(args, **local_defaults), out=args.out,
                         schedule=schedule_from(args), seeds=tuple(args.seeds), data=args.data,
                         test_domains=tuple(args.test_domains or ()), methods=tuple(args.methods or ()),
                         hparams=tuple(args.hparams or ()), local=args.local, workdir=args.workdir,
                         data_size=args.data_size, teacher_size=args.teacher_size,
                         teacher_weights=args.teacher_weights, sentences=args.sentences, bank_size=args.bank_size)


# ---------------------------------------------------------------------- which methods run
def select_methods(requested: Sequence[str] | None, *, teacher_weights: str | None,
                   output: OutputKind = OUTPUT_EMBEDDINGS) -> tuple[list[str], dict[str, str]]:
    """(methods to run, {skipped method: reason}); unknown names raise ``UnknownMethodError``."""
    from client_distiller.buying.outputs import output_use_named
    from client_distiller.training.methods import METHODS, get_method

    provides = output_use_named(output).provides
    names = list(requested) if requested else list(METHODS)
    run, skipped = [], {}
    for name in names:
        cls = get_method(name)
        if cls.white_box and not teacher_weights:
            skipped[name] = "white-box: needs the teacher's weights (--teacher-weights SPEC, or --local)"
        elif not cls.needs <= provides:
            skipped[name] = (f"needs {', '.join(sorted(cls.needs - provides))}, which a "
                             f"{output}-only key does not sell")
        else:
            run.append(name)
    return run, skipped


def done_keys(records: Sequence[Mapping[str, Any]]) -> set[tuple[str, str, int]]:
    """(method, test domain, seed) of every finished record: what a resumed run skips."""
    return {(r["method"], r["test_domain"], int(r["seed"])) for r in records if r["method"] != TEACHER_ZERO_SHOT}


# ---------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Row:
    method: str
    ood: dict[str, list[float]]   # test domain -> OOD accuracy per seed
    id: dict[str, list[float]]    # test domain -> ID accuracy per seed
    units: float | None


def collect(records: Sequence[Mapping[str, Any]], methods: Sequence[str], domains: Sequence[str],
            seeds: Sequence[int]) -> list[Row]:
    """One row per method (teacher zero-shot first); the last record of each (method, domain, seed) wins."""
    latest: dict[tuple[str, str, int], Mapping[str, Any]] = {}
    for r in records:
        if r["test_domain"] in domains and int(r["seed"]) in seeds:
            latest[(r["method"], r["test_domain"], int(r["seed"]))] = r
    rows = []
    for m in [TEACHER_ZERO_SHOT, *methods]:
        mine = [r for (mm, _, _), r in latest.items() if mm == m]
        ood = {d: [float(r["ood_acc"]) for r in mine if r["test_domain"] == d and r.get("ood_acc") is not None]
               for d in domains}
        idd = {d: [float(r["id_acc"]) for r in mine if r["test_domain"] == d and r.get("id_acc") is not None]
               for d in domains}
        units = [float(r["units_spent"]) for r in mine if r.get("units_spent") is not None]
        rows.append(Row(m, ood, idd, max(units) if units else None))
    return rows


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    m, se = mean_se([100 * v for v in values])
    return f"{m:.1f} ± {se:.1f}" if len(values) > 1 else f"{m:.1f}"


def _avg(per_domain: Mapping[str, list[float]]) -> float | None:
    """DomainBed's average: the mean of per-domain means, only when every domain has a result."""
    if not per_domain or any(not v for v in per_domain.values()):
        return None
    return 100 * sum(sum(v) / len(v) for v in per_domain.values()) / len(per_domain)


def compare_markdown(rows: Sequence[Row], domains: Sequence[str]) -> str:
    from client_distiller.reporting.evaluate import METHOD_TITLES

    header = ["Method", *domains, "Avg", "ID avg", "Units"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        avg, id_avg = _avg(row.ood), _avg(row.id)
        cells = [METHOD_TITLES.get(row.method, row.method), *(_cell(row.ood[d]) for d in domains),
                 "-" if avg is None else f"{avg:.1f}", "-" if id_avg is None else f"{id_avg:.1f}",
                 "-" if row.units is None else f"{row.units:g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], domains: Sequence[str], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "test_domain", "ood_mean", "ood_se", "id_mean", "id_se", "n_seeds", "units"])
        for row in rows:
            for d in [*domains, "avg"]:
                if d == "avg":
                    o, i = _avg(row.ood), _avg(row.id)
                    w.writerow([row.method, d, "" if o is None else round(o, 2), "", "" if i is None else round(i, 2),
                                "", "", "" if row.units is None else row.units])
                    continue
                om, ose = mean_se([100 * v for v in row.ood[d]]) if row.ood[d] else (None, None)
                im, ise = mean_se([100 * v for v in row.id[d]]) if row.id[d] else (None, None)
                w.writerow([row.method, d, *("" if v is None else round(v, 2) for v in (om, ose, im, ise)),
                            len(row.ood[d]), "" if row.units is None else row.units])
    return path


def write_report(out: Path, methods: Sequence[str], domains: Sequence[str], seeds: Sequence[int], *,
                 notes: Sequence[str] = ()) -> str:
    """Rebuild ``compare.md`` and ``compare.csv`` from ``results.jsonl``; returns the Markdown."""
    records = read_jsonl(out / RESULTS_FILE) if (out / RESULTS_FILE).is_file() else []
    rows = collect(records, methods, domains, seeds)
    table = compare_markdown(rows, domains)
    body = [f"OOD accuracy (%) per held-out domain, mean ± standard error over seeds {', '.join(map(str, seeds))}; "
            "Avg: mean of the per-domain means; ID avg: source-domain validation accuracy; Units: what the "
            "teacher outputs a method needs cost (one shared purchase serves all methods).", "", table, *notes]
    (out / COMPARE_MD).write_text("\n".join(body).rstrip() + "\n")
    write_csv(rows, domains, out / COMPARE_CSV)
    return table


def command_line(cfg: CompareConfig, methods: Sequence[str]) -> str:
    """The command that reproduces the table, from the resolved options; never the API key."""
    s = cfg.schedule
    parts = ["client-distill", "compare"]
    if cfg.local:
        parts += ["--local"]
    else:
        parts += ["--vendor-url", str(cfg.settings.vendor_url), "--api-key", "$CLIENT_API_KEY"]
    if cfg.data is not None:
        parts += ["--data", str(cfg.data)]
    for m in methods:
        parts += ["--method", m]
    for d in cfg.test_domains:
        parts += ["--test-domain", d]
    parts += ["--seeds", *map(str, cfg.seeds), "--student", s.student, "--steps", str(s.steps),
              "--align-steps", str(s.align_steps), "--batch-size", str(s.batch_size),
              *(["--image-size", str(s.image_size)] if s.image_size else []),
              "--eval-every", str(s.eval_every), "--budget", str(cfg.settings.budget), "--out", str(cfg.out)]
    if not s.pretrained:
        parts += ["--random-init"]
    if cfg.teacher_weights:
        parts += ["--teacher-weights", cfg.teacher_weights]
    if cfg.sentences:
        parts += ["--sentences", str(cfg.sentences)]
    for h in cfg.hparams:
        parts += ["--hparam", h]
    return shell_command(parts)


# ---------------------------------------------------------------------- running it
@contextlib.contextmanager
def _vendor(cfg: CompareConfig) -> Iterator[tuple[str, str, str | None]]:
    """(vendor URL, API key, default teacher weights): a local demo vendor with ``--local``."""
    if not cfg.local:
        if not cfg.settings.vendor_url or cfg.settings.api_key is None:
            raise CompareError("a vendor is required: --vendor-url/--api-key (or CLIENT_*), or --local")
        yield cfg.settings.vendor_url, cfg.settings.api_key.get_secret_value(), None
        return
    quota = cfg.settings.budget + cfg.settings.eval_budget
    with local_vendor(cfg.workdir, teacher_size=cfg.teacher_size, quota=quota, key_prefix="compare") as access:
        yield access.url, access.api_key, access.teacher_weights


SAME_TEACHER_TOLERANCE = 1e-3  # well above float noise between runs, far below two teacher builds' gap


def check_same_teacher(out: Path, targets: TeacherTargets) -> None:
    """Refuse to add records to a run folder whose earlier records were trained on another teacher's
    answers (``OUT/targets``, saved by the run that made them): one table must show one teacher."""
    from client_distiller.targets import TargetsError, TeacherTargets  # noqa: F811 (the runtime import)

    if not (out / RESULTS_FILE).is_file() or not (out / "targets").is_dir():
        return
    try:
        earlier = TeacherTargets.load(out / "targets")
    except TargetsError as exc:
        raise CompareError(f"{out} holds records but its saved targets cannot be read ({exc}); "
                           "use a new --out") from None
    gap = targets.difference(earlier)
    if gap > SAME_TEACHER_TOLERANCE:
        raise CompareError(f"{out} holds records made with another teacher's answers (largest difference "
                           f"{gap:.3g}; the offline demo teacher differs between CPU types): use a new --out, "
                           "or delete the folder to start over")


def run_compare(cfg: CompareConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """Buy once, train every (method, domain, seed) not yet done, write the table. Returns a summary."""
    from client_distiller.buying.ledger import Ledger
    from client_distiller.buying.policy import buy_for_methods, training_items
    from client_distiller.buying.sentences import default_bank, read_bank
    from client_distiller.buying.teacher_client import TeacherClient
    from client_distiller.commands.distill import buy_teacher_row, purchaser
    from client_distiller.training.methods import parse_hparams
    from client_distiller.reporting.machine import machine
    from client_distiller.training.methods import get_method

    data_root = cfg.data if cfg.data is not None else offline_benchmark(cfg.workdir, cfg.data_size)
    data = DomainBedFolder.scan(data_root)
    domains = list(cfg.test_domains or data.domains)
    for d in domains:
        data.domain_index(d)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    with _vendor(cfg) as (url, api_key, local_weights):
        settings = cfg.settings.model_copy(update={"vendor_url": url, "api_key": SecretStr(api_key)})
        ledger = Ledger(out / "ledger.sqlite")
        with TeacherClient(url, api_key, timeout_s=settings.timeout_s, max_attempts=settings.max_attempts) as client:
            with purchaser(client, settings, ledger, "train", show_progress) as buyer:
                teacher_weights = cfg.teacher_weights or local_weights
                methods, skipped = select_methods(cfg.methods or None, teacher_weights=teacher_weights,
                                                  output=buyer.card.output)
                for name, reason in skipped.items():
                    print(f"skipping {name}: {reason}", flush=True)
                    notes.append(f"- {name} skipped: {reason}.")
                if not methods:
                    raise CompareError("no method left to run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
                # the shared recipe (client_distiller/training/recipe.py), then the command line's --hparam overrides
                hparams = parse_hparams(CPU_RECIPE.hparams_for(methods, cfg.hparams), methods)
                needs = set().union(*(get_method(m).needs for m in methods))
                bank = None
                if "sentences" in needs:
                    bank = read_bank(cfg.sentences) if cfg.sentences else default_bank(data.class_names,
                                                                                        size=cfg.bank_size)
                schedule = replace(cfg.schedule, image_size=cfg.schedule.image_size or buyer.card.image_size)
                items = list({p: (p, y) for s in cfg.seeds
                              for p, y in training_items(data, domains, seed=s)}.values())
                targets, plan = buy_for_methods(buyer, data.class_names, items, needs, sentences=bank,
                                                selection=settings.selection, seed=cfg.seeds[0])
            eval_targets = buy_teacher_row(client, settings, ledger, data, domains, targets, seed=cfg.seeds[0],
                                           show_progress=show_progress)
    # The vendor is no longer needed (a local one stops here): training reads only the targets.
    check_same_teacher(out, targets)
    targets.save(out / "targets")
    spent = {"units_train": ledger.settled("train"), "units_eval": ledger.settled("eval")}
    method_units = {m: {"units_spent": plan.units_for(get_method(m).needs)} for m in methods}
    finished = done_keys(read_jsonl(out / RESULTS_FILE)) if (out / RESULTS_FILE).is_file() else set()
    for seed in cfg.seeds:
        for domain in domains:
            todo = [m for m in methods if (m, domain, seed) not in finished]
            if not todo:
                continue
            print(f"[compare] test domain {domain}, seed {seed}: {', '.join(todo)}", flush=True)
            run_job(data_root, domain, targets, methods=todo, schedule=schedule, seed=seed, out_dir=out,
                    hparams=hparams, eval_targets=eval_targets, units={"units_spent": spent["units_eval"]},
                    method_units=method_units, teacher_weights=teacher_weights, show_progress=show_progress)
    notes += ["", f"Made by: `{command_line(cfg, methods)}`", "", f"Machine: {machine()}.", "",
              f"Units actually spent by this run folder: training {spent['units_train']} of {settings.budget} "
              f"(prompts {plan.prompts}, sentences {plan.sentences}, images {plan.images_known} of "
              f"{plan.images_wanted}), evaluation {spent['units_eval']} of {settings.eval_budget}."]
    table = write_report(out, methods, domains, list(cfg.seeds), notes=notes)
    return {"table": table, "methods": methods, "skipped": skipped, "domains": domains, "seeds": list(cfg.seeds),
            **spent, "budget": settings.budget, "units_by_output": plan.units_by_output,
            "compare_md": str(out / COMPARE_MD), "compare_csv": str(out / COMPARE_CSV)}
