"""ERM: the student with a linear head trained by cross-entropy; buys nothing from the teacher."""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from client_distiller.targets import TeacherTargets
from client_distiller.training.heads import LinearHead
from client_distiller.training.methods.base import Batch, Method, Stage
from client_distiller.training.methods.registry import register
from client_distiller.training.students import Student


@register
class ERM(Method):
    """Empirical risk minimisation over the pooled source domains (DomainBed's baseline)."""

    name = "erm"
    needs = frozenset()
    STAGES = (Stage("erm", trainable=("backbone", "head")),)

    def __init__(self, student: Student, num_classes: int, targets: TeacherTargets | None = None,
                 hparams: Mapping[str, Any] | None = None) -> None:
        super().__init__(student, num_classes, targets, hparams)
        self.head = LinearHead(student.feature_dim, num_classes)

    def loss(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.head(self.pooled(batch)), batch.y)
