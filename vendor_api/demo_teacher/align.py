"""LiT-style alignment on cached features: what trains, and on which pairs.

Trained: the image tower's last blocks (``Recipe.unfreeze_from`` on) and head, the text
projection and the logit scale. Frozen: the lower image blocks, the MiniLM transformer, and the
ImageNet rows of the head's first layer. Each step has three terms:

1. fashion pairs - vendor-private pictures against their rich captions, a contrastive loss whose
   positives are all captions of the same (domain, class) in the batch;
2. ImageNet pairs - the Lite2 classifier's weight vector of a class, scaled to a confident logit,
   stands in for a picture of it and is paired with a caption of its name: this keeps 1,000
   everyday concepts nameable although no ImageNet picture is available;
3. keep-ImageNet - KL between the original and the fine-tuned ImageNet logits on the vendor
   pictures, so fine-tuning the last blocks does not wash out the ImageNet evidence the head's
   gates read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .features import ImageCache, upper_trunk
from .recipe import N_IMAGENET, Recipe


@dataclass
class AlignData:
    """Everything the loop reads, all in memory."""

    images: ImageCache
    groups: np.ndarray            # (N,) id of (domain, class) per picture
    caption_ids: list[list[int]]  # per picture, indices into ``caption_feats``
    caption_feats: torch.Tensor   # (U, 384)
    imagenet_feats: torch.Tensor  # (K, 384) ImageNet caption features
    imagenet_caption_class: np.ndarray  # (K,) class of each ImageNet caption
    imagenet_w: torch.Tensor
    imagenet_b: torch.Tensor


def _soft_clip_loss(img: torch.Tensor, txt: torch.Tensor, groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where every pair of the same group counts as positive."""
    logits = scale * img @ txt.T
    pos = (groups[:, None] == groups[None, :]).float()
    target = pos / pos.sum(1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.log_softmax(0)).sum(0).mean())


def _mask_imagenet_rows(grad: torch.Tensor) -> torch.Tensor:
    grad = grad.clone()
    grad[:N_IMAGENET] = 0
    return grad


def align(model: torch.nn.Module, data: AlignData, recipe: Recipe, seed: int, *,
          progress: bool = False) -> dict[str, float]:
    """Train in place; returns the last losses (for the build report)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    trunk, head, tproj = model.visual.trunk, model.visual.head, model.text.proj
    for p in model.parameters():
        p.requires_grad_(False)
    trunk_params = [p for m in (*trunk.blocks[recipe.unfreeze_from:], trunk.conv_head, trunk.bn2)
                    for p in m.parameters()]
    head_params = [*head.parameters(), *tproj.parameters(), model.logit_scale]
    for p in trunk_params + head_params:
        p.requires_grad_(True)
    hooks = [head.mlp.fc1.weight.register_hook(_mask_imagenet_rows),
             head.mlp.fc1.bias.register_hook(_mask_imagenet_rows)]
    opt = torch.optim.AdamW([{"params": trunk_params, "lr": recipe.trunk_lr},
                             {"params": head_params, "lr": recipe.lr}], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, recipe.steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / recipe.steps)))
    trunk.eval()  # BatchNorm statistics stay ImageNet's; only the affine weights and convs move
    w_hat = F.normalize(data.imagenet_w, dim=1)
    conf = (12.0 - data.imagenet_b) / data.imagenet_w.norm(dim=1)  # scale giving a logit of ~12
    by_class = [np.flatnonzero(data.imagenet_caption_class == c) for c in range(N_IMAGENET)]
    n = len(data.groups)
    losses: dict[str, float] = {}
    bar = tqdm(range(recipe.steps), desc="teacher: alignment", disable=not progress, unit="step")
    for _ in bar:
        idx = rng.choice(n, size=min(recipe.batch, n), replace=False)
        cap = torch.tensor([data.caption_ids[i][int(rng.integers(len(data.caption_ids[i])))] for i in idx])
        feats = upper_trunk(trunk, data.images.acts[idx].float(), recipe.unfreeze_from)
        img = F.normalize(head(feats), dim=-1)
        txt = F.normalize(tproj(data.caption_feats[cap]), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        groups = torch.from_numpy(data.groups[idx])
        l_fashion = _soft_clip_loss(img, txt, groups, scale)

        cls = rng.choice(N_IMAGENET, size=min(recipe.batch, N_IMAGENET), replace=False)
        pseudo = w_hat[cls] * conf[cls, None]
        pseudo = pseudo * torch.empty(len(cls), 1).uniform_(0.6, 1.2)
        inet_cap = torch.tensor([by_class[c][int(rng.integers(len(by_class[c])))] for c in cls])
        img_i = F.normalize(head(pseudo), dim=-1)
        txt_i = F.normalize(tproj(data.imagenet_feats[inet_cap]), dim=-1)
        l_imagenet = _soft_clip_loss(img_i, txt_i, torch.from_numpy(cls), scale)

        new_logits = feats @ data.imagenet_w.T + data.imagenet_b
        old = data.images.logits[idx]
        l_keep = F.kl_div((new_logits / 2).log_softmax(1), (old / 2).log_softmax(1), log_target=True,
                          reduction="batchmean") * 4

        loss = l_fashion + l_imagenet + l_keep
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses = {"fashion": l_fashion.item(), "imagenet": l_imagenet.item(), "keep_imagenet": l_keep.item(),
                  "logit_scale": scale.item()}
        bar.set_postfix({k: f"{v:.2f}" for k, v in losses.items()})
    for h in hooks:
        h.remove()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses
