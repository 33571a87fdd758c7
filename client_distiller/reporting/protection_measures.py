"""What a protection sweep measures on each distilled student, beyond its accuracy.

- fidelity: how close the student's teacher-space embeddings are to the clean teacher's (the
  extraction a protection mode exists to stop);
- per mode (:data:`MODE_MEASURES`): the vendor's watermark test on the student's embeddings, and a
  b4b key's coverage and noise as the vendor sees them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from client_distiller.buying.local_vendor import LocalVendor
from client_distiller.buying.teacher_client import TeacherClient


@torch.no_grad()
def student_embeddings(student_dir: Path, images: Sequence[Path], batch_size: int = 64) -> np.ndarray | None:
    """The deployed student's L2-normalised teacher-space embeddings (its head's projection), or
    None for heads without one (KD's linear classifier)."""
    from client_distiller.deployed import DistilledStudent

    student = DistilledStudent.load(student_dir)
    if not hasattr(student.head, "embed"):
        return None
    rows = [student.head.embed(student.backbone(student.pixels(images[i:i + batch_size])))
            for i in range(0, len(images), batch_size)]
    return torch.cat(rows).float().numpy()


def fidelity(student: np.ndarray, clean: np.ndarray) -> tuple[float, int]:
    """Mean cosine over the first d = min(dims) dimensions, each side renormalised: the clean
    teacher truncated for `truncate`, and a deliberately meaningless (low) match for `rotate`."""
    d = min(student.shape[1], clean.shape[1])
    s = F.normalize(torch.from_numpy(np.ascontiguousarray(student[:, :d])).float(), dim=-1)
    t = F.normalize(torch.from_numpy(np.ascontiguousarray(clean[:, :d])).float(), dim=-1)
    return float((s * t).sum(-1).mean()), d


@dataclass
class RunContext:
    """What a mode-specific measurement may use after a run."""

    vendor: LocalVendor
    client: TeacherClient
    key_name: str
    run_dir: Path
    probe: Path  # the probe images' clean teacher embeddings (.npz, key "clean"), in probe order
    student_emb: np.ndarray | None


def watermark_measure(ctx: RunContext) -> dict[str, Any]:
    """Run the vendor's detector on the student's embeddings of the held-out probe images."""
    if ctx.student_emb is None:
        return {}
    suspect = ctx.run_dir / "suspect.npy"
    np.save(suspect, ctx.student_emb.astype(np.float32))
    result = ctx.vendor.verify_watermark(ctx.key_name, ctx.probe, suspect)
    return {"watermark_p_value": float(result["p_value"]), "watermark_detected": bool(result["detected"])}


def b4b_measure(ctx: RunContext) -> dict[str, Any]:
    """Coverage and noise the key had reached after the run (the vendor's own view)."""
    state = getattr(ctx.client.usage(), "protection_state", None) or {}
    return {"b4b_coverage": state.get("coverage"), "b4b_noise": state.get("noise")}


MODE_MEASURES: dict[str, Callable[[RunContext], dict[str, Any]]] = {"watermark": watermark_measure, "b4b": b4b_measure}
