"""Inference latency and size: the distilled student vs the teachers a client would buy from.

The student is what a VL2V-ADiP run deploys (EfficientNet-Lite0 backbone + projection + cosine
to the class text embeddings); the teachers are image towers measured in the same process on the
same CPU: the offline demo teacher (if built) and real CLIP architectures at random init (the
weights do not change the cost; no hub is needed). Prints ms/image at batch 1, images/s at a
larger batch, parameters and fp32 size, and the teacher/student ratios.

    python benchmarks/student_latency.py                   # Lite0 student vs ViT-B-16 and ViT-L-14
    python benchmarks/student_latency.py --student runs/x/students/sketch/vl2v-adip --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from _report import cpu_summary, publish


@dataclass
class Subject:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    module: torch.nn.Module
    image_size: int


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def student_subject(folder: Path | None, image_size: int) -> Subject:
    if folder is not None:
        from client_distiller.deployed import DistilledStudent

        student = DistilledStudent.load(folder).eval()
        return Subject(f"distilled student ({folder.name}), {student.image_size} px", student.forward, student,
                       student.image_size)
    from client_distiller.training.students import create_student

    st = create_student("efficientnet-lite0", pretrained=False)
    with torch.no_grad():
        width = st.model(torch.zeros(1, 3, image_size, image_size)).shape[-1]
    projection = torch.nn.Linear(width, 768, bias=False)
    head = torch.nn.Sequential(st.model, projection).eval()
    return Subject(f"student: EfficientNet-Lite0 + projection, {image_size} px", head, head, image_size)


def clip_subject(model_name: str, label: str) -> Subject:
    import open_clip

    model = open_clip.create_model(model_name, pretrained=None).eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return Subject(label, model.encode_image, model.visual, int(size))


def demo_teacher_subject(folder: Path) -> Subject | None:
    if not (folder / "open_clip_config.json").is_file():
        return None
    import open_clip

    model = open_clip.create_model(f"local-dir:{folder}").eval()
    size = model.visual.preprocess_cfg.get("size", 128) if hasattr(model.visual, "preprocess_cfg") else 128
    size = size[0] if isinstance(size, (tuple, list)) else size
    return Subject("demo teacher (EfficientNet-Lite2 CLIP)", model.encode_image, model.visual, int(size))


@torch.inference_mode()
def measure(subject: Subject, batch: int, repeats: int) -> tuple[float, float]:
    """(median ms per image at batch 1, images/s at `batch`)."""
    one = torch.randn(1, 3, subject.image_size, subject.image_size)
    many = torch.randn(batch, 3, subject.image_size, subject.image_size)
    subject.forward(one)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subject.forward(one)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    rounds = max(1, repeats // 4)
    for _ in range(rounds):
        subject.forward(many)
    throughput = batch * rounds / (time.perf_counter() - start)
    return statistics.median(times) * 1000, throughput


def machine() -> str:
    return f"{cpu_summary()}, torch {torch.__version__} ({torch.get_num_threads()} threads), CPU fp32"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", type=Path, help="a saved DistilledStudent folder (default: the architecture)")
    parser.add_argument("--image-size", type=int, default=96, help="student input size when no folder is given")
    parser.add_argument("--demo-teacher", type=Path, default=Path("var/demo/vendor/demo-teacher"))
    parser.add_argument("--teachers", nargs="*", default=["ViT-B-16", "ViT-L-14"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=12)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "student_latency.md")
    args = parser.parse_args()
    if args.quick:
        args.teachers, args.repeats, args.batch = ["ViT-B-32"], 4, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    subjects = [student_subject(args.student, args.image_size)]
    demo = demo_teacher_subject(args.demo_teacher)
    if demo is not None:
        subjects.append(demo)
    subjects += [clip_subject(name, f"teacher: open_clip {name} image tower (random init, timing only)")
                 for name in args.teachers]
    rows = []
    for subject in subjects:
        ms, ips = measure(subject, args.batch, args.repeats if subject is subjects[0] else max(3, args.repeats // 3))
        params = _params(subject.module)
        rows.append((subject.name, subject.image_size, params / 1e6, params * 4 / 2**20, ms, ips))
        print(f"{subject.name}: {ms:.1f} ms/image at batch 1, {ips:.1f} images/s at batch {args.batch}", flush=True)
    base = rows[0]
    lines = [
        "# Inference latency and size: distilled student vs teachers",
        "",
        f"Machine: {machine()}. Batch-1 latency is the median of repeated single-image forwards; throughput "
        f"at batch {args.batch}.",
        f"Command: `python {' '.join(sys.argv)}`",
        "",
        "| model | input px | params (M) | fp32 size (MiB) | ms/image, batch 1 | images/s, batch "
        f"{args.batch} | latency vs student |",
        "|---|---|---|---|---|---|---|",
        *[f"| {n} | {px} | {p:.1f} | {mb:.0f} | {ms:.1f} | {ips:.1f} | {ms / base[4]:.1f}x |"
          for n, px, p, mb, ms, ips in rows],
    ]
    publish(lines, args.out)


if __name__ == "__main__":
    main()
