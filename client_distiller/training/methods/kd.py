"""KD (Hinton et al.): the naive distillation baseline that VL2V-ADiP is measured against.

The student (pretrained backbone + linear classifier) matches the teacher's zero-shot class
distribution over the class prompts. With student logits ``z``, temperature ``T`` and teacher
probabilities ``p`` the distillation term per image is

    T^2 * KL(p_T || softmax(z / T)),   p_T = softmax(log(p) / T)

computed with ``F.kl_div(F.log_softmax(z / T), log p_T, log_target=True)``: both arguments are
*log*-probabilities and the teacher is the target (the public VL2V-ADiP code passed probabilities,
which silently computes something else). ``log(p) / T`` equals the teacher's logits over ``T`` up
to a constant that the softmax removes, so tempering works the same whether the probabilities
were bought (probabilities-mode key) or derived from bought embeddings (``softmax(scale * cos)``).

Sparse answers (a top-k vendor returns zeros for the other classes) would make ``log p`` infinite:
each probability is floored at ``PROB_FLOOR`` and the vector renormalised before the log, i.e. the
missing mass is spread thinly and uniformly over the omitted classes.

The loss mixes in cross-entropy on the labels: ``alpha * KD + (1 - alpha) * CE`` with
``alpha = 0.5`` by default (Hinton's recipe keeps the hard-label term; the VL2V-ADiP paper does not
state its baseline's mix, so this is our choice and a hyperparameter). Images whose probabilities
were not bought (the budget ran out) train on CE alone at full weight.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from client_distiller.targets import TeacherTargets
from client_distiller.training.heads import LinearHead
from client_distiller.training.methods.base import Batch, Hparam, HparamError, Method, Stage
from client_distiller.training.methods.registry import register
from client_distiller.training.students import Student

PROB_FLOOR = 1e-8


def teacher_log_probs(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Tempered teacher log-probabilities ``log softmax(log p / T)`` from (possibly sparse) ``p`` [B, C]."""
    p = probabilities.clamp_min(PROB_FLOOR)
    log_p = torch.log(p / p.sum(-1, keepdim=True))
    return F.log_softmax(log_p / temperature, dim=-1)


def kd_divergence(student_logits: torch.Tensor, teacher_probabilities: torch.Tensor,
                  temperature: float) -> torch.Tensor:
    """Per-image ``T^2 * KL(p_T || softmax(z / T))`` [B]."""
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    log_p = teacher_log_probs(teacher_probabilities, temperature)
    return temperature ** 2 * F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


@register
class KD(Method):
    """Student + linear head distilled from the teacher's class probabilities (+ CE on labels)."""

    name = "kd"
    needs = frozenset({"class_probabilities"})
    HPARAMS = {
        **Method.HPARAMS,
        "temperature": Hparam(2.0, "softmax temperature T of both distributions (loss scaled by T^2)",
                              lambda r: float(r.choice([1.0, 2.0, 4.0]))),
        "alpha": Hparam(0.5, "weight of the KD term; 1 - alpha on cross-entropy with the labels",
                        lambda r: float(r.choice([0.5, 0.9, 1.0]))),
    }
    STAGES = (Stage("kd", trainable=("backbone", "head")),)

    def __init__(self, student: Student, num_classes: int, targets: TeacherTargets | None = None,
                 hparams: Mapping[str, Any] | None = None) -> None:
        super().__init__(student, num_classes, targets, hparams)
        if self.hparams["temperature"] <= 0:
            raise HparamError(f"temperature must be > 0, got {self.hparams['temperature']}")
        if not 0.0 <= self.hparams["alpha"] <= 1.0:
            raise HparamError(f"alpha must be in [0, 1], got {self.hparams['alpha']}")
        self.head = LinearHead(student.feature_dim, num_classes)

    def loss(self, batch: Batch) -> torch.Tensor:
        logits = self.head(self.pooled(batch))
        ce = F.cross_entropy(logits, batch.y, reduction="none")
        if batch.probabilities is None or batch.has_probabilities is None:
            return ce.mean()
        alpha = self.hparams["alpha"]
        kd = kd_divergence(logits, batch.probabilities, self.hparams["temperature"])
        mixed = alpha * kd + (1.0 - alpha) * ce
        return torch.where(batch.has_probabilities.bool(), mixed, ce).mean()
