"""DIME-FM (Sun et al., ICCV 2023): distillation with unpaired images and unpaired sentences.

Every teacher output is bought once and cached (image embeddings of the training images, text
embeddings of a sentence bank and of the class prompts); only the student's image side trains and
it predicts with the teacher's class text embeddings. With ``z = normalize(P f(x))``, ``t_i`` the
teacher's image embeddings of the batch and ``S`` a random batch of ``sentences_per_batch`` bank
sentences:

- VL: ``KL(softmax(s t_i S^T) || softmax(s z S^T))`` per image (image -> sentence) and the
  same per sentence over the batch's images (sentence -> image), temperature ``vl_temperature``
  (paper: 1), averaged over the two directions - weight ``vl_weight`` (paper: 0.7);
- P-VL: the teacher's image embeddings stand in for text: ``KL(softmax(s t_i t_j^T / 3) ||
  softmax(s z_i t_j^T / 3))`` over the batch's images j (the image itself included: the teacher's
  own embedding is its most similar pseudo-text), temperature ``pvl_temperature`` (paper: 3) -
  weight ``pvl_weight`` (paper: 0.3).

The similarity scale ``s`` is the teacher's own logit scale (``targets.logit_scale``, from the
vendor's model card): the paper's 100 *is* CLIP's logit scale, i.e. the sharpness at which that
teacher's similarities are meaningful. A teacher with another scale (the offline demo teacher's is
about 19) would be distilled at the wrong sharpness with a hard-coded 100; the
``similarity_scale`` hyperparameter still overrides it (0 = the teacher's).

Labels are not used in the loss (DIME-FM is label-free); they only select the checkpoint.
Images whose embedding was not bought carry no DIME-FM signal and are left out of both terms.
Stages: VL2V-ADiP's Align (projection) then Distill (backbone), so the comparison is about the loss.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from client_distiller.targets import TeacherTargets
from client_distiller.training.heads import TextHead
from client_distiller.training.methods.base import ALIGN_THEN_DISTILL, Batch, Hparam, HparamError, Method, align_lr
from client_distiller.training.methods.losses import softmax_kl, zero_like
from client_distiller.training.methods.registry import register
from client_distiller.training.students import Student


def vl_loss(z: torch.Tensor, t_img: torch.Tensor, sentences: torch.Tensor, *, scale: float = 100.0,
            temperature: float = 1.0) -> torch.Tensor:
    """Mean of the image->sentence and sentence->image KL(teacher || student) terms."""
    if z.shape[0] == 0:
        return zero_like(z)
    zn, tn, s = F.normalize(z, dim=-1), F.normalize(t_img, dim=-1), F.normalize(sentences, dim=-1)
    teacher, student = scale * tn @ s.T, scale * zn @ s.T          # [B, S]
    return 0.5 * (softmax_kl(teacher, student, temperature) + softmax_kl(teacher.T, student.T, temperature))


def pvl_loss(z: torch.Tensor, t_img: torch.Tensor, *, scale: float = 100.0, temperature: float = 3.0) -> torch.Tensor:
    """KL(teacher image->image || student-image->teacher-image) softmaxes over the batch."""
    if z.shape[0] == 0:
        return zero_like(z)
    zn, tn = F.normalize(z, dim=-1), F.normalize(t_img, dim=-1)
    return softmax_kl(scale * tn @ tn.T, scale * zn @ tn.T, temperature)


@register
class DIMEFM(Method):
    """Unpaired VL + P-VL distillation against a bought sentence bank."""

    name = "dime-fm"
    needs = frozenset({"class_texts", "images", "sentences"})
    HPARAMS = {
        **Method.HPARAMS,
        "align_lr": align_lr(),
        "vl_weight": Hparam(0.7, "weight of the VL term (paper: 0.7)"),
        "pvl_weight": Hparam(0.3, "weight of the P-VL term (paper: 0.3)"),
        "vl_temperature": Hparam(1.0, "temperature of the VL softmaxes (paper: 1)"),
        "pvl_temperature": Hparam(3.0, "temperature of the P-VL softmaxes (paper: 3)"),
        "similarity_scale": Hparam(0.0, "cosine similarities are multiplied by this; 0 = the teacher's logit "
                                        "scale (paper: CLIP's, 100)"),
        "sentences_per_batch": Hparam(128, "bank sentences drawn (with replacement) per step"),
    }
    STAGES = ALIGN_THEN_DISTILL

    def __init__(self, student: Student, num_classes: int, targets: TeacherTargets | None = None,
                 hparams: Mapping[str, Any] | None = None) -> None:
        super().__init__(student, num_classes, targets, hparams)
        assert targets is not None and targets.text_embeddings is not None and targets.sentence_embeddings is not None
        h = self.hparams
        if h["vl_temperature"] <= 0 or h["pvl_temperature"] <= 0 or h["sentences_per_batch"] < 1:
            raise HparamError("temperatures must be > 0 and sentences_per_batch >= 1")
        if targets.sentence_embeddings.shape[0] == 0:
            raise HparamError("dime-fm needs a non-empty sentence bank")
        self.head = TextHead(student.feature_dim, targets.text_embeddings, targets.logit_scale)
        self.register_buffer("sentences", F.normalize(targets.sentence_embeddings, dim=-1).clone(), persistent=False)
        if h["similarity_scale"] < 0:
            raise HparamError(f"similarity_scale must be >= 0 (0 = the teacher's), got {h['similarity_scale']}")
        self.similarity_scale = float(h["similarity_scale"] or targets.logit_scale)

    def sample_sentences(self) -> torch.Tensor:
        """A random batch of bank sentences (the loop seeds torch's generator per stage)."""
        n = self.sentences.shape[0]
        idx = torch.randint(n, (int(self.hparams["sentences_per_batch"]),))
        return self.sentences[idx.to(self.sentences.device)]

    def terms(self, batch: Batch, sentences: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z = self.head.projection(self.pooled(batch))
        if batch.image_targets is None or batch.has_image is None:
            return {"vl": zero_like(z), "pvl": zero_like(z)}
        keep = batch.has_image.bool()
        zk, tk = z[keep], batch.image_targets[keep]
        s = self.sample_sentences() if sentences is None else sentences
        h = self.hparams
        return {"vl": vl_loss(zk, tk, s, scale=self.similarity_scale, temperature=h["vl_temperature"]),
                "pvl": pvl_loss(zk, tk, scale=self.similarity_scale, temperature=h["pvl_temperature"])}

    def loss(self, batch: Batch) -> torch.Tensor:
        t = self.terms(batch)
        return self.hparams["vl_weight"] * t["vl"] + self.hparams["pvl_weight"] * t["pvl"]
