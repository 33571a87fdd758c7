"""Loss pieces shared by the relational distillation methods (CLIP-KD's CRD, DIME-FM's VL / P-VL)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of ``KL(softmax(t / T) || softmax(s / T))``: the teacher's distribution is the
    target, both passed to ``kl_div`` as log-probabilities. Zero rows give 0 (no NaN)."""
    if teacher_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def zero_like(t: torch.Tensor) -> torch.Tensor:
    """A zero that keeps ``t``'s autograd graph, so a batch with nothing to distil still backprops."""
    return t.sum() * 0.0
