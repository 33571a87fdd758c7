"""THE training loop: every method and every stage runs through :func:`train_stage`.

The loop knows nothing method-specific. It asks the method which stages exist, which parameters
train in each (``Method.begin_stage``) and for the loss of a :class:`~client_distiller.training.methods.Batch`;
it owns seeding, the device, the optimiser (Adam), per-domain batching, periodic validation on the
source domains' out-splits, keeping the best state (training-domain validation model selection)
and, under ``torchrun``, DistributedDataParallel.

Batches follow DomainBed: one infinite stream per source domain, ``batch_size`` images from each,
concatenated. Each stage ends by loading its best state, so a following stage (VL2V-ADiP's
Distill) starts from the best checkpoint of the previous one.

Under DDP (``world_size`` ranks) ``batch_size`` stays per source domain *and per rank*: every rank
draws the same global batch of ``world_size x batch_size`` images per domain (the batch one
process with that batch size would draw: every seed is independent of the rank), keeps its
``batch_size`` rows of each domain, augments and runs only those, and gathers the features back
into the global batch (:class:`~client_distiller.training.methods.base.Shard`), so the loss, the averaged
gradients and the weights equal the one-process run's up to float rounding
(``tests/client/test_ddp.py``). BatchNorm is frozen by default, so no SyncBatchNorm is needed;
with ``freeze_batchnorm=False`` each rank would normalise by its own rows' statistics.

The fast CPU path (``benchmarks/results/training_throughput.md``): images are decoded once per
process into uint8 tensors and each batch is augmented as tensors (:mod:`.augment`); a stage whose
backbone is frozen trains on a :func:`feature_bank` of it instead of running it; BatchNorm stays in
eval mode throughout; the model runs channels_last.
"""

from __future__ import annotations

import os
import random
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from client_distiller.errors import RunError
from client_distiller.reporting.evaluate import count_correct
from client_distiller.targets import TeacherTargets
from client_distiller.training.augment import decode_images
from client_distiller.training.methods import Batch, Method, Stage
from client_distiller.training.methods.base import Shard

Items = Sequence[tuple[Path, int]]


class TrainingError(RunError):
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


def init_seed(seed: int, method: str) -> int:
    """The seed of a method's random initialisation (projection, heads, learnable scales) in trial
    ``seed``: a function of the trial and the method's name only, so a method starts from the same
    weights whichever other methods run before it, and on a resumed run."""
    return int(np.random.default_rng([seed, zlib.crc32(method.encode())]).integers(2**31))


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

    ``num_workers`` only serves validation through a PIL-style transform (no ``batch`` method);
    the tensor path decodes each image once per process and needs no loader workers.

    ``freeze_batchnorm`` keeps every BatchNorm layer in eval mode in every stage, so its running
    statistics never move (VL2V-ADiP's reference code and DomainBed's ResNet do the same: with a
    few dozen images per step, re-estimated statistics ruin the pretrained features). The affine
    weights still train with the backbone. ``cache_features``: a stage whose backbone is frozen
    (Align) runs on backbone features computed once, of the clean training images plus
    ``feature_views`` augmented views of each (exact: a frozen backbone in eval mode is a fixed
    function), instead of a forward pass through the backbone at every step. ``channels_last``
    stores the model and its batches in NHWC, which the CPU convolution kernels run ~1.25x faster
    (``benchmarks/results/training_throughput.md``).
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
    freeze_batchnorm: bool = True
    cache_features: bool = True
    feature_views: int = 2
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.feature_views < 0:
            raise TrainingError(f"feature_views must be >= 0, got {self.feature_views}")
        if self.keep not in ("best", "last"):
            raise TrainingError(f"keep must be 'best' or 'last', got {self.keep!r}")
        if self.batch_size < 1 or self.eval_every < 1:
            raise TrainingError("batch_size and eval_every must be >= 1")

    def steps_for(self, stage: str) -> int:
        """This stage's step count: ``steps`` itself, or its mapping's entry (``"*"``: every other stage)."""
        n = self.steps.get(stage, self.steps.get("*")) if isinstance(self.steps, Mapping) else self.steps
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


class TeacherColumns:
    """The teacher's outputs for a list of items, as tensors indexed like the items.

    Looked up by path once (bought once, reused for every augmented view): ``image_targets`` [N, D]
    (zeros and ``has_image`` False where not bought) and ``probabilities`` [N, C] (uniform and
    ``has_probabilities`` False where unknown); either is None when not asked for.
    """

    def __init__(self, items: Items, targets: TeacherTargets | None, *, images: bool, probabilities: bool) -> None:
        self.image_targets = self.has_image = self.probabilities = self.has_probabilities = None
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

    def fill(self, batch: Batch, idx: torch.Tensor) -> Batch:
        if self.image_targets is not None and self.has_image is not None:
            batch.image_targets, batch.has_image = self.image_targets[idx], self.has_image[idx]
        if self.probabilities is not None and self.has_probabilities is not None:
            batch.probabilities, batch.has_probabilities = self.probabilities[idx], self.has_probabilities[idx]
        return batch


def apply_transform(transform: Callable, images: Sequence[torch.Tensor], generator: torch.Generator,
                    keep: slice | None = None) -> torch.Tensor:
    """A batch through ``transform``: the batched tensor path when it has one (:mod:`.augment`),
    else one PIL image at a time (any torchvision-style callable). ``keep``: only those rows of the
    result (a DDP rank's); the tensor path draws for every image but transforms only those, a
    PIL-style callable (its own randomness) transforms every image and the rows are kept."""
    if hasattr(transform, "batch"):
        return transform.batch(images, generator) if keep is None else transform.batch(images, generator, keep=keep)
    from torchvision.transforms.v2.functional import to_pil_image

    out = torch.stack([transform(to_pil_image(t)) for t in images])
    return out if keep is None else out[keep]


def _stream_seed(cfg: TrainConfig, stage_index: int, domain: int, *extra: int) -> int:
    """A batch or view stream's seed. The same on every rank (the 0 is where the rank once was, kept so
    one-process streams are unchanged): DDP ranks draw the one-process global batch and split it."""
    return int(np.random.default_rng([cfg.seed, stage_index, 0, domain, *extra]).integers(2**62))


def _is_channels_last(method: Method) -> bool:
    w = next((p for p in method.backbone.parameters() if p.dim() == 4), None)
    return w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def _val_pixels(data: TrainData) -> torch.Tensor:
    """The validation images through the evaluation transform, as one batch."""
    return apply_transform(data.eval_transform, decode_images([p for p, _ in data.val]), torch.Generator())


@torch.no_grad()
def _backbone_features(method: Method, pixels: torch.Tensor, device: torch.device, batch_size: int) -> torch.Tensor:
    memory = torch.channels_last if _is_channels_last(method) else torch.contiguous_format
    out = [method.backbone(pixels[i:i + batch_size].to(device).contiguous(memory_format=memory)).float().cpu()
           for i in range(0, pixels.shape[0], batch_size)]
    return torch.cat(out) if out else torch.zeros(0, method.student_info.feature_dim)


_BANKS: dict[tuple[Any, ...], list[torch.Tensor]] = {}


def _weights_fingerprint(module: torch.nn.Module) -> tuple[float, ...]:
    """A cheap checksum of a module's parameters and buffers (equal weights -> equal fingerprint)."""
    with torch.no_grad():
        return tuple(round(float(t.double().sum()), 6) for t in module.state_dict().values()
                     if t.is_floating_point())


def feature_bank(method: Method, data: TrainData, cfg: TrainConfig, device: torch.device, stage_index: int,
                 info: DistInfo) -> list[torch.Tensor]:
    """Per source domain, backbone features [V, N, F] of the clean images (view 0) and
    ``cfg.feature_views`` augmented views, computed once with the frozen backbone in eval mode.

    Memoised for the process (the last one): the projection-head methods of one job share a
    pretrained backbone, the same images and the same seeded views, so they share one bank. The
    key includes a checksum of the backbone's weights, so a different backbone never reuses it.
    """
    key = (stage_index, info.rank, cfg.seed, cfg.feature_views, repr(data.train_transform), repr(data.eval_transform),
           tuple(tuple(str(p) for p, _ in items) for items in data.sources), _weights_fingerprint(method.backbone))
    if key in _BANKS:
        return _BANKS[key]
    method.eval()
    bank = []
    for d, items in enumerate(data.sources):
        pixels = decode_images([p for p, _ in items])
        views = [apply_transform(data.eval_transform, pixels, torch.Generator())]
        g = torch.Generator().manual_seed(_stream_seed(cfg, stage_index, d, 1))
        views += [apply_transform(data.train_transform, pixels, g) for _ in range(cfg.feature_views)]
        bank.append(torch.stack([_backbone_features(method, v, device, cfg.eval_batch_size) for v in views]))
    method.train()
    _BANKS.clear()
    _BANKS[key] = bank
    return bank


def global_order(domains: int, batch_size: int, world_size: int) -> torch.Tensor:
    """``order`` of :class:`Shard`: global row ``j = d * W * B + r * B + k`` (domain ``d``, rank ``r``,
    ``k < B``) sits at row ``r * D * B + d * B + k`` of the ranks' concatenated local rows."""
    d, r, k = torch.meshgrid(torch.arange(domains), torch.arange(world_size), torch.arange(batch_size), indexing="ij")
    return (r * domains * batch_size + d * batch_size + k).reshape(-1)


def _batches(data: TrainData, method: Method, cfg: TrainConfig, stage_index: int, info: DistInfo,
             bank: list[torch.Tensor] | None = None) -> Iterator[Batch]:
    """Concatenated per-domain minibatches, seeded by (seed, stage, domain).

    With a ``bank`` (frozen backbone) each image of a batch is one of its cached feature views,
    drawn uniformly; otherwise its pixels are augmented afresh from the decoded uint8 images.
    Under DDP every stream draws the global ``world_size * batch_size`` images of its domain and
    this rank keeps rows ``[rank * batch_size, (rank + 1) * batch_size)`` of each domain's pixels
    or features; labels and teacher targets stay global (see :class:`Shard`).
    """
    want_images, want_probs = "images" in method.needs, "class_probabilities" in method.needs
    targets = data.targets if (want_images or want_probs) else None
    per_domain = cfg.batch_size * info.world_size
    mine = slice(info.rank * cfg.batch_size, (info.rank + 1) * cfg.batch_size)
    shard = Shard(info.rank, info.world_size, global_order(len(data.sources), cfg.batch_size, info.world_size)) \
        if info.world_size > 1 else None
    streams = []
    for d, items in enumerate(data.sources):
        seed = _stream_seed(cfg, stage_index, d)
        columns = TeacherColumns(items, targets, images=want_images, probabilities=want_probs)
        pixels = decode_images([p for p, _ in items]) if (bank is None and data.preload) else None
        labels = torch.tensor([y for _, y in items], dtype=torch.long)
        streams.append((items, columns, pixels, labels, iter(InfiniteBatchSampler(len(items), per_domain, seed)),
                        torch.Generator().manual_seed(seed ^ 0x5EED)))
    while True:
        parts: list[Batch] = []
        for d, (items, columns, pixels, labels, sampler, g) in enumerate(streams):
            idx = torch.tensor(next(sampler), dtype=torch.long)
            if bank is not None:
                views = torch.randint(bank[d].shape[0], (idx.shape[0],), generator=g)
                part = Batch(None, labels[idx], features=bank[d][views, idx] if shard is None else
                             bank[d][views[mine], idx[mine]])
            else:
                imgs = [pixels[i] for i in idx.tolist()] if pixels is not None else \
                    decode_images([items[i][0] for i in idx.tolist()])
                # under DDP: every random draw for the global batch, the pixel work for this rank's rows
                part = Batch(apply_transform(data.train_transform, imgs, g, keep=None if shard is None else mine),
                             labels[idx])
            parts.append(columns.fill(part, idx))
        batch = Batch.concat(parts)
        batch.shard = shard
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
    # where the stage's time went: building batches (decode/augment/feature lookup), the frozen
    # backbone's feature bank, validation; the rest of ``seconds`` is forward/backward/step
    data_seconds: float = 0.0
    feature_seconds: float = 0.0
    eval_seconds: float = 0.0


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


def _validate(method: Method, data: TrainData, cfg: TrainConfig, device: torch.device, info: DistInfo,
              val_features: torch.Tensor | None = None) -> float:
    """Training-domain validation accuracy; on cached features when the backbone is frozen."""
    method.eval()
    _sync_buffers(method)
    if val_features is not None:
        labels = torch.tensor([y for _, y in data.val])[info.rank::info.world_size]
        feats = val_features[info.rank::info.world_size]
        with torch.no_grad():
            pred = torch.cat([method.predict_features(feats[i:i + cfg.eval_batch_size].to(device)).argmax(-1).cpu()
                              for i in range(0, feats.shape[0], cfg.eval_batch_size)]) if feats.shape[0] else labels
        correct, total = int((pred == labels).sum()), int(labels.shape[0])
    else:
        correct, total = count_correct(method.predict, data.val, data.eval_transform, device=device,
                                       batch_size=cfg.eval_batch_size, shard=(info.rank, info.world_size),
                                       num_workers=cfg.num_workers)
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
    # The same on every rank, so random draws inside a loss (DIME-FM's sentence batch) are the one
    # process's; no registered student has dropout, whose masks would then repeat across ranks.
    seed_everything(cfg.seed * 1000 + index * 10)
    method.to(device, memory_format=torch.channels_last) if cfg.channels_last else method.to(device)
    params = method.begin_stage(stage, freeze_batchnorm=cfg.freeze_batchnorm)
    if not params:
        raise TrainingError(f"{method.name}/{stage.name}: no trainable parameters")
    method.train()
    model: torch.nn.Module = method
    find_unused = method.may_leave_parameters_unused(stage)
    if dist_active():
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(method, device_ids=[device.index] if device.type == "cuda" else None,
                    find_unused_parameters=find_unused, **_no_forward_buffer_sync())
    opt = torch.optim.Adam(params, lr=method.hparams[stage.lr], weight_decay=method.hparams["weight_decay"])
    hist = StageHistory(stage.name, steps)
    best_state: dict[str, torch.Tensor] | None = None
    t0 = time.perf_counter()

    def consider(step: int, loss: float | None) -> None:
        nonlocal best_state
        t_eval = time.perf_counter()
        acc = _validate(method, data, cfg, device, info, val_features)
        hist.eval_seconds += time.perf_counter() - t_eval
        hist.evals.append({"step": step, "val_acc": acc, "loss": loss})
        if acc > hist.best_val_acc:
            hist.best_val_acc, hist.best_step, best_state = acc, step, _state_copy(method)

    bank = val_features = None
    if cfg.cache_features and method.backbone_frozen:  # Align: the backbone is a fixed function here
        t_feat = time.perf_counter()
        bank = feature_bank(method, data, cfg, device, index, info) if steps else None
        method.eval()
        val_features = _backbone_features(method, _val_pixels(data), device, cfg.eval_batch_size)
        method.train()
        hist.feature_seconds = time.perf_counter() - t_feat
    if stage.eval_initial or steps == 0:
        consider(0, None)  # the starting point: no training loss yet
    batches = _batches(data, method, cfg, index, info, bank) if steps else iter(())
    hist.image_target_coverage = _coverage(data, method)
    running, n_running = 0.0, 0
    bar = tqdm(range(1, steps + 1), desc=f"{method.name}/{stage.name}", disable=not (cfg.show_progress and info.is_main),
               leave=False)
    for step in bar:
        t_data = time.perf_counter()
        batch = next(batches).to(device)
        if batch.x is not None and cfg.channels_last:
            batch.x = batch.x.contiguous(memory_format=torch.channels_last)
        hist.data_seconds += time.perf_counter() - t_data
        loss = model(batch)
        if not torch.isfinite(loss):
            raise TrainingError(f"{method.name}/{stage.name}: non-finite loss {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 1 and model is not method and not find_unused:
            check_all_reached(method, stage)
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


def check_all_reached(method: Method, stage: Stage) -> None:
    """After the first DDP backward: every trainable parameter got a gradient, as DDP without
    ``find_unused_parameters`` requires (else it fails at the next step with an error that does not
    name the method). Raises :class:`TrainingError` naming the parameters and the remedy."""
    missed = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    if missed:
        raise TrainingError(f"{method.name}/{stage.name}: trainable parameters outside the loss's graph "
                            f"({', '.join(missed[:5])}{', ...' if len(missed) > 5 else ''}); DDP needs "
                            f"{type(method).__name__}.may_leave_parameters_unused to return True for this stage")


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
