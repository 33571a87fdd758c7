"""`client-distill compare`: every method side by side, leave-one-domain-out, over seeds, one budget.

1. Decide which methods run: every registered one (or ``--method``), minus white-box methods without
   teacher weights and methods the key's output mode cannot feed, each skip printed with its reason.
2. Buy, once, the union of what they need (:func:`client_distiller.plan.buy_for_methods`) under one
   ``--budget`` into the shared cache: comparing five methods costs what the most demanding set of
   outputs costs, not five budgets. A method's "units" column is what *its* outputs cost.
3. For each seed and test domain, :func:`client_distiller.pipeline.run_job` trains the methods not
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
import shlex
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from .argtypes import non_negative_int, positive_int
from .data import DomainBedFolder
from .errors import UsageError
from .evaluate import TEACHER_ZERO_SHOT, mean_se, read_jsonl
from .pipeline import RESULTS_FILE, run_job
from .recipe import CPU_RECIPE

if TYPE_CHECKING:
    from .targets import TeacherTargets

COMPARE_MD, COMPARE_CSV = "compare.md", "compare.csv"


class CompareError(UsageError):
    """A comparison cannot start: no method left to run, no vendor, bad arguments."""


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    from .job import add_distill_arguments

    add_distill_arguments(p)  # vendor, budget, data, test domains, methods, student, schedule, cache, hparams
    p.set_defaults(out=Path("runs/compare"), steps=CPU_RECIPE.steps, align_steps=CPU_RECIPE.align_steps,
                   batch_size=CPU_RECIPE.batch_size, eval_every=CPU_RECIPE.eval_every, hparams=[])
    for action in p._actions:  # --data is optional here: --local builds the offline benchmark
        if action.dest == "data":
            action.required = False
        elif action.dest == "methods":
            action.help = "method (repeatable); default: every registered method"
    p.add_argument("--seeds", type=non_negative_int, nargs="+", default=[0, 1, 2], help="trial seeds (default 0 1 2)")
    p.add_argument("--local", action="store_true",
                   help="start a local vendor with the offline demo teacher (as `client-distill demo`)")
    p.add_argument("--workdir", type=Path, default=Path("var/demo"),
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


# ---------------------------------------------------------------------- which methods run
def select_methods(requested: Sequence[str] | None, *, teacher_weights: str | None,
                   output: str = "embeddings") -> tuple[list[str], dict[str, str]]:
    """(methods to run, {skipped method: reason}); unknown names raise ``UnknownMethodError``."""
    from .methods import METHODS, get_method
    from .modes import output_kind_named

    provides = output_kind_named(output).provides
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
    from .evaluate import METHOD_TITLES

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


def command_line(args: argparse.Namespace, methods: Sequence[str]) -> str:
    """The command that reproduces the table, from the resolved options; never the API key."""
    parts = ["client-distill", "compare"]
    if args.local:
        parts += ["--local"]
    else:
        parts += ["--vendor-url", str(args.vendor_url), "--api-key", "$CLIENT_API_KEY"]
    if args.data is not None:
        parts += ["--data", str(args.data)]
    for m in methods:
        parts += ["--method", m]
    for d in args.test_domains or []:
        parts += ["--test-domain", d]
    parts += ["--seeds", *map(str, args.seeds), "--student", args.student, "--steps", str(args.steps),
              "--align-steps", str(args.align_steps), "--batch-size", str(args.batch_size),
              *(["--image-size", str(args.image_size)] if args.image_size else []),
              "--eval-every", str(args.eval_every), "--budget", str(args.budget), "--out", str(args.out)]
    if args.random_init:
        parts += ["--random-init"]
    if args.teacher_weights:
        parts += ["--teacher-weights", args.teacher_weights]
    if args.sentences:
        parts += ["--sentences", str(args.sentences)]
    for h in args.hparams or []:
        parts += ["--hparam", h]
    return " ".join(shlex.quote(p) if not p.startswith("$") else p for p in parts)


# ---------------------------------------------------------------------- running it
@contextlib.contextmanager
def _vendor(args: argparse.Namespace) -> Iterator[tuple[str, str, str | None]]:
    """(vendor URL, API key, default teacher weights): a local demo vendor with ``--local``."""
    if not args.local:
        from .job import settings_from

        settings = settings_from(args)
        if not settings.vendor_url or settings.api_key is None:
            raise CompareError("a vendor is required: --vendor-url/--api-key (or CLIENT_*), or --local")
        yield settings.vendor_url, settings.api_key.get_secret_value(), None
        return
    from .local_vendor import LocalVendor

    vendor = LocalVendor(args.workdir.resolve() / "vendor")
    vendor.build_demo_teacher(size=args.teacher_size)
    with vendor:
        key = vendor.create_key(f"compare-{uuid.uuid4().hex[:8]}", quota=(args.budget or 0) + (args.eval_budget or 0))
        yield vendor.url, key, f"local-dir:{vendor.data_dir / 'demo-teacher'}"


def _local_data(args: argparse.Namespace) -> Path:
    from offline_data import build_benchmark

    data_dir = args.workdir.resolve() / f"data-{args.data_size}"
    if not (data_dir / "benchmark.json").is_file():
        build_benchmark("fashion-domains", data_dir, seed=0, split="client", size=args.data_size, overwrite=True)
    return data_dir


SAME_TEACHER_TOLERANCE = 1e-3  # well above float noise between runs, far below two teacher builds' gap


def check_same_teacher(out: Path, targets: TeacherTargets) -> None:
    """Refuse to add records to a run folder whose earlier records were trained on another teacher's
    answers (``OUT/targets``, saved by the run that made them): one table must show one teacher."""
    from .targets import TargetsError, TeacherTargets  # noqa: F811 (the runtime import)

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


def run_compare(args: argparse.Namespace, *, show_progress: bool = True) -> dict[str, Any]:
    """Buy once, train every (method, domain, seed) not yet done, write the table. Returns a summary."""
    from .job import (DistillOptions, _buy_eval_targets, parse_hparams, settings_from, training_items)
    from .ledger import Ledger
    from .methods import get_method
    from .plan import buy_for_methods
    from .report import machine
    from .purchase import Purchaser, card_output
    from .sentences import default_bank, read_bank
    from .teacher_client import TeacherClient

    if args.local and args.cache_dir is None:
        args.cache_dir = args.workdir / "cache"  # the demo's cache: what the demo bought is not paid again
    if args.local and args.budget is None:
        args.budget = 3000
    if args.local and args.eval_budget is None:
        args.eval_budget = 1000
    if not args.seeds or args.steps < 1 or args.batch_size < 1:
        raise CompareError("--seeds, --steps and --batch-size must be given and positive")
    data_root = args.data if args.data is not None else (_local_data(args) if args.local else None)
    if data_root is None:
        raise CompareError("--data is required (or --local, which builds the offline benchmark)")
    data = DomainBedFolder.scan(data_root)
    domains = list(args.test_domains or data.domains)
    for d in domains:
        data.domain_index(d)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    with _vendor(args) as (url, api_key, local_weights):
        args.vendor_url, args.api_key = url, api_key
        settings = settings_from(args)
        ledger = Ledger(out / "ledger.sqlite")
        with TeacherClient(url, api_key, timeout_s=settings.timeout_s, max_attempts=settings.max_attempts) as client:
            with Purchaser(client, cache_dir=settings.cache_dir, ledger=ledger, budget=settings.budget,
                           scope="train", api_key=api_key, batch_size=settings.request_batch,
                           show_progress=show_progress) as buyer:
                teacher_weights = args.teacher_weights or local_weights
                methods, skipped = select_methods(args.methods, teacher_weights=teacher_weights,
                                                  output=card_output(buyer.card))
                for name, reason in skipped.items():
                    print(f"skipping {name}: {reason}", flush=True)
                    notes.append(f"- {name} skipped: {reason}.")
                if not methods:
                    raise CompareError("no method left to run: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
                # the shared recipe (client_distiller/recipe.py), then the command line's --hparam overrides
                hparams = parse_hparams(CPU_RECIPE.hparams_for(methods, args.hparams or []), methods)
                needs = set().union(*(get_method(m).needs for m in methods))
                bank = None
                if "sentences" in needs:
                    bank = read_bank(args.sentences) if args.sentences else default_bank(data.class_names,
                                                                                          size=args.bank_size)
                image_size = args.image_size or buyer.card.image_size  # the teacher's input size by default
                per_seed = [DistillOptions(data=Path(data_root), out=out, test_domains=domains, methods=methods,
                                           student=args.student, steps=args.steps, batch_size=args.batch_size,
                                           image_size=image_size, eval_every=args.eval_every, seed=s, hparams=hparams,
                                           align_steps=args.align_steps)
                            for s in args.seeds]
                items = list({p: (p, y) for o in per_seed for p, y in training_items(data, o)}.values())
                targets, plan = buy_for_methods(buyer, data.class_names, items, needs, sentences=bank,
                                                selection=settings.selection, seed=args.seeds[0])
            eval_targets = _buy_eval_targets(client, settings, ledger, api_key, data, per_seed[0], targets,
                                             show_progress)
    # The vendor is no longer needed (a local one stops here): training reads only the targets.
    check_same_teacher(out, targets)
    targets.save(out / "targets")
    spent = {"units_train": ledger.settled("train"), "units_eval": ledger.settled("eval")}
    method_units = {m: {"units_spent": plan.units_for(get_method(m).needs)} for m in methods}
    finished = done_keys(read_jsonl(out / RESULTS_FILE)) if (out / RESULTS_FILE).is_file() else set()
    for seed in args.seeds:
        for domain in domains:
            todo = [m for m in methods if (m, domain, seed) not in finished]
            if not todo:
                continue
            print(f"[compare] test domain {domain}, seed {seed}: {', '.join(todo)}", flush=True)
            run_job(data_root, domain, targets, methods=todo, student=args.student,
                    pretrained=not args.random_init, steps=per_seed[0].stage_steps, batch_size=args.batch_size,
                    eval_every=args.eval_every, image_size=image_size, seed=seed, out_dir=out,
                    hparams=hparams, eval_targets=eval_targets, units={"units_spent": spent["units_eval"]},
                    method_units=method_units, teacher_weights=teacher_weights, show_progress=show_progress)
    command = command_line(args, methods)
    notes += ["", f"Made by: `{command}`", "", f"Machine: {machine()}.", "",
              f"Units actually spent by this run folder: training {spent['units_train']} of {settings.budget} "
              f"(prompts {plan.prompts}, sentences {plan.sentences}, images {plan.images_known} of "
              f"{plan.images_wanted}), evaluation {spent['units_eval']} of {settings.eval_budget}."]
    table = write_report(out, methods, domains, list(args.seeds), notes=notes)
    return {"table": table, "methods": methods, "skipped": skipped, "domains": domains, "seeds": list(args.seeds),
            **spent, "budget": settings.budget, "units_by_output": plan.units_by_output,
            "compare_md": str(out / COMPARE_MD), "compare_csv": str(out / COMPARE_CSV)}
