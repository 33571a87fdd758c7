"""VL2V-ADiP (Addepalli et al., CVPR 2024): align then distill a student to a black-box CLIP.

The student's pooled features go through a linear projection ``P`` into the teacher's embedding
space. With ``z = normalize(P f(x))``, ``t_img`` the teacher's embedding of the (un-augmented)
image and ``t_txt(y)`` the teacher's class text embedding of the label, the loss per image is

    lam * (1 - cos(z, t_img)) + (1 - lam) * (1 - cos(z, t_txt(y)))          (lam = 0.5)

Text-only fallback: when the budget did not cover an image (its teacher embedding was not bought)
the image term is dropped and that image's loss is ``1 - cos(z, t_txt(y))`` at full weight - the
text target is still a valid teacher target, and re-weighting it keeps every image's loss on the
same [0, 2] scale.

Stages: ``align`` trains only ``P`` (backbone frozen, BatchNorm in eval mode); ``distill`` starts
from the best align checkpoint and trains the backbone with ``P`` frozen. Prediction: cosine to
every class text embedding times the teacher's logit scale; no classifier head.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from client_distiller.targets import TeacherTargets
from client_distiller.training.heads import TextHead
from client_distiller.training.methods.base import ALIGN_THEN_DISTILL, Batch, Hparam, HparamError, Method, align_lr
from client_distiller.training.methods.registry import register
from client_distiller.training.students import Student


def adip_loss(student_emb: torch.Tensor, text_targets: torch.Tensor, image_targets: torch.Tensor | None,
              has_image: torch.Tensor | None, lam: float) -> torch.Tensor:
    """Mean VL2V-ADiP loss over a batch.

    ``student_emb`` [B, D] (normalised here), ``text_targets`` [B, D] = t_txt(y) per sample,
    ``image_targets`` [B, D] and ``has_image`` [B] (None = no image targets at all).
    """
    z = F.normalize(student_emb, dim=-1)
    text_term = 1.0 - (z * F.normalize(text_targets, dim=-1)).sum(-1)
    if image_targets is None or has_image is None:
        return text_term.mean()
    image_term = 1.0 - (z * F.normalize(image_targets, dim=-1)).sum(-1)
    mixed = lam * image_term + (1.0 - lam) * text_term
    return torch.where(has_image.bool(), mixed, text_term).mean()


@register
class VL2VADiP(Method):
    """Black-box VL2V-ADiP: needs class text embeddings and (as many as bought) image embeddings."""

    name = "vl2v-adip"
    needs = frozenset({"class_texts", "images"})
    HPARAMS = {
        **Method.HPARAMS,
        "align_lr": align_lr(),
        "lam": Hparam(0.5, "weight of the image-embedding term (1 - lam on the text term)",
                      lambda r: float(r.choice([0.25, 0.5, 0.75]))),
    }
    STAGES = ALIGN_THEN_DISTILL

    def __init__(self, student: Student, num_classes: int, targets: TeacherTargets | None = None,
                 hparams: Mapping[str, Any] | None = None) -> None:
        super().__init__(student, num_classes, targets, hparams)
        assert targets is not None  # checked by the base class through ``needs``
        if not 0.0 <= self.hparams["lam"] <= 1.0:
            raise HparamError(f"lam must be in [0, 1], got {self.hparams['lam']}")
        self.head = TextHead(student.feature_dim, targets.text_embeddings, targets.logit_scale)

    def loss(self, batch: Batch) -> torch.Tensor:
        z = self.head.projection(self.pooled(batch))
        return adip_loss(z, self.head.text_embeddings[batch.y], batch.image_targets, batch.has_image,
                         self.hparams["lam"])
