"""One pass of the frozen parts over the data, cached in memory.

The image trunk below the unfrozen blocks and the whole MiniLM transformer stay frozen, so their
outputs are computed once: per vendor picture the activation entering the first unfrozen block
(fp16) and the original ImageNet logits (for the keep-your-ImageNet-knowledge term), per unique
caption its mean-pooled MiniLM feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm


def to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Resize (bicubic, square) and normalise with mean = std = 0.5, as the saved preprocess does."""
    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
                    for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div_(127.5).sub_(1.0)


@dataclass
class ImageCache:
    acts: torch.Tensor    # (N, C, H, W) fp16, input of block ``unfreeze_from``
    logits: torch.Tensor  # (N, 1000) original ImageNet logits


@torch.inference_mode()
def cache_images(trunk: torch.nn.Module, w: torch.Tensor, b: torch.Tensor, images: Sequence[Image.Image],
                 size: int, unfreeze_from: int, *, batch: int = 128, progress: bool = False) -> ImageCache:
    """Run the frozen stem and blocks once; keep their output and the ImageNet logits."""
    trunk.eval()
    acts, logits = [], []
    for i in tqdm(range(0, len(images), batch), desc="teacher: image features", disable=not progress,
                  unit="batch"):
        x = to_tensor(images[i:i + batch], size)
        h = trunk.bn1(trunk.conv_stem(x))
        for blk in trunk.blocks[:unfreeze_from]:
            h = blk(h)
        acts.append(h.half())
        f = upper_trunk(trunk, h, unfreeze_from)
        logits.append(f @ w.T + b)
    return ImageCache(torch.cat(acts), torch.cat(logits))


def upper_trunk(trunk: torch.nn.Module, h: torch.Tensor, unfreeze_from: int) -> torch.Tensor:
    """The unfrozen part: remaining blocks, head conv, norm, pooling -> (N, 1280) features."""
    for blk in trunk.blocks[unfreeze_from:]:
        h = blk(h)
    return trunk.global_pool(trunk.bn2(trunk.conv_head(h)))


@torch.inference_mode()
def encode_texts(text_tower: torch.nn.Module, tokenizer, texts: Iterable[str], *, batch: int = 256,
                 progress: bool = False, desc: str = "teacher: text features") -> torch.Tensor:
    """Mean-pooled MiniLM features (before the trained projection) of ``texts``."""
    texts = list(texts)
    out = []
    for i in tqdm(range(0, len(texts), batch), desc=desc, disable=not progress, unit="batch"):
        ids = tokenizer(texts[i:i + batch])
        mask = (ids != text_tower.config.pad_token_id).long()
        keep = int(mask.sum(1).max())  # drop all-padding columns: same result, far less work
        ids, mask = ids[:, :keep], mask[:, :keep]
        hidden = text_tower.transformer(input_ids=ids, attention_mask=mask)
        out.append(text_tower.pooler(hidden, mask))
    return torch.cat(out)
