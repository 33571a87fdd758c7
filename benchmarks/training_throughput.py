"""Training throughput: the one training loop against a plain PyTorch loop, side by side, one run.

For each method and stage the loop (``client_distiller.training.loop.train_stage``) trains a few steps on
the offline benchmark; its images/s counts only the stepping time (validation excluded, the
frozen-backbone feature bank reported apart). The reference is the simplest loop a PyTorch user
would write over the same student, the same batch size and *pre-augmented* images already in
memory: forward, loss, backward, Adam step, nothing else. The ratio loop / plain says what the
loop's machinery (batch assembly, augmentation, teacher-target lookup) costs; the data share is
the fraction of the loop's stepping time spent building batches. CPU options (bf16 autocast,
channels_last) are measured on the plain loop so their effect on the raw model is visible.

Teacher targets are random unit vectors: throughput does not depend on their values, and no
vendor is needed.

    python benchmarks/training_throughput.py            # small benchmark, 128 px, 8 images/domain
    python benchmarks/training_throughput.py --quick    # fewer steps (a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from _report import cpu_summary, publish

from client_distiller.data import DomainBedFolder, eval_transform, leave_one_out, train_transform
from client_distiller.targets import TeacherTargets
from client_distiller.training.loop import TrainConfig, TrainData, train_stage
from client_distiller.training.methods import get_method
from client_distiller.training.students import create_student
from offline_data import build_benchmark

METHODS = ("erm", "kd", "vl2v-adip", "clip-kd", "dime-fm")


def random_targets(data: DomainBedFolder, dim: int = 768, sentences: int = 300) -> TeacherTargets:
    g = torch.Generator().manual_seed(0)
    unit = lambda n: F.normalize(torch.randn(n, dim, generator=g), dim=-1)  # noqa: E731
    paths = [p for d in data.domains for p, _ in data.files[d]]
    images = dict(zip((str(p) for p in paths), unit(len(paths))))
    return TeacherTargets(data.class_names, unit(len(data.classes)), images, 18.8, "random",
                          sentence_embeddings=unit(sentences))


def plain_loop(student_name: str, pixels: torch.Tensor, labels: torch.Tensor, steps: int, batch: int, *,
               bf16: bool = False, channels_last: bool = False, compile: bool = False,
               threads: int | None = None) -> float:
    """Images/s of forward + cross-entropy + backward + Adam over in-memory, pre-augmented pixels.

    ``compile`` wraps the model in ``torch.compile`` (inductor; its compile time is spent in the
    warm-up steps and excluded, and printed); ``threads`` runs with that many intra-op threads."""
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    st = create_student(student_name)
    model = torch.nn.Sequential(st.model, torch.nn.Linear(st.feature_dim, int(labels.max()) + 1))
    for m in model.modules():  # the loop's default: BatchNorm frozen
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile else model
    n = pixels.shape[0]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step(i: int) -> None:
        idx = torch.arange(i * batch, (i + 1) * batch) % n
        with autocast:
            loss = F.cross_entropy(forward(pixels[idx]), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    warm_up = 2 if compile else 1  # inductor compiles the forward, then the backward
    for i in range(warm_up):
        step(i)
    if compile:
        print(f"torch.compile warm-up: {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    for i in range(warm_up, warm_up + steps):
        step(i)
    rate = steps * batch / (time.perf_counter() - t0)
    torch.set_num_threads(previous_threads)
    return rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None, help="DomainBed folder (default: build the small preset)")
    parser.add_argument("--student", default="efficientnet-lite0")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="images per source domain per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile (inductor); its compile warm-up is printed, not counted")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training_throughput.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steps = 4 if args.quick else args.steps
    tmp = tempfile.TemporaryDirectory()
    root = args.data or Path(tmp.name) / "fd"
    if args.data is None:
        build_benchmark("fashion-domains", root, seed=0, split="client", size="small")
    data = DomainBedFolder.scan(root)
    loo = leave_one_out(data, data.domains[-1])
    st = create_student(args.student)
    size = args.image_size
    targets = random_targets(data)
    tdata = TrainData([s.train for s in loo.sources], [x for s in loo.sources for x in s.val],
                      train_transform(size, st.mean, st.std), eval_transform(size, st.mean, st.std), targets)
    global_batch = args.batch_size * len(tdata.sources)

    # the plain reference: pre-augmented pixels of the same images, already in memory
    from client_distiller.training.augment import decode_images
    items = [x for s in tdata.sources for x in s]
    g = torch.Generator().manual_seed(0)
    pixels = tdata.train_transform.batch(decode_images([p for p, _ in items]), g)
    labels = torch.tensor([y for _, y in items])
    plain = {
        "fp32": plain_loop(args.student, pixels, labels, steps, global_batch),
        "fp32 channels_last": plain_loop(args.student, pixels, labels, steps, global_batch, channels_last=True),
        "bf16 autocast": plain_loop(args.student, pixels, labels, steps, global_batch, bf16=True),
        "bf16 autocast channels_last": plain_loop(args.student, pixels, labels, steps, global_batch, bf16=True,
                                                  channels_last=True),
        "fp32 channels_last, 1 thread": plain_loop(args.student, pixels, labels, steps, global_batch,
                                                   channels_last=True, threads=1),
    }
    if args.compile:  # off by default: its warm-up alone outlasts a whole recipe stage on a 2-core CPU
        plain["fp32 channels_last, torch.compile"] = plain_loop(args.student, pixels, labels, steps, global_batch,
                                                                channels_last=True, compile=True)

    rows = []
    for name in METHODS:
        cls = get_method(name)
        torch.manual_seed(0)
        method = cls(cls.build_student(args.student), len(data.classes), targets if cls.needs else None,
                     {"lr": 1e-4})
        for stage in cls.STAGES:
            stage_steps = steps * 10 if "head.projection" in stage.trainable and "backbone" not in stage.trainable \
                else steps
            cfg = TrainConfig(steps=stage_steps, batch_size=args.batch_size, eval_every=10**9, show_progress=False)
            hist = train_stage(method, stage, tdata, cfg)
            stepping = hist.seconds - hist.eval_seconds - hist.feature_seconds
            rows.append((name, stage.name, stage_steps, stage_steps * global_batch / stepping,
                         hist.data_seconds / stepping, hist.feature_seconds))

    lines = [
        "# Training throughput: the training loop vs a plain PyTorch loop",
        "",
        f"Command: `python benchmarks/training_throughput.py{' --quick' if args.quick else ''}` "
        f"(student {args.student}, {size} px, {args.batch_size} images x {len(tdata.sources)} source domains "
        f"= {global_batch} per step, {steps} steps per backbone stage, {args.threads} threads).",
        "",
        f"Machine: {cpu_summary()}, torch {torch.__version__}.",
        "",
        "Plain PyTorch loop over the same student and batch, pre-augmented images in memory (images/s):",
        "",
        "| Variant | images/s | vs fp32 |",
        "|---|---|---|",
        *(f"| {k} | {v:.1f} | {v / plain['fp32']:.2f} |" for k, v in plain.items()),
        "",
        "The training loop (augmentation on the fly, teacher targets looked up, BatchNorm frozen; "
        "validation excluded):",
        "",
        "Its model runs channels_last, so its like-for-like reference is the plain channels_last row.",
        "",
        "| Method | Stage | Steps | images/s | loop / plain channels_last | loop / plain fp32 | data share | "
        "feature bank (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, stage, n, ips, share, bank in rows:
        if bank > 0:  # a frozen backbone: the stage steps on cached features, no forward pass to compare
            ratios, bank_cell = "- (cached features) | -", f"{bank:.1f}"
        else:
            ratios, bank_cell = f"{ips / plain['fp32 channels_last']:.2f} | {ips / plain['fp32']:.2f}", "-"
        lines.append(f"| {name} | {stage} | {n} | {ips:.1f} | {ratios} | {share:.1%} | {bank_cell} |")
    lines += ["", "The feature bank is computed once per process and shared by the projection-head methods "
              "of a job (the first row pays for it, the later ones find it)."]
    publish(lines, args.out)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
