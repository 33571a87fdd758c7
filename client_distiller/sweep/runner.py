"""Running the protection sweep: every (mode, seed, budget) not yet in `runs.csv` buys a prefix
of one seeded buying order through its key, distils a student, measures it, and appends a row;
then the report is rebuilt (see the package docstring for the cost accounting)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
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
from client_distiller.data import OFFLINE_BENCHMARK, DomainBedFolder
from client_distiller.prompts import all_prompts
from client_distiller.reporting.machine import machine
from client_distiller.reporting.protection_measures import MODE_MEASURES, RunContext, fidelity, student_embeddings
from client_distiller.reporting.sweep_report import append_run, read_runs, write_report
from client_distiller.sweep.config import (HOLDOUT, TEACHER_SIZE_LABEL, ExperimentError, SweepConfig, command_line,
                                           mode_name, mode_slug)
from client_distiller.sweep.vendor_state import KeyBook, vendor_secrets
from client_distiller.training.recipe import CPU_RECIPE, Schedule


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
    from client_distiller.training.methods import parse_hparams
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
