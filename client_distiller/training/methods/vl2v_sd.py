"""VL2V-SD: VL2V-ADiP's white-box variant, for a client that holds the teacher's weights.

The student backbone is the teacher's own image encoder (loaded with open_clip from
``teacher_weights``: ``local-dir:PATH``, ``hf-hub:ORG/REPO`` or ``ARCH:WEIGHTS``), whose features are
the teacher's image embeddings before normalisation. The projection starts as the identity when
the sizes match, so before any training the student *is* the teacher's zero-shot classifier; then
the unchanged VL2V-ADiP loss and stages (Align: projection; Distill: the encoder) adapt it to the
source domains. Without teacher weights the method cannot be built (``compare`` skips it).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from client_distiller.targets import TeacherTargets
from client_distiller.training.methods.base import MethodError, Stage
from client_distiller.training.methods.registry import register
from client_distiller.training.methods.vl2v_adip import VL2VADiP
from client_distiller.training.students import Student, teacher_image_student


class MissingTeacherWeightsError(MethodError):
    """VL2V-SD was asked for without an open_clip spec of the teacher's weights."""


@register
class VL2VSD(VL2VADiP):
    """VL2V-ADiP whose student starts from the teacher's image encoder (white-box)."""

    name = "vl2v-sd"
    white_box = True
    # Align also scores its starting point: with the identity projection that *is* the teacher's
    # zero-shot classifier, so model selection can never end below it on validation.
    STAGES = (Stage("align", trainable=("head.projection",), lr="align_lr", eval_initial=True),
              *VL2VADiP.STAGES[1:])

    @classmethod
    def build_student(cls, name: str, *, pretrained: bool = True, teacher_weights: str | None = None) -> Student:
        if not teacher_weights:
            raise MissingTeacherWeightsError("vl2v-sd needs the teacher's weights (--teacher-weights SPEC, an "
                                             "open_clip spec: local-dir:PATH, hf-hub:ORG/REPO or ARCH:WEIGHTS)")
        return teacher_image_student(teacher_weights)

    def __init__(self, student: Student, num_classes: int, targets: TeacherTargets | None = None,
                 hparams: Mapping[str, Any] | None = None) -> None:
        super().__init__(student, num_classes, targets, hparams)
        proj = self.head.projection
        if proj.in_features == proj.out_features:
            with torch.no_grad():
                proj.weight.copy_(torch.eye(proj.in_features))
                proj.bias.zero_()
