"""What a run adds to its table: the deployed student's cost, and a picture of the results.

The student's size and single-image latency are measured on the machine that trained it (the
teacher's cost beside real CLIP architectures is `benchmarks/student_latency.py`); the plot shows
ID and OOD accuracy per method and test domain, where bars read faster than a table.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from client_distiller.deployed import DistilledStudent
from client_distiller.reporting.evaluate import TEACHER_ZERO_SHOT


@torch.inference_mode()
def student_cost(folder: Path, repeats: int = 10) -> dict[str, float]:
    """Parameters, fp32 size and median batch-1 CPU latency of a saved student."""
    student = DistilledStudent.load(folder).eval()
    pixels = torch.randn(1, 3, student.image_size, student.image_size)
    student(pixels)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        student(pixels)
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in student.parameters())
    return {"student_params_m": round(params / 1e6, 2), "student_mib_fp32": round(params * 4 / 2**20, 1),
            "student_ms_per_image": round(statistics.median(times) * 1000, 2), "student_image_size": student.image_size}


def plot_accuracy(records: Sequence[Mapping[str, Any]], out_png: Path) -> Path:
    """Grouped bars: for each test domain, ID and OOD accuracy of every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({r["test_domain"] for r in records})
    methods = [m for m in dict.fromkeys(r["method"] for r in records)]
    methods.sort(key=lambda m: (m != TEACHER_ZERO_SHOT, m))
    fig, axes = plt.subplots(1, 2, figsize=(4 + 2.2 * len(domains), 3.6), sharey=True)
    width = 0.8 / max(1, len(methods))
    for ax, field, title in zip(axes, ("id_acc", "ood_acc"), ("in-domain (source val)", "out-of-domain (held out)")):
        for j, method in enumerate(methods):
            values = []
            for domain in domains:
                hits = [r[field] for r in records if r["method"] == method and r["test_domain"] == domain
                        and r.get(field) is not None]
                values.append(100 * statistics.mean(hits) if hits else 0.0)
            ax.bar([i + j * width for i in range(len(domains))], values, width, label=method)
        ax.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(domains))], domains)
        ax.set_title(title)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png

