"""Evaluation: student accuracy on a split, the teacher's zero-shot accuracy, result records, tables.

Result records are flat dicts written as JSON lines (DomainBed's ``results.jsonl``) so runs from
many jobs, seeds and machines can be concatenated and collected into one Markdown table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader

from client_distiller.data import ImageListDataset
from client_distiller.reporting.tables import mean_se
from client_distiller.targets import TeacherTargets

Items = Sequence[tuple[Path, int]]
TEACHER_ZERO_SHOT = "teacher-zero-shot"


@torch.no_grad()
def count_correct(predict: Callable[[torch.Tensor], torch.Tensor], items: Items, transform: Callable, *,
                  device: torch.device | str = "cpu", batch_size: int = 128, shard: tuple[int, int] = (0, 1),
                  num_workers: int = 0) -> tuple[int, int]:
    """(correct, total) of ``argmax predict(x)`` over ``items[rank::world]`` (``shard=(rank, world)``).

    Sharding lets distributed ranks split validation and all-reduce the counts, so every rank
    reaches the same model-selection decision.
    """
    rank, world = shard
    part = list(items)[rank::world]
    if not part:
        return 0, 0
    if hasattr(transform, "batch"):  # decoded once per process, resized as tensor batches (.augment)
        from client_distiller.training.augment import decode_images

        correct = 0
        for i in range(0, len(part), batch_size):
            chunk = part[i:i + batch_size]
            x = transform.batch(decode_images([p for p, _ in chunk]))
            pred = predict(x.to(device)).argmax(-1).cpu()
            correct += int((pred == torch.tensor([y for _, y in chunk])).sum())
        return correct, len(part)
    loader = DataLoader(ImageListDataset(part, transform), batch_size=batch_size, shuffle=False,
                        num_workers=num_workers)
    correct = 0
    for x, y in loader:
        pred = predict(x.to(device)).argmax(-1).cpu()
        correct += int((pred == y).sum())
    return correct, len(part)


def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], items: Items, transform: Callable, *,
             device: torch.device | str = "cpu", batch_size: int = 128) -> float:
    """Top-1 accuracy of a predictor (e.g. ``method.predict``; put the model in eval mode first)."""
    correct, total = count_correct(predict, items, transform, device=device, batch_size=batch_size)
    if total == 0:
        raise ValueError("accuracy of an empty split")
    return correct / total


@dataclass(frozen=True)
class ZeroShot:
    """Teacher zero-shot accuracy over the images whose teacher embeddings are known."""

    accuracy: float | None  # None when no image of the split is covered
    covered: int
    total: int


def teacher_zero_shot(targets: TeacherTargets, items: Items) -> ZeroShot:
    """Argmax over classes of the teacher's class probabilities (bought, or derived from
    cos(teacher image embedding, class text embedding)); no student.

    Images without teacher outputs are skipped (``covered`` says how many were scored).
    """
    rows = [(targets.class_probabilities(p), y) for p, y in items]
    rows = [(t, y) for t, y in rows if t is not None]
    if not rows:
        return ZeroShot(None, 0, len(items))
    probs = torch.stack([t for t, _ in rows])
    labels = torch.tensor([y for _, y in rows])
    pred = probs.argmax(-1)
    return ZeroShot(float((pred == labels).float().mean()), len(rows), len(items))


# ---------------------------------------------------------------------- records
def write_jsonl(path: Path | str, records: Iterable[Mapping[str, Any]], *, append: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as f:
        for r in records:
            f.write(json.dumps(dict(r), sort_keys=True) + "\n")
    return path


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]



def _cell(values: Sequence[float]) -> str:
    if not values:
        return "-"
    m, se = mean_se([100.0 * v for v in values])
    return f"{m:.1f}" if len(values) < 2 else f"{m:.1f} ± {se:.1f}"


METHOD_TITLES = {TEACHER_ZERO_SHOT: "Teacher zero-shot", "erm": "ERM student", "vl2v-adip": "VL2V-ADiP student",
                 "kd": "KD student", "clip-kd": "CLIP-KD student", "dime-fm": "DIME-FM student",
                 "vl2v-sd": "VL2V-SD student"}


def _units(records: Sequence[Mapping[str, Any]], field: str) -> str:
    """The largest value of a units field: records carry their run folder's *cumulative* ledger
    total (or a method's fixed cost), so a rerun or a second seed in the same folder repeats what
    was already counted; summing over jobs would count a free rerun twice."""
    values = [r[field] for r in records if r.get(field) is not None]
    return f"{max(values):g}" if values else "-"


def latest_per_trial(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One record per (test domain, method, seed): the last. A job run again in the same folder
    appends its records (the file keeps what was run); a table must count that trial once, not
    show a mean ± 0.0 "over seeds" of one seed run twice."""
    latest: dict[tuple[Any, Any, Any], Mapping[str, Any]] = {}
    for r in records:
        key = (r.get("test_domain"), r.get("method"), r.get("seed"))
        latest.pop(key, None)  # re-inserted: the table keeps the order trials last ran in
        latest[key] = r
    return list(latest.values())


def markdown_table(records: Sequence[Mapping[str, Any]],
                   methods: Sequence[str] = (TEACHER_ZERO_SHOT, "erm", "vl2v-adip"),
                   unit_fields: Mapping[str, str] | None = None) -> str:
    """Per test domain (rows) and method (ID / OOD columns): mean ± standard error over seeds, in %.

    A record has ``test_domain``, ``method``, ``id_acc`` and ``ood_acc`` (fractions or None).
    ``unit_fields`` maps record fields to column titles (default ``{"units_spent": "Units spent"}``):
    the buyer passes those fields to the job, every record of the job carries them, and a column
    shows their largest value for that test domain (see :func:`_units`).
    The final row averages the per-domain means, as DomainBed reports.
    """
    unit_fields = {"units_spent": "Units spent"} if unit_fields is None else dict(unit_fields)
    domains = sorted({r["test_domain"] for r in records})
    header = ["Test domain"] + [f"{METHOD_TITLES.get(m, m)} {k}" for m in methods for k in ("ID", "OOD")] \
        + list(unit_fields.values())
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    per_method_means: dict[tuple[str, str], list[float]] = {}
    for d in domains:
        row = [d]
        for m in methods:
            for k in ("id_acc", "ood_acc"):
                vals = [float(r[k]) for r in records if r["test_domain"] == d and r["method"] == m
                        and r.get(k) is not None]
                row.append(_cell(vals))
                if vals:
                    per_method_means.setdefault((m, k), []).append(sum(vals) / len(vals))
        row += [_units([r for r in records if r["test_domain"] == d], f) for f in unit_fields]
        lines.append("| " + " | ".join(row) + " |")
    if len(domains) > 1:
        avg = ["**avg**"]
        for m in methods:
            for k in ("id_acc", "ood_acc"):
                vals = per_method_means.get((m, k), [])
                avg.append(f"{100 * sum(vals) / len(vals):.1f}" if len(vals) == len(domains) else "-")
        avg += [""] * len(unit_fields)
        lines.append("| " + " | ".join(avg) + " |")
    return "\n".join(lines) + "\n"
