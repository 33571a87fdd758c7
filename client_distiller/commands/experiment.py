"""`client-distill experiment`: what each vendor protection mode costs a distilling client.

Sweeps protection modes x budgets x seeds against a vendor it starts itself (`LocalVendor`: a real
`vendor-api serve` process on 127.0.0.1 with its own embedded Redis; the offline demo teacher, or
any open_clip spec with `--teacher`), on the offline benchmark or any DomainBed-layout `--data`.

Cost accounting. One key per (mode, seed), with a quota of the largest budget, one ledger and one
cache folder per (mode, seed). Budgets run in ascending order and each buys a *prefix* of one
seeded buying order (class prompts first, then images), so a larger budget reuses every answer of
the smaller ones from the cache and pays only for the rest: `units_spent` of a run is what the key
has paid for that run's targets (its ledger's settled total), `units_new` what this run added.
Caches are per (mode, seed) on purpose: `none` answers are key-independent, and sharing them
between seeds would make the second seed's targets look free.

Per run: the student's OOD (held-out domain) and ID accuracy, fidelity (mean cosine between its
projected embeddings and the clean teacher's on the test-domain images, bought once through a
separate `none` key), and mode-specific measurements from :data:`MODE_MEASURES` (watermark
p-value via `vendor-admin verify-watermark`, b4b coverage and noise from `/v1/usage`).

Resumable: a run whose (mode, budget, seed) row is in `runs.csv` is skipped, keys are kept in
`keys.json`, purchases come back from the cache, so a rerun of a finished sweep costs 0 units.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from shared.protocol import OUTPUT_PROBABILITIES

from client_distiller.buying.ledger import Ledger
from client_distiller.buying.local_vendor import LocalVendor, LocalVendorError
from client_distiller.buying.outputs import methods_for, needs_of
from client_distiller.buying.policy import ORDERINGS, buy_for_methods, buy_images, training_items
from client_distiller.buying.purchaser import Purchaser
from client_distiller.buying.teacher_client import TeacherClient
from client_distiller.commands.setup import OFFLINE_BENCHMARK, shell_command
from client_distiller.commands.sweep_vendor import KeyBook, vendor_secrets
from client_distiller.data import DomainBedFolder
from client_distiller.errors import UsageError
from client_distiller.prompts import all_prompts
from client_distiller.reporting.machine import machine
from client_distiller.reporting.protection_measures import MODE_MEASURES, RunContext, fidelity, student_embeddings
from client_distiller.reporting.sweep_report import append_run, read_runs, write_report
from client_distiller.training.recipe import CPU_RECIPE, Schedule

log = logging.getLogger(__name__)

DEFAULT_MODES = ("none", "noise:0.1", "quantize:binary", "truncate:32", "rotate", "b4b", "watermark",
                 "probabilities:3")
DEFAULT_BUDGETS = (100, 370, 1270)  # 70 class prompts + 30 / 300 / 1200 images (small preset: 1200 in total)
DEFAULT_SEEDS = (0, 1)
QUICK = {"modes": ("none", "noise:0.1", "probabilities:3"), "budgets": (80, 110), "seeds": (0, 1),
         "preset": "tiny", "student": "test_efficientnet", "random_init": True, "steps": 2, "batch_size": 2,
         "image_size": 32, "eval_every": 2}
# Which method each mode family trains by default (`--method-for MODE=METHOD` overrides).
DEFAULT_METHOD_FOR = {OUTPUT_PROBABILITIES: "kd"}
DEFAULT_METHOD = "vl2v-adip"
HOLDOUT = 0.2
TEACHER_SIZE_LABEL = "the teacher's"


class ExperimentError(UsageError):
    """The sweep cannot run as asked (bad mode list, unknown domain, an --out of another sweep)."""


# ----------------------------------------------------------------------------- configuration
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
    _validate(cfg)
    return cfg


def _validate(cfg: SweepConfig) -> None:
    from client_distiller.commands.distill import parse_hparams
    from client_distiller.training.methods import MethodError, get_method

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


# ----------------------------------------------------------------------------- keys
# ----------------------------------------------------------------------------- data and probe
def dataset_root(cfg: SweepConfig) -> Path:
    if cfg.data is not None:
        return cfg.data
    from offline_data import ensure_benchmark

    return ensure_benchmark(OFFLINE_BENCHMARK, cfg.out / f"data-{cfg.preset}", split="client", size=cfg.preset,
                            announce=True)


def pick_test_domain(data: DomainBedFolder, requested: str | None) -> str:
    if requested is not None:
        data.domain_index(requested)  # a clear error for an unknown domain
        return requested
    return "sketch" if "sketch" in data.domains else data.domains[-1]


def write_probe(data: DomainBedFolder, test_domain: str, folder: Path) -> list[Path]:
    """Copy the test domain's images into one flat ``folder`` as ``00000.png``, ``00001.jpg``, ...
    (in dataset order) and return them in that order: the order `vendor-admin verify-watermark
    --probe` reads them in (sorted paths), and the row order of every fidelity and suspect matrix."""
    sources = sorted(p for p, _ in data.files[test_domain])
    out = []
    for i, src in enumerate(sources):
        dst = folder / f"{i:05d}{src.suffix.lower()}"
        if not dst.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        out.append(dst)
    return out


def affordable_prefix(purchaser: Purchaser, ordered: Sequence[tuple[Path, int]], budget: int,
                      n_classes: int) -> list[tuple[Path, int]]:
    """The images a budget covers after the class prompts: a prefix of one order, so larger
    budgets extend smaller ones and reuse their cached answers."""
    prompts = 0 if purchaser.card.output == OUTPUT_PROBABILITIES else \
        sum(len(p) for p in all_prompts(["c"] * n_classes)) * purchaser.card.price_per_text
    price = purchaser.card.price_per_image
    count = len(ordered) if price == 0 else max(0, budget - prompts) // price
    return list(ordered[:count])


# ----------------------------------------------------------------------------- the sweep
@dataclass
class SweepResult:
    ran: int
    skipped: int
    units_new: int
    files: dict[str, Path]


def run_experiment(cfg: SweepConfig, *, show_progress: bool = False) -> SweepResult:
    """Run every (mode, seed, budget) not yet in `runs.csv`, then rebuild the report."""
    started = time.perf_counter()
    try:  # the vendor's own parse, before minutes go into data, a teacher and a vendor start
        LocalVendor(cfg.vendor_dir, teacher=cfg.teacher).check_protection(cfg.modes)
    except LocalVendorError as exc:
        raise ExperimentError(f"--modes: {exc}") from None
    cfg.out.mkdir(parents=True, exist_ok=True)
    _check_fingerprint(cfg)
    data_root = dataset_root(cfg)
    data = DomainBedFolder.scan(data_root)
    test_domain = pick_test_domain(data, cfg.test_domain)
    runs_csv = cfg.out / "runs.csv"
    done = {(str(r["mode"]), int(r["budget"]), int(r["seed"])) for r in read_runs(runs_csv)}
    todo = [(m, s, b) for m in cfg.modes for s in cfg.seeds for b in cfg.budgets if (m, b, s) not in done]
    ran, units_new = 0, 0
    if todo:
        probe_dir = cfg.out / "probe" / test_domain
        probe = write_probe(data, test_domain, probe_dir)
        vendor = LocalVendor(cfg.vendor_dir, teacher=cfg.teacher, extra_env=vendor_secrets(cfg.out))
        if cfg.teacher is None:
            vendor.build_demo_teacher(size=cfg.teacher_size)
        with vendor:
            keys = KeyBook(cfg.out / "keys.json", vendor)
            clean = clean_teacher_embeddings(cfg, vendor, keys, probe)
            # The watermark test takes the probes' clean embeddings precomputed: what we bought,
            # rather than the vendor re-embedding every probe image for every test.
            probe_npz = probe_dir.with_suffix(".npz")
            np.savez(probe_npz, clean=clean)
            for mode in cfg.modes:
                for seed in cfg.seeds:
                    budgets = [b for (m, s, b) in todo if m == mode and s == seed]
                    if not budgets:
                        continue
                    name, key = keys.get(f"{mode_slug(mode)}-s{seed}", quota=max(cfg.budgets), protection=mode)
                    with TeacherClient(vendor.url, key) as client:
                        for budget in budgets:
                            row = run_one(cfg, data, test_domain, mode, seed, budget, vendor, client, name, key,
                                          probe, probe_npz, clean, show_progress=show_progress)
                            append_run(runs_csv, row)
                            ran += 1
                            units_new += int(row["units_new"])
                            print(f"[{mode} budget {budget} seed {seed}] OOD {100 * row['ood_acc']:.1f}% "
                                  f"ID {100 * row['id_acc']:.1f}% units {row['units_spent']} "
                                  f"(new {row['units_new']}) fidelity {_fmt(row['fidelity'])}", flush=True)
    header = _header(cfg, data_root, test_domain, wall_s=time.perf_counter() - started, ran=ran)
    files = write_report(runs_csv, cfg.out, modes=cfg.modes, header=header)
    if cfg.publish is not None:
        files.update(publish(files, cfg.publish))
    return SweepResult(ran, len(cfg.modes) * len(cfg.seeds) * len(cfg.budgets) - len(todo), units_new,
                       {"runs": runs_csv, **files})


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def clean_teacher_embeddings(cfg: SweepConfig, vendor: LocalVendor, keys: KeyBook, probe: Sequence[Path]) -> np.ndarray:
    """The unprotected teacher's embeddings of the probe images, bought once (eval scope, its own
    key, ledger and cache) for fidelity; never used for training."""
    _, key = keys.get("clean-eval", quota=len(probe), protection="none")
    with TeacherClient(vendor.url, key) as client:
        budget = len(probe) * client.model_card().price_per_image
        keys.get("clean-eval", quota=budget, protection="none")  # tops up when an image costs more than 1
        ledger = Ledger(cfg.out / "ledgers" / "clean-eval.sqlite")
        try:
            with Purchaser(client, cache_dir=cfg.out / "cache" / "clean-eval", ledger=ledger, budget=budget,
                           scope="eval", api_key=key, show_progress=False) as buyer:
                vectors = buy_images(buyer, [(p, 0) for p in probe])
        finally:
            ledger.close()
    if len(vectors) != len(probe):
        raise ExperimentError(f"bought {len(vectors)} of {len(probe)} clean teacher embeddings")
    return torch.stack([vectors[str(p)] for p in probe]).numpy()


def run_one(cfg: SweepConfig, data: DomainBedFolder, test_domain: str, mode: str, seed: int, budget: int,
            vendor: LocalVendor, client: TeacherClient, key_name: str, api_key: str, probe: Sequence[Path],
            probe_npz: Path, clean: np.ndarray, *, show_progress: bool = False) -> dict[str, Any]:
    """Buy one budget's targets (a prefix of this key's buying order), distil, measure."""
    from client_distiller.commands.distill import parse_hparams
    from client_distiller.lodo import run_job

    t0 = time.perf_counter()
    slug = f"{mode_slug(mode)}-s{seed}"
    run_dir = cfg.out / "runs" / f"{slug}-b{budget}"
    ledger = Ledger(cfg.out / "ledgers" / f"{slug}.sqlite")
    before = ledger.settled("train")
    with Purchaser(client, cache_dir=cfg.out / "cache" / slug, ledger=ledger, budget=budget, scope="train",
                   api_key=api_key, show_progress=show_progress) as buyer:
        method_list, _ = methods_for(buyer.card, [cfg.method(mode)])
        ordered = ORDERINGS[cfg.selection](training_items(data, [test_domain], seed=seed, holdout=HOLDOUT), seed)
        prefix = affordable_prefix(buyer, ordered, budget, len(data.classes))
        targets, plan = buy_for_methods(buyer, data.class_names, prefix, needs_of(method_list),
                                        selection=cfg.selection, seed=seed)
        card = buyer.card
    spent = ledger.settled("train")
    ledger.close()
    method = method_list[0]
    hparams = parse_hparams([h for h in cfg.hparams if h.partition(".")[0] == method], [method])
    if run_dir.exists():  # a run that died before its row was written starts over (purchases are cached)
        shutil.rmtree(run_dir)
    schedule = Schedule(cfg.student, pretrained=not cfg.random_init, steps=cfg.steps,
                        align_steps=CPU_RECIPE.align_steps, batch_size=cfg.batch_size,
                        image_size=cfg.image_size or card.image_size, eval_every=cfg.eval_every)
    result = run_job(data.root, test_domain, targets, methods=[method], schedule=schedule, seed=seed, holdout=HOLDOUT,
                     out_dir=run_dir, hparams=hparams, units={"units_spent": spent}, show_progress=show_progress)
    record = result.record(method)
    emb = student_embeddings(result.students[method], probe) if method in result.students else None
    fid, dims = fidelity(emb, clean) if emb is not None else (None, None)
    row: dict[str, Any] = {
        "mode": mode, "budget": budget, "seed": seed, "method": method, "units_spent": spent,
        "units_new": spent - before, "images_bought": plan.images_known or plan.probabilities_known,
        "images_wanted": len(ordered), "prompts": plan.prompts,
        "embedding_dim": card.embedding_dim if card.output != OUTPUT_PROBABILITIES else "",
        "id_acc": record["id_acc"], "ood_acc": record["ood_acc"], "fidelity": fid, "fidelity_dims": dims,
        "train_seconds": record.get("train_seconds"), "run_dir": str(run_dir.relative_to(cfg.out))}
    measure = MODE_MEASURES.get(mode_name(mode))
    if measure is not None:
        row.update(measure(RunContext(vendor, client, key_name, run_dir, probe_npz, emb)))
    if not cfg.keep_students:  # 48 EfficientNet-Lite0 students would be ~0.8 GB; the row holds what was measured
        shutil.rmtree(run_dir / "students", ignore_errors=True)
    row["run_seconds"] = round(time.perf_counter() - t0, 1)
    return row


def _check_fingerprint(cfg: SweepConfig) -> None:
    path = cfg.out / "experiment.json"
    wanted = cfg.fingerprint()
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored.get("settings") != wanted:
            diff = sorted(k for k in wanted if stored.get("settings", {}).get(k) != wanted[k])
            raise ExperimentError(f"{cfg.out} holds a sweep made with other settings ({', '.join(diff)}); "
                                  "use another --out or the same settings")
        return
    path.write_text(json.dumps({"settings": wanted, "command": command_line(cfg)}, indent=1))


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


def _header(cfg: SweepConfig, data_root: Path, test_domain: str, *, wall_s: float, ran: int) -> dict[str, Any]:
    rows = read_runs(cfg.out / "runs.csv")
    run_s = sum(float(r.get("run_seconds") or 0) for r in rows)
    teacher = cfg.teacher or f"offline demo teacher ({cfg.teacher_size})"
    return {"command": f"`{command_line(cfg)}`", "machine": machine(),
            "time": f"{len(rows)} runs, {run_s / 60:.1f} min of run time in all (buying, training, measuring); "
                    + (f"the last invocation made {ran} of them in {wall_s / 60:.1f} min wall" if ran
                       else "the last invocation only rebuilt this report"),
            "teacher": teacher,
            "data": f"{data_root.name if cfg.data is None else data_root} (test domain {test_domain})",
            "student": f"{cfg.student}{' (random init)' if cfg.random_init else ''}, {cfg.steps} steps per stage, "
                       f"batch {cfg.batch_size} per source domain, {cfg.image_size or TEACHER_SIZE_LABEL} px",
            "methods": ", ".join(f"{m} -> {cfg.method(m)}" for m in cfg.modes),
            "seeds": ", ".join(map(str, cfg.seeds)), "budgets": ", ".join(map(str, cfg.budgets))}


def publish(files: Mapping[str, Path], target: Path) -> dict[str, Path]:
    """Copy the summary to ``target`` (e.g. `results/protection_sweep.md`) and the plot beside it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    plot = target.with_suffix(".png")
    shutil.copyfile(files["plot"], plot)
    text = files["summary"].read_text().replace("](ood_vs_units.png)", f"]({plot.name})")
    target.write_text(text)
    return {"published": target, "published_plot": plot}


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
