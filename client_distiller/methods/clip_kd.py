"""CLIP-KD (Yang et al., CVPR 2024) in the black-box, image-student form.

Only the image side of CLIP-KD applies to an image-only student; the teacher's text embeddings are
fixed targets. With ``z = normalize(P f(x))`` (``P`` projects to the teacher's size), ``t_i`` the
teacher's embedding of image i, ``T`` the class text embeddings (plus bought sentences, if any)
and ``s`` the teacher's logit scale:

- FD: ``MSE(z, t_img)`` (mean over elements) - weight ``fd_weight`` (paper: 2000);
- CRD: ``KL(softmax(s z_t T^T) || softmax(s z T^T))`` at temperature 1, teacher as target, over the
  batch's images (image-to-text direction: the text tower is the teacher's, so its text-to-image
  relations carry no student information beyond this) - weight ``crd_weight`` (paper: 1);
- ICL: InfoNCE with the student embedding as anchor, learnable scale from 1/0.07: against the
  batch's teacher image embeddings (positive: its own) and the class text embeddings (positive:
  its class), averaged - weight ``icl_weight`` (paper: 1);
- the task loss: cross-entropy of ``s z T_class^T`` with the labels.

Setting a weight to 0 ablates that term. Images whose embedding was not bought contribute only to
the text-side terms (task loss, ICL-text).

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

from ..heads import TextHead
from ..students import Student
from ..targets import TeacherTargets
from .base import Batch, Hparam, HparamError, Method, Stage, align_lr
from .losses import softmax_kl, zero_like
from .registry import register

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


def crd_loss(z: torch.Tensor, t_img: torch.Tensor, texts: torch.Tensor, scale: float) -> torch.Tensor:
    """Contrastive relational distillation: KL(teacher || student) of image-to-text softmaxes (T = 1)."""
    zn, tn = F.normalize(z, dim=-1), F.normalize(t_img, dim=-1)
    return softmax_kl(scale * tn @ texts.T, scale * zn @ texts.T)


def icl_loss(z: torch.Tensor, y: torch.Tensor, has_image: torch.Tensor, t_img: torch.Tensor,
             class_texts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Interactive contrastive learning: student anchors vs teacher embeddings (InfoNCE).

    Image part over the images with a teacher embedding (positive: the same image); text part over
    every image (positive: its class). The mean of the parts that exist.
    """
    zn = F.normalize(z, dim=-1)
    text_part = F.cross_entropy(scale * zn @ class_texts.T, y)
    keep = has_image.bool()
    if not bool(keep.any()):
        return text_part
    zi, ti = zn[keep], F.normalize(t_img[keep], dim=-1)
    image_part = F.cross_entropy(scale * zi @ ti.T, torch.arange(zi.shape[0], device=z.device))
    return 0.5 * (image_part + text_part)


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
        crd = targets.text_embeddings if targets.sentence_embeddings is None else \
            torch.cat([targets.text_embeddings, targets.sentence_embeddings])
        self.register_buffer("crd_texts", F.normalize(crd, dim=-1).clone(), persistent=False)

    def terms(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Every term, unweighted (for logging and ablation tests)."""
        z = self.head.projection(self.features(batch.x))
        texts, scale = self.head.text_embeddings, float(self.head.logit_scale)
        if batch.image_targets is not None and batch.has_image is not None:
            keep, t_img, has = batch.has_image.bool(), batch.image_targets, batch.has_image
        else:
            keep = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
            t_img, has = torch.zeros_like(z), keep
        return {
            "task": F.cross_entropy(scale * F.normalize(z, dim=-1) @ texts.T, batch.y),
            "fd": fd_loss(z[keep], t_img[keep]),
            "crd": crd_loss(z[keep], t_img[keep], self.crd_texts, scale),
            "icl": icl_loss(z, batch.y, has, t_img, texts, self.icl_scale()),
        }

    def loss(self, batch: Batch) -> torch.Tensor:
        t = self.terms(batch)
        h = self.hparams
        return (h["task_weight"] * t["task"] + h["fd_weight"] * t["fd"] + h["crd_weight"] * t["crd"]
                + h["icl_weight"] * t["icl"])
