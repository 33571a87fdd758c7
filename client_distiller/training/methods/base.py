"""The one base class every training method derives from, in the DomainBed style.

A method declares, as class attributes, everything the shared loop in :mod:`client_distiller.training.loop`
needs to know, so adding a method (issue 6: kd, clip-kd, dime-fm, vl2v-sd) never touches the loop:

- ``name`` and ``needs`` - which teacher outputs it requires (a subset of :data:`TEACHER_OUTPUTS`),
  so the planner buys exactly the union of what the compared methods need, once;
- ``HPARAMS`` - declared hyperparameters with defaults (and optional seeded random draws);
- ``STAGES`` - the ordered training stages, each naming the sub-modules that train and the
  learning-rate hyperparameter; everything not trainable in a stage is frozen *and* kept in eval
  mode (so BatchNorm running statistics of a frozen backbone never move);
- ``loss(batch)`` and ``predict(x)``; ``head`` is one of :data:`client_distiller.training.heads.HEADS` so the
  deployable student reuses it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from client_distiller.errors import UsageError
from client_distiller.targets import TeacherTargets
from client_distiller.training.students import Student

# What a method may ask the planner to buy:
# - "class_texts": one ensembled text embedding per class (the Predict head of text-head methods);
# - "images": one teacher embedding per un-augmented training image;
# - "class_probabilities": the teacher's class distribution per training image (bought from a
#   probabilities-mode key, or derived from "images" + "class_texts" on an embeddings key);
# - "sentences": text embeddings of an unpaired sentence bank (DIME-FM; extra CRD texts for CLIP-KD).
TEACHER_OUTPUTS = frozenset({"class_texts", "images", "class_probabilities", "sentences"})


class MethodError(UsageError):
    """A method cannot be built: unknown name, bad hyperparameter, missing teacher outputs."""


class UnknownMethodError(MethodError, KeyError):
    """No method registered under that name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class HparamError(MethodError):
    """An unknown hyperparameter name or a value of the wrong kind."""


class MissingTeacherOutputError(MethodError):
    """The method needs teacher outputs that were not provided."""


@dataclass(frozen=True)
class Hparam:
    """One hyperparameter: its default and, for random searches, a seeded draw."""

    default: Any
    help: str = ""
    sample: Callable[[np.random.Generator], Any] | None = None


@dataclass(frozen=True)
class Stage:
    """One training stage: which sub-modules train and which hyperparameter is its learning rate.

    ``trainable`` holds dotted sub-module names of the method (``"backbone"``, ``"head.projection"``).
    ``eval_initial`` evaluates the starting point too, so a stage that starts from an earlier
    stage's best checkpoint can never end worse than it on validation.
    """

    name: str
    trainable: tuple[str, ...]
    lr: str = "lr"
    eval_initial: bool = False


def align_lr(what: str = "projection only") -> Hparam:
    """The Align stage's learning rate, shared by every method with a projection head."""
    return Hparam(5e-5, f"Adam learning rate of the Align stage ({what})", lambda r: float(10 ** r.uniform(-5, -2.5)))


# VL2V-ADiP's recipe, shared by the projection-head methods so a comparison differs only in the
# loss: Align trains the (randomly initialised) projection on a frozen backbone, then Distill
# trains the backbone from the best Align checkpoint with the projection fixed (LP-FT).
ALIGN_THEN_DISTILL: tuple[Stage, ...] = (
    Stage("align", trainable=("head.projection",), lr="align_lr"),
    Stage("distill", trainable=("backbone",), lr="lr", eval_initial=True),
)


@dataclass(frozen=True, eq=False)
class Shard:
    """This rank's share of a global batch under DistributedDataParallel.

    The loop draws the *global* batch on every rank (the batch one process would draw) and gives
    each rank the labels and teacher targets of all of it, but the pixels (or cached features) of
    only ``rows_per_rank`` of its rows. :meth:`gather` puts the ranks' features back together in the
    global order, so a method's loss is computed over the global batch on every rank: in-batch
    negatives (CLIP-KD's CRD and ICL, DIME-FM's VL and P-VL) see every rank's images, and each
    rank's loss equals the one-process loss of the same global batch.

    ``order[j]`` is the row of the rank-major concatenation (rank 0's rows, then rank 1's, ...)
    that holds row ``j`` of the global batch.
    """

    rank: int
    world_size: int
    order: torch.Tensor

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's ``local`` rows as the global batch, differentiable (see :class:`_GatherRows`)."""
        return _GatherRows.apply(local, self)


class _GatherRows(torch.autograd.Function):
    """All-gather with a gradient, as open_clip's ``gather_with_grad`` and CLIP-KD do.

    Every rank computes the same loss ``L`` of the gathered global batch. Backward sums the ranks'
    gradients of the gathered tensor (an all-reduce, then this rank's rows: a reduce-scatter,
    which gloo lacks), so a rank's local features get ``world_size * dL/df``; DDP then *averages*
    the parameter gradients over the ranks, which leaves exactly ``dL/dtheta`` of one process on
    the global batch. Parameters after the gather (the head) get the full ``dL/dtheta`` on every
    rank, which DDP's average leaves unchanged.
    """

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, shard: Shard) -> torch.Tensor:  # type: ignore[override]
        ctx.shard = shard
        parts = [torch.empty_like(local) for _ in range(shard.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts)[shard.order.to(local.device)]

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        shard: Shard = ctx.shard
        rank_major = torch.empty_like(grad)
        rank_major[shard.order.to(grad.device)] = grad
        dist.all_reduce(rank_major)
        n = rank_major.shape[0] // shard.world_size
        return rank_major[shard.rank * n:(shard.rank + 1) * n], None


@dataclass
class Batch:
    """One training minibatch (all source domains concatenated).

    ``x`` [B, 3, S, S] holds augmented pixels, or is None when ``features`` [B, F] holds the
    frozen backbone's cached features of them instead (Align on a feature bank; see
    :meth:`Method.pooled`). ``image_targets`` [B, D] holds the teacher's un-augmented image
    embeddings, zeros where ``has_image`` [B] is False (image not bought); both are None for
    methods that do not need images. ``probabilities`` [B, C] holds the teacher's class
    probabilities (uniform where ``has_probabilities`` is False); both are None for methods that do
    not need them.

    Under DDP ``shard`` is set: ``x`` / ``features`` hold only this rank's rows while every other
    field covers the global batch, and :meth:`Method.pooled` gathers the features, so a loss that
    takes its features from ``pooled`` needs no distributed code of its own.
    """

    x: torch.Tensor | None
    y: torch.Tensor
    image_targets: torch.Tensor | None = None
    has_image: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    probabilities: torch.Tensor | None = None
    has_probabilities: torch.Tensor | None = None
    features: torch.Tensor | None = None
    shard: Shard | None = None

    _TENSORS: ClassVar[tuple[str, ...]] = ("x", "y", "image_targets", "has_image", "probabilities",
                                           "has_probabilities", "features")

    def to(self, device: torch.device) -> "Batch":
        move = (lambda t: None if t is None else t.to(device, non_blocking=True))
        return Batch(**{k: move(getattr(self, k)) for k in self._TENSORS}, extras=self.extras, shard=self.shard)

    @classmethod
    def concat(cls, parts: "list[Batch]") -> "Batch":
        """One batch from per-domain parts (a field is None when it is None in the parts)."""
        def cat(name: str) -> torch.Tensor | None:
            values = [getattr(p, name) for p in parts]
            return None if any(v is None for v in values) else torch.cat(values)
        return cls(**{k: cat(k) for k in cls._TENSORS})


def _hparam_seed(random_seed: int, name: str) -> np.random.Generator:
    """DomainBed: each hyperparameter's draw is seeded by its own name (adding one changes no other)."""
    return np.random.default_rng([random_seed, zlib.crc32(name.encode())])


def _frozen_subtrees(module: nn.Module, trainable: set[int]) -> list[nn.Module]:
    """The largest sub-modules of ``module`` that contain no trainable sub-module."""
    out: list[nn.Module] = []
    for child in module.children():
        if id(child) in trainable:
            continue
        if any(id(m) in trainable for m in child.modules()):
            out.extend(_frozen_subtrees(child, trainable))
        else:
            out.append(child)
    return out


class Method(nn.Module):
    """Base class: a student backbone, a head, declared stages, a loss and a predictor."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    HPARAMS: ClassVar[dict[str, Hparam]] = {
        "lr": Hparam(5e-5, "Adam learning rate (VL2V-ADiP / DomainBed default)",
                     lambda r: float(10 ** r.uniform(-5, -3.5))),
        "weight_decay": Hparam(0.0, "Adam weight decay", lambda r: float(10 ** r.uniform(-6, -2))),
    }
    STAGES: ClassVar[tuple[Stage, ...]] = ()
    white_box: ClassVar[bool] = False  # needs the teacher's weights (VL2V-SD); compare skips it without them
    head: nn.Module

    def __init__(self, student: Student, num_classes: int, targets: TeacherTargets | None = None,
                 hparams: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        missing = self.needs - TEACHER_OUTPUTS
        if missing:
            raise MethodError(f"{self.name}: unknown teacher outputs declared {sorted(missing)}")
        if self.needs and targets is None:
            raise MissingTeacherOutputError(f"{self.name} needs teacher outputs {sorted(self.needs)}; "
                                            f"no TeacherTargets were given")
        if targets is not None and "class_texts" in self.needs and targets.num_classes != num_classes:
            raise MissingTeacherOutputError(f"{self.name}: teacher targets have {targets.num_classes} class "
                                            f"texts, the dataset has {num_classes} classes")
        if targets is not None:
            self._check_targets(targets)
        self.hparams = self.resolve_hparams(hparams)
        self.student_info = student
        self.backbone = student.model
        self.num_classes = num_classes
        self.targets = targets
        self._frozen: tuple[nn.Module, ...] = ()
        self._frozen_bn: tuple[nn.Module, ...] = ()

    def _check_targets(self, targets: TeacherTargets) -> None:
        """Each declared need must be present in a form the method can use (one clear error)."""
        if "class_texts" in self.needs and targets.text_embeddings is None:
            raise MissingTeacherOutputError(
                f"{self.name} needs the teacher's class text embeddings, which this vendor key does not sell "
                f"(a probabilities-only key); use an embeddings key or a method that needs only probabilities (kd)")
        if "sentences" in self.needs and targets.sentence_embeddings is None:
            raise MissingTeacherOutputError(f"{self.name} needs teacher embeddings of a sentence bank; none were bought")

    @classmethod
    def build_student(cls, name: str, *, pretrained: bool = True, teacher_weights: str | None = None) -> Student:
        """The student this method trains. Black-box methods: a pretrained image model by name
        (``teacher_weights`` is ignored); VL2V-SD overrides this to start from the teacher."""
        from client_distiller.training.students import create_student

        return create_student(name, pretrained=pretrained)

    # ------------------------------------------------------------------ hyperparameters
    @classmethod
    def resolve_hparams(cls, overrides: Mapping[str, Any] | None = None, *, random_seed: int | None = None
                        ) -> dict[str, Any]:
        """Defaults (or seeded random draws when ``random_seed`` is set), then ``overrides``."""
        values = {}
        for name, hp in cls.HPARAMS.items():
            values[name] = hp.sample(_hparam_seed(random_seed, name)) if (random_seed is not None and hp.sample) \
                else hp.default
        for name, value in (overrides or {}).items():
            if name not in cls.HPARAMS:
                raise HparamError(f"{cls.name}: unknown hyperparameter {name!r}; known: {', '.join(cls.HPARAMS)}")
            default = cls.HPARAMS[name].default
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise HparamError(f"{cls.name}: hyperparameter {name!r} must be a number, got {value!r}")
                value = type(default)(value) if isinstance(default, float) else value
            values[name] = value
        return values

    # ------------------------------------------------------------------ stages
    @classmethod
    def stage(cls, name: str) -> Stage:
        for s in cls.STAGES:
            if s.name == name:
                return s
        raise MethodError(f"{cls.name} has no stage {name!r}; stages: {', '.join(s.name for s in cls.STAGES)}")

    def begin_stage(self, stage: Stage, *, freeze_batchnorm: bool = True) -> list[nn.Parameter]:
        """Freeze everything, unfreeze ``stage.trainable``; returns the parameters to optimise.

        Modules that do not train are remembered and kept in eval mode by :meth:`train`; with
        ``freeze_batchnorm`` so is every BatchNorm layer, trainable or not (its running statistics
        never move; its affine weights still train when its module does).
        """
        for p in self.parameters():
            p.requires_grad_(False)
        trainable = [self.get_submodule(n) for n in stage.trainable]
        for m in trainable:
            for p in m.parameters():
                p.requires_grad_(True)
        self._frozen = tuple(_frozen_subtrees(self, {id(m) for m in trainable}))
        self._frozen_bn = tuple(m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)) \
            if freeze_batchnorm else ()
        self.train(self.training)
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> "Method":
        super().train(mode)
        for m in (*self._frozen, *self._frozen_bn):
            m.eval()
        return self

    @property
    def backbone_frozen(self) -> bool:
        return any(m is self.backbone for m in self._frozen)

    # ------------------------------------------------------------------ compute
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features; no autograd graph through a frozen backbone (Align is cheap)."""
        if self.backbone_frozen:
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def pooled(self, batch: Batch) -> torch.Tensor:
        """The batch's pooled backbone features: cached ones when the loop supplied them (a frozen
        backbone in eval mode computes exactly these), else a forward pass of ``batch.x``. Under
        DDP (``batch.shard``) this rank's features are gathered into the global batch's, so every
        loss built on ``pooled`` is the global batch's loss on every rank."""
        if batch.features is not None:
            local = batch.features
        else:
            assert batch.x is not None, "a batch needs pixels or cached features"
            local = self.features(batch.x)
        return local if batch.shard is None else batch.shard.gather(local)

    def may_leave_parameters_unused(self, stage: Stage) -> bool:
        """Whether a training step of ``stage`` can leave a trainable parameter out of the loss's
        graph. DDP needs to know (``find_unused_parameters``, which costs a graph traversal a step).
        False for every built-in method by design: a term ablated by a zero weight is multiplied by
        0, not skipped, so its parameters still get a (zero) gradient; images without a teacher
        embedding contribute a ``zero_like`` that keeps the graph. A method that does skip work
        overrides this; the loop checks it on the first DDP step and says so if it is wrong."""
        return False

    def loss(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, batch: Batch) -> torch.Tensor:
        """The training loss; ``forward`` so DistributedDataParallel can wrap a method."""
        return self.loss(batch)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class scores [B, C] (logits)."""
        return self.head(self.backbone(x))

    @torch.no_grad()
    def predict_features(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores from pooled backbone features (validation on a frozen backbone's cache)."""
        return self.head(features)
