"""CLIP-KD (Yang et al., CVPR 2024) in the black-box, image-student form.

CLIP-KD distils both towers of a CLIP; an image-only student has no text tower, so the teacher's
class text embeddings ``T`` [C, D] stand in for the batch's captions (each image's "paired text"
is its class prompt). With ``z = normalize(P f(x))`` (``P`` projects to the teacher's size),
``t_i`` the teacher's embedding of image i and ``s`` the teacher's logit scale:

- FD: ``MSE(z, t_img)`` (mean over elements) - weight ``fd_weight`` (paper: 2000);
- CRD: KL(teacher || student) of the in-batch relation distributions at temperature 1, both
  directions as in the paper: image -> text (``softmax(s t_i T^T)`` vs ``softmax(s z_i T^T)``) and
  text -> image (for each class text, ``softmax_j(s T_c t_j)`` vs ``softmax_j(s T_c z_j)`` over the
  batch's images with a teacher embedding), averaged - weight ``crd_weight`` (paper: 1);
- ICL: InfoNCE with a learnable scale from 1/0.07, the student's embeddings contrasted with the
  *teacher's* embeddings of the other modality - weight ``icl_weight`` (paper: 1). Paper: student
  image anchors against teacher texts, plus student text anchors against teacher images. Here the
  first half is exact (each student image against every class text, positive: its class); the
  second half needs a student text tower, which does not exist, so it becomes the text -> image
  direction of the same pairing: each class text of the batch as anchor against the student image
  embeddings of the batch, with a target spread evenly over the images of that class (several
  images share one class prompt, where the paper's captions are unique);
- the task loss: cross-entropy of ``s z T^T`` with the labels.

Setting a weight to 0 ablates that term. CLIP-KD uses no sentence bank (only the class prompts
its ``needs`` pay for), so its result never depends on which other methods bought what. Images
whose embedding was not bought contribute only to the terms without a teacher image (task, ICL).

Stages: the same Align (projection + ICL scale, backbone frozen) then Distill (backbone) as
VL2V-ADiP. CLIP-KD trains students end to end, but ours are pretrained with a *random* projection:
training both at once lets the projection's early random gradients distort pretrained features
(the LP-FT argument), and sharing the stages keeps the comparison about the loss alone.
Prediction: the text head (cosine to class text embeddings x logit scale).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from client_distiller.targets import TeacherTargets
from client_distiller.training.heads import TextHead
from client_distiller.training.methods.base import Batch, Hparam, HparamError, Method, Stage, align_lr
from client_distiller.training.methods.losses import softmax_kl, zero_like
from client_distiller.training.methods.registry import register
from client_distiller.training.students import Student

ICL_INIT_SCALE = 1.0 / 0.07
MAX_SCALE = 100.0  # CLIP's clamp on the learnable logit scale


class LearnableScale(nn.Module):
    """A learnable logit scale, stored as a log (CLIP), clamped at :data:`MAX_SCALE`."""

    def __init__(self, init: float = ICL_INIT_SCALE) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor(math.log(init)))

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_SCALE)


def fd_loss(z: torch.Tensor, t_img: torch.Tensor) -> torch.Tensor:
    """Feature distillation: MSE between normalised student and teacher embeddings (mean over elements)."""
    if z.shape[0] == 0:
        return zero_like(z)
    return F.mse_loss(F.normalize(z, dim=-1), F.normalize(t_img, dim=-1))


def _text_to_image_targets(y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes present in the batch [K], target distribution [K, B] spread over each class's images)."""
    present = torch.unique(y)
    member = (y.unsqueeze(0) == present.unsqueeze(1)).float()
    return present, member / member.sum(-1, keepdim=True)


def crd_loss(z: torch.Tensor, t_img: torch.Tensor, texts: torch.Tensor, scale: float) -> torch.Tensor:
    """Contrastive relational distillation: mean of the image->text and text->image
    KL(teacher || student) of the in-batch softmaxes (T = 1)."""
    zn, tn = F.normalize(z, dim=-1), F.normalize(t_img, dim=-1)
    teacher, student = scale * tn @ texts.T, scale * zn @ texts.T       # [B, C]
    return 0.5 * (softmax_kl(teacher, student) + softmax_kl(teacher.T, student.T))


def icl_loss(z: torch.Tensor, y: torch.Tensor, class_texts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Interactive contrastive learning (see the module docstring): the mean of student image ->
    teacher class text InfoNCE and teacher class text -> student image InfoNCE."""
    zn = F.normalize(z, dim=-1)
    logits = scale * zn @ class_texts.T                                  # [B, C]
    image_to_text = F.cross_entropy(logits, y)
    present, target = _text_to_image_targets(y, class_texts.shape[0])
    text_to_image = -(target * F.log_softmax(logits.T[present], dim=-1)).sum(-1).mean()
    return 0.5 * (image_to_text + text_to_image)


@register
class CLIPKD(Method):
    """CLIP-KD's FD + CRD + ICL (+ task loss) for an image student of a black-box teacher."""

    name = "clip-kd"
    needs = frozenset({"class_texts", "images"})
    HPARAMS = {
        **Method.HPARAMS,
        "align_lr": align_lr("projection and ICL scale"),
        "fd_weight": Hparam(2000.0, "weight of FD (paper: 2000); 0 ablates it"),
        "crd_weight": Hparam(1.0, "weight of CRD (paper: 1); 0 ablates it"),
        "icl_weight": Hparam(1.0, "weight of ICL (paper: 1); 0 ablates it"),
        "task_weight": Hparam(1.0, "weight of the task loss (CE of the text-head logits)"),
    }
    STAGES = (
        Stage("align", trainable=("head.projection", "icl_scale"), lr="align_lr"),
        Stage("distill", trainable=("backbone", "icl_scale"), lr="lr", eval_initial=True),
    )

    def __init__(self, student: Student, num_classes: int, targets: TeacherTargets | None = None,
                 hparams: Mapping[str, Any] | None = None) -> None:
        super().__init__(student, num_classes, targets, hparams)
        assert targets is not None and targets.text_embeddings is not None  # checked through ``needs``
        for k in ("fd_weight", "crd_weight", "icl_weight", "task_weight"):
            if self.hparams[k] < 0:
                raise HparamError(f"{k} must be >= 0, got {self.hparams[k]}")
        self.head = TextHead(student.feature_dim, targets.text_embeddings, targets.logit_scale)
        self.icl_scale = LearnableScale()

    def terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Every term, unweighted (for logging and ablation tests)."""
        z = self.head.projection(self.pooled(batch))
        texts, scale = self.head.text_embeddings, float(self.head.logit_scale)
        if batch.image_targets is not None and batch.has_image is not None:
            keep, t_img = batch.has_image.bool(), batch.image_targets
        else:
            keep = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
            t_img = torch.zeros_like(z)
        return {
            "task": F.cross_entropy(scale * F.normalize(z, dim=-1) @ texts.T, batch.y),
            "fd": fd_loss(z[keep], t_img[keep]),
            "crd": crd_loss(z[keep], t_img[keep], texts, scale),
            "icl": icl_loss(z, batch.y, texts, self.icl_scale()),
        }

    def loss(self, batch: Batch) -> torch.Tensor:
        t = self.terms(batch)
        h = self.hparams
        return (h["task_weight"] * t["task"] + h["fd_weight"] * t["fd"] + h["crd_weight"] * t["crd"]
                + h["icl_weight"] * t["icl"])
