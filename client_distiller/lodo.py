"""One leave-one-domain-out job: train every requested method through the one loop, evaluate ID and
OOD, save the deployable students, write the JSON-lines record and the Markdown table.

Held-out test-domain hygiene: training uses only the teacher image embeddings of the source
domains' *in*-splits (``TeacherTargets.restricted_to``) and model selection uses the source
out-splits scored against class text embeddings, so whatever targets the caller passes (even ones
covering the test domain) never influence training or selection. Test-domain image embeddings,
if present, are only used for the teacher zero-shot row, which is evaluation.

Under DDP every rank trains (the loop shards each batch) and evaluates, and only rank 0 writes
the run folder (records, histories, students, table); the others return an empty table.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from client_distiller.data import DomainBedFolder, leave_one_out, eval_transform, train_transform
from client_distiller.deployed import DistilledStudent
from client_distiller.errors import UsageError
from client_distiller.reporting.evaluate import (TEACHER_ZERO_SHOT, accuracy, latest_per_trial, markdown_table, read_jsonl,
                                                 teacher_zero_shot, write_jsonl)
from client_distiller.targets import TeacherTargets
from client_distiller.training.loop import (DistInfo, History, TrainConfig, TrainData, fit, init_seed, resolve_device,
                                            seed_everything)
from client_distiller.training.methods import get_method
from client_distiller.training.recipe import Schedule

RESULTS_FILE = "results.jsonl"
PER_IMAGE_OUTPUTS = frozenset({"images", "class_probabilities"})  # outputs looked up per training image
TABLE_FILE = "results.md"


class JobError(UsageError):
    """A job cannot run: class names of the targets and the dataset differ, unknown method, ..."""


@dataclass
class JobResult:
    """Everything one job produced (also on disk under ``out_dir``)."""

    job_id: str
    test_domain: str
    records: list[dict[str, Any]]
    histories: dict[str, History]
    students: dict[str, Path]       # method -> deployable student folder
    table: str                      # Markdown, over every record in out_dir/results.jsonl
    out_dir: Path
    ignored_test_targets: int = 0   # test-domain image targets present in the input and not used
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self, method: str) -> dict[str, Any]:
        return next(r for r in self.records if r["method"] == method)


def _check_classes(data: DomainBedFolder, targets: TeacherTargets) -> None:
    if targets.class_names not in (data.class_names, list(data.classes)):
        raise JobError(f"teacher targets' classes {targets.class_names} do not match the dataset's "
                       f"{data.class_names} (same order required; build targets from DomainBedFolder.class_names)")


def run_job(data_root: Path | str, test_domain: str, targets: TeacherTargets, *,
            schedule: Schedule, methods: Sequence[str] = ("erm", "vl2v-adip"), seed: int = 0, holdout: float = 0.2,
            out_dir: Path | str = "runs/job", hparams: Mapping[str, Mapping[str, Any]] | None = None,
            eval_targets: TeacherTargets | None = None, units: Mapping[str, float] | None = None,
            job_id: str | None = None, device: str = "auto", num_workers: int = 0,
            show_progress: bool = True, teacher_weights: str | None = None,
            method_units: Mapping[str, Mapping[str, float]] | None = None) -> JobResult:
    """Train and evaluate ``methods`` with ``test_domain`` held out; see the module docstring.

    Several jobs (test domains, seeds) may share ``out_dir``: records are appended to
    ``results.jsonl`` and the table is rebuilt from all of them; students go to
    ``students/<test_domain>/<method>/`` and curves to ``histories/<test_domain>-<method>.json``.

    ``schedule`` says which student trains how (its ``image_size`` None: the student's own input
    size). ``hparams`` maps method name -> hyperparameter overrides. ``eval_targets`` (default
    ``targets``) supplies teacher image embeddings for the teacher zero-shot row only. ``units``
    (e.g. ``{"units_spent": 1234}``) is copied into every record and shown as table columns;
    ``method_units`` (method -> fields) overrides it per method (what that method's needs cost, when
    one shared purchase serves several methods). ``teacher_weights`` is the open_clip spec that
    white-box methods (VL2V-SD) start from; black-box methods ignore it.
    """
    data = DomainBedFolder.scan(data_root)
    _check_classes(data, targets)
    method_classes = {name: get_method(name) for name in methods}
    loo = leave_one_out(data, test_domain, seed=seed, holdout=holdout)
    train_items = [x for s in loo.sources for x in s.train]
    val_items = [x for s in loo.sources for x in s.val]
    train_targets = targets.restricted_to(p for p, _ in train_items)
    ignored = sum(targets.has_image(p) for p, _ in loo.test)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job_id = job_id or uuid.uuid4().hex[:12]
    units = dict(units or {})
    base = {"job_id": job_id, "dataset": str(Path(data_root).resolve()), "test_domain": test_domain,
            "source_domains": [s.domain for s in loo.sources], "seed": seed, "teacher_id": targets.teacher_id,
            "n_train": len(train_items), "n_val": len(val_items), "n_test": len(loo.test), **units}
    records: list[dict[str, Any]] = []
    main = DistInfo.current().is_main  # under DDP rank 0 alone writes

    zs_targets = eval_targets or targets
    source_all = [x for s in loo.sources for x in s.train + s.val]
    zs_id, zs_ood = teacher_zero_shot(zs_targets, source_all), teacher_zero_shot(zs_targets, loo.test)
    records.append({**base, "method": TEACHER_ZERO_SHOT, "id_acc": zs_id.accuracy, "ood_acc": zs_ood.accuracy,
                    "id_covered": zs_id.covered, "ood_covered": zs_ood.covered})
    if main:
        write_jsonl(out / RESULTS_FILE, records)  # every record is appended as soon as it exists (resumable)

    histories: dict[str, History] = {}
    students: dict[str, Path] = {}
    cfg = TrainConfig(steps=schedule.stage_steps, batch_size=schedule.batch_size, eval_every=schedule.eval_every,
                      seed=seed, device=device,
                      num_workers=num_workers, show_progress=show_progress)
    dev = resolve_device(device)
    for name, cls in method_classes.items():
        seed_everything(init_seed(seed, name))  # every random initialisation from the trial seed alone
        st = cls.build_student(schedule.student, pretrained=schedule.pretrained, teacher_weights=teacher_weights)
        size = schedule.image_size or st.input_size
        uses_teacher = bool(cls.needs)
        tdata = TrainData([s.train for s in loo.sources], val_items, train_transform(size, st.mean, st.std),
                          eval_transform(size, st.mean, st.std),
                          train_targets if cls.needs & PER_IMAGE_OUTPUTS else None)
        method = cls(st, len(data.classes), train_targets if uses_teacher else None, (hparams or {}).get(name))
        t0 = time.perf_counter()
        history = fit(method, tdata, cfg)
        seconds = time.perf_counter() - t0
        histories[name] = history
        id_acc = accuracy(method.predict, val_items, tdata.eval_transform, device=dev)
        ood_acc = accuracy(method.predict, loo.test, tdata.eval_transform, device=dev)
        rec = {**base, "method": name, "id_acc": id_acc, "ood_acc": ood_acc,
               "best_val_acc": history.best_val_acc, "student": schedule.student, "image_size": size,
               "batch_size": schedule.batch_size, "steps": {s.stage: s.steps for s in history.stages},
               "hparams": method.hparams, "train_seconds": round(seconds, 2),
               "image_target_coverage": history.stages[0].image_target_coverage}
        if not uses_teacher:
            rec.update({k: 0 for k in units})  # ERM buys nothing
        if method_units and name in method_units:
            rec.update(method_units[name])
        records.append(rec)
        if uses_teacher:  # one folder per (test domain, method): jobs may share out_dir
            students[name] = out / "students" / test_domain / name
        if main:
            write_jsonl(out / RESULTS_FILE, [rec])  # as each method finishes: a killed run loses one method at most
            hist_file = out / "histories" / f"{test_domain}-{name}.json"
            hist_file.parent.mkdir(parents=True, exist_ok=True)
            hist_file.write_text(json.dumps(history.as_dict(), indent=1))
            if uses_teacher:
                DistilledStudent.from_method(method, image_size=size, class_names=data.class_names).save(
                    students[name])
        method.cpu()

    if not main:
        return JobResult(job_id, test_domain, records, histories, students, "", out, ignored)
    results = out / RESULTS_FILE
    unit_fields = {k: k.replace("_", " ").capitalize() for k in units} or None
    # every method that ran in out_dir gets its columns (kd, clip-kd, ...); a trial run again counts once
    all_records = latest_per_trial(read_jsonl(results))
    shown = (TEACHER_ZERO_SHOT, *dict.fromkeys(r["method"] for r in all_records if r["method"] != TEACHER_ZERO_SHOT))
    table = markdown_table(all_records, methods=shown, unit_fields=unit_fields)
    (out / TABLE_FILE).write_text(table)
    return JobResult(job_id, test_domain, records, histories, students, table, out, ignored)
