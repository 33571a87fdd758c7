"""THE training loop: every method and every stage runs through :func:`train_stage`.

The loop knows nothing method-specific. It asks the method which stages exist, which parameters
train in each (``Method.begin_stage``) and for the loss of a :class:`~client_distiller.methods.Batch`;
it owns seeding, the device, the optimiser (Adam), per-domain batching, periodic validation on the
source domains' out-splits, keeping the best state (training-domain validation model selection)
and, under ``torchrun``, DistributedDataParallel.

Batches follow DomainBed: one infinite stream per source domain, ``batch_size`` images from each,
concatenated. Under DDP every rank draws its own streams (seeded by rank), gradients are averaged,
so the effective batch is ``world_size x domains x batch_size``. Each stage ends by loading its
best state, so a following stage (VL2V-ADiP's Distill) starts from the best checkpoint of the
previous one.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .data import ImageListDataset
from .evaluate import count_correct
from .methods import Batch, Method, Stage
from .targets import TeacherTargets

Items = Sequence[tuple[Path, int]]


class TrainingError(RuntimeError):
    """Training cannot proceed: no source data, a non-finite loss, a bad configuration."""


# ---------------------------------------------------------------------- environment
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> this process's CUDA device when present (LOCAL_RANK under torchrun), else CPU."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if dist_active() else torch.cuda.current_device())
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices); cuDNN picks deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def dist_active() -> bool:
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a distributed run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls) -> "DistInfo":
        return cls(dist.get_rank(), dist.get_world_size()) if dist_active() else cls()


# ---------------------------------------------------------------------- configuration and data
@dataclass
class TrainConfig:
    """Loop settings (method hyperparameters such as the learning rate live on the method).

    ``steps`` is one count for every stage or a ``{stage: steps}`` mapping; ``batch_size`` is per
    source domain (DomainBed / VL2V-ADiP: 32); validation runs every ``eval_every`` steps and at
    the end of each stage. ``keep="best"`` ends each stage at its best validation state
    (training-domain validation model selection); ``keep="last"`` at its final step.
    """

    steps: int | Mapping[str, int] = 5001
    batch_size: int = 32
    eval_every: int = 200
    eval_batch_size: int = 128
    seed: int = 0
    keep: str = "best"
    device: str = "auto"
    num_workers: int = 0
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.keep not in ("best", "last"):
            raise TrainingError(f"keep must be 'best' or 'last', got {self.keep!r}")
        if self.batch_size < 1 or self.eval_every < 1:
            raise TrainingError("batch_size and eval_every must be >= 1")

    def steps_for(self, stage: str) -> int:
        n = self.steps.get(stage) if isinstance(self.steps, Mapping) else self.steps
        if n is None:
            raise TrainingError(f"no step count for stage {stage!r} in {dict(self.steps)}")  # type: ignore[arg-type]
        if n < 0:
            raise TrainingError(f"steps must be >= 0, got {n} for stage {stage!r}")
        return int(n)


@dataclass
class TrainData:
    """What a method trains and selects on: per-source-domain training items and validation items.

    ``targets`` supplies the teacher's image embeddings (and class probabilities) for methods whose
    ``needs`` include ``"images"`` (``"class_probabilities"``); callers must already have restricted it
    to training images (see
    :meth:`TeacherTargets.restricted_to`).
    """

    sources: Sequence[Items]
    val: Items
    train_transform: Callable
    eval_transform: Callable
    targets: TeacherTargets | None = None
    preload: bool = True

    def __post_init__(self) -> None:
        self.sources = [list(s) for s in self.sources if len(s)]
        if not self.sources:
            raise TrainingError("no source-domain training images")


class TargetedDataset(Dataset):
    """Training images with, optionally, the teacher's outputs for each un-augmented image.

    Outputs are looked up by path once at construction (bought once, reused for every augmented
    view). ``targets`` adds the image embedding (zero vector and ``has_image = False`` where not
    bought); ``probabilities=True`` adds the teacher's class probabilities (bought or derived;
    uniform and ``has_probabilities = False`` where unknown). Items are tuples
    ``(x, y[, image_target, has_image][, probabilities, has_probabilities])``.
    """

    def __init__(self, items: Items, transform: Callable, targets: TeacherTargets | None, *, preload: bool,
                 images: bool = True, probabilities: bool = False) -> None:
        self.images = ImageListDataset(items, transform, preload=preload)
        self.with_targets = targets is not None and images
        self.with_probabilities = targets is not None and probabilities
        if targets is not None and images:
            found = [targets.image_target(p) for p, _ in items]
            zero = torch.zeros(targets.embed_dim or 0)
            self.image_targets = torch.stack([zero if t is None else t for t in found]) if found else \
                torch.zeros(0, targets.embed_dim or 0)
            self.has_image = torch.tensor([t is not None for t in found], dtype=torch.bool)
        if targets is not None and probabilities:
            probs = [targets.class_probabilities(p) for p, _ in items]
            uniform = torch.full((targets.num_classes,), 1.0 / targets.num_classes)
            self.probabilities = torch.stack([uniform if t is None else t for t in probs]) if probs else \
                torch.zeros(0, targets.num_classes)
            self.has_probabilities = torch.tensor([t is not None for t in probs], dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        x, y = self.images[i]
        out: tuple[Any, ...] = (x, y)
        if self.with_targets:
            out += (self.image_targets[i], self.has_image[i])
        if self.with_probabilities:
            out += (self.probabilities[i], self.has_probabilities[i])
        return out

    @property
    def coverage(self) -> float:
        return float(self.has_image.float().mean()) if self.with_targets and len(self) else 0.0


class InfiniteBatchSampler(Sampler[list[int]]):
    """Endless batches from a stream of seeded permutations (a small domain just repeats)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[list[int]]:
        buf: list[int] = []
        while True:
            while len(buf) < self.batch_size:
                buf.extend(torch.randperm(self.n, generator=self.generator).tolist())
            yield buf[:self.batch_size]
            buf = buf[self.batch_size:]


def _batches(data: TrainData, method: Method, cfg: TrainConfig, stage_index: int, info: DistInfo) -> Iterator[Batch]:
    """Concatenated per-domain minibatches, seeded by (seed, stage, rank, domain)."""
    want_images, want_probs = "images" in method.needs, "class_probabilities" in method.needs
    targets = data.targets if (want_images or want_probs) else None
    iters = []
    for d, items in enumerate(data.sources):
        ds = TargetedDataset(items, data.train_transform, targets, preload=data.preload, images=want_images,
                             probabilities=want_probs)
        seed = int(np.random.default_rng([cfg.seed, stage_index, info.rank, d]).integers(2**62))
        g = torch.Generator().manual_seed(seed)
        iters.append(iter(DataLoader(ds, batch_sampler=InfiniteBatchSampler(len(ds), cfg.batch_size, seed),
                                     num_workers=cfg.num_workers, generator=g,
                                     persistent_workers=cfg.num_workers > 0)))
    while True:
        parts = [next(it) for it in iters]
        cols = [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]
        batch = Batch(cols[0], cols[1])
        rest = cols[2:]
        if targets is not None and want_images:
            batch.image_targets, batch.has_image, rest = rest[0], rest[1], rest[2:]
        if targets is not None and want_probs:
            batch.probabilities, batch.has_probabilities = rest[0], rest[1]
        yield batch


# ---------------------------------------------------------------------- history
@dataclass
class StageHistory:
    """Loss and validation curve of one stage and its selected checkpoint."""

    stage: str
    steps: int
    evals: list[dict[str, float | None]] = field(default_factory=list)  # {"step", "val_acc", "loss"}
    best_step: int = -1
    best_val_acc: float = float("-inf")
    seconds: float = 0.0
    image_target_coverage: float | None = None


@dataclass
class History:
    method: str
    stages: list[StageHistory] = field(default_factory=list)

    @property
    def best_val_acc(self) -> float:
        return self.stages[-1].best_val_acc if self.stages else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "stages": [vars(s) for s in self.stages]}


# ---------------------------------------------------------------------- the loop
def _state_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _sync_buffers(method: Method) -> None:
    """Rank 0's buffers (BatchNorm running statistics) to every rank, so evaluation and the saved
    weights agree everywhere (each rank updated its statistics on its own batches)."""
    if dist_active():
        for b in method.buffers():
            dist.broadcast(b.data, src=0)


def _validate(method: Method, data: TrainData, cfg: TrainConfig, device: torch.device, info: DistInfo) -> float:
    method.eval()
    _sync_buffers(method)
    correct, total = count_correct(method.predict, data.val, data.eval_transform, device=device,
                                   batch_size=cfg.eval_batch_size, shard=(info.rank, info.world_size))
    if dist_active():
        t = torch.tensor([correct, total], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        correct, total = int(t[0]), int(t[1])
    method.train()
    return correct / total if total else float("nan")


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP kwargs: sync buffers at construction only (we broadcast them ourselves before validation)."""
    import inspect
    from torch.nn.parallel import DistributedDataParallel as DDP

    params = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def train_stage(method: Method, stage: Stage | str, data: TrainData, cfg: TrainConfig, *,
                stage_index: int | None = None) -> StageHistory:
    """Train one stage of ``method`` in place and leave it at the stage's best validation state.

    Under an initialised process group (``torchrun``) the method is wrapped in
    DistributedDataParallel; every rank ends with identical weights.
    """
    stage = method.stage(stage) if isinstance(stage, str) else stage
    index = stage_index if stage_index is not None else [s.name for s in method.STAGES].index(stage.name)
    info = DistInfo.current()
    device = resolve_device(cfg.device)
    steps = cfg.steps_for(stage.name)
    seed_everything(cfg.seed * 1000 + index * 10 + info.rank)
    method.to(device)
    params = method.begin_stage(stage)
    if not params:
        raise TrainingError(f"{method.name}/{stage.name}: no trainable parameters")
    method.train()
    model: torch.nn.Module = method
    if dist_active():
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(method, device_ids=[device.index] if device.type == "cuda" else None, **_no_forward_buffer_sync())
    opt = torch.optim.Adam(params, lr=method.hparams[stage.lr], weight_decay=method.hparams["weight_decay"])
    hist = StageHistory(stage.name, steps)
    best_state: dict[str, torch.Tensor] | None = None
    t0 = time.perf_counter()

    def consider(step: int, loss: float | None) -> None:
        nonlocal best_state
        acc = _validate(method, data, cfg, device, info)
        hist.evals.append({"step": step, "val_acc": acc, "loss": loss})
        if acc > hist.best_val_acc:
            hist.best_val_acc, hist.best_step, best_state = acc, step, _state_copy(method)

    if stage.eval_initial or steps == 0:
        consider(0, None)  # the starting point: no training loss yet
    batches = _batches(data, method, cfg, index, info) if steps else iter(())
    hist.image_target_coverage = _coverage(data, method)
    running, n_running = 0.0, 0
    bar = tqdm(range(1, steps + 1), desc=f"{method.name}/{stage.name}", disable=not (cfg.show_progress and info.is_main),
               leave=False)
    for step in bar:
        batch = next(batches).to(device)
        loss = model(batch)
        if not torch.isfinite(loss):
            raise TrainingError(f"{method.name}/{stage.name}: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += float(loss.detach())
        n_running += 1
        if step % cfg.eval_every == 0 or step == steps:
            consider(step, running / n_running)
            bar.set_postfix(loss=f"{running / n_running:.4f}", val=f"{hist.evals[-1]['val_acc']:.3f}")
            running, n_running = 0.0, 0
    bar.close()
    assert best_state is not None
    if cfg.keep == "best":
        method.load_state_dict(best_state)
    _sync_buffers(method)
    hist.seconds = time.perf_counter() - t0
    return hist


def _coverage(data: TrainData, method: Method) -> float | None:
    if "images" not in method.needs or data.targets is None:
        return None
    items = [p for s in data.sources for p, _ in s]
    return sum(data.targets.has_image(p) for p in items) / max(1, len(items))


def fit(method: Method, data: TrainData, cfg: TrainConfig, *, stages: Sequence[str] | None = None) -> History:
    """Run ``stages`` (default: all of the method's, in order) through :func:`train_stage`."""
    history = History(method.name)
    names = list(stages) if stages is not None else [s.name for s in method.STAGES]
    for name in names:
        history.stages.append(train_stage(method, name, data, cfg))
    method.eval()
    return history
