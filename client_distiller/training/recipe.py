"""The default training recipe: one home for the schedule and learning rates every command uses.

``compare``, ``demo`` and ``experiment`` all train with :data:`CPU_RECIPE` unless told otherwise,
so the committed tables and the main job are made with the same recipe, and changing it is one
edit here. Its learning rates are the ones :mod:`client_distiller.commands.tune` selected on
*training-domain validation only* (never a held-out domain), giving every method the same number
of trials: ``results/recipe/selected.json`` records that choice and a test checks that this file
agrees with it.

What is fixed rather than tuned, and why:
- Align (projection heads) runs on cached features of a frozen backbone (see
  :class:`client_distiller.training.loop.TrainConfig`), so its many steps cost seconds; its learning rate
  is the same for every projection-head method;
- the backbone stages' steps and batch size are set by the CPU time budget (a full 6-method
  ``compare`` on a 2-core CPU), not by the sweep; model selection picks the best checkpoint
  along the way;
- BatchNorm is frozen in every stage (its running statistics never move).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence


@dataclass(frozen=True)
class Schedule:
    """How one student trains: which backbone, from which weights, at what input size, for how
    many steps per stage, with how many images per source domain per step, validated how often.
    Every command builds one and hands it to the leave-one-domain-out job."""

    student: str
    pretrained: bool = True
    steps: int = 300
    align_steps: int | None = None   # None: Align runs ``steps`` too
    batch_size: int = 32
    image_size: int | None = None    # None: the teacher's input size (its card's ``image_size``)
    eval_every: int = 100

    @property
    def stage_steps(self) -> int | dict[str, int]:
        """``steps`` for every stage, or ``{"align": align_steps, "*": steps}`` when Align has its own."""
        return self.steps if self.align_steps is None else {"align": self.align_steps, "*": self.steps}


@dataclass(frozen=True)
class Recipe:
    """A schedule (steps per stage, batch per source domain, validation period) and per-method
    hyperparameters as ``METHOD.NAME=VALUE`` strings (the ``--hparam`` form)."""

    align_steps: int
    steps: int
    batch_size: int
    eval_every: int
    hparams: tuple[str, ...] = field(default_factory=tuple)

    def stage_steps(self, steps: int | None = None, align_steps: int | None = None) -> dict[str, int]:
        """``{"align": A, "*": S}`` for :class:`~client_distiller.training.loop.TrainConfig`, with overrides."""
        return {"align": self.align_steps if align_steps is None else align_steps,
                "*": self.steps if steps is None else steps}

    def hparams_for(self, methods: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
        """The recipe's hyperparameters of ``methods`` followed by ``extra`` (later ones win)."""
        return [h for h in self.hparams if h.split(".", 1)[0] in methods] + list(extra)

    def learning_rates(self) -> Mapping[str, float]:
        """``{"method.name": value}`` of every learning-rate hyperparameter in the recipe."""
        out = {}
        for pair in self.hparams:
            name, _, value = pair.partition("=")
            if name.endswith("lr"):
                out[name] = float(value)
        return out


# Align: every projection-head method, the same (not tuned per method).
ALIGN_LR = 3e-3
# The backbone stage's learning rate of each method, as selected by `client-distill tune`
# (results/recipe/selected.json).
SELECTED_LR: dict[str, float] = {
    "erm": 1e-4,
    "kd": 3e-4,
    "vl2v-adip": 3e-4,
    "clip-kd": 3e-4,
    "dime-fm": 1e-4,
    "vl2v-sd": 1e-4,
}
PROJECTION_METHODS = ("vl2v-adip", "clip-kd", "dime-fm", "vl2v-sd")

CPU_RECIPE = Recipe(
    align_steps=300,
    steps=150,
    batch_size=8,
    eval_every=50,
    hparams=tuple([f"{m}.lr={lr:g}" for m, lr in SELECTED_LR.items()]
                  + [f"{m}.align_lr={ALIGN_LR:g}" for m in PROJECTION_METHODS]),
)
