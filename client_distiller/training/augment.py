"""Image transforms on whole batches of decoded uint8 tensors: the fast CPU training path.

Why tensors: training reads the same few thousand small images for hundreds of steps. Decoding a
PNG and running a PIL augmentation chain per image per step cost more than the student's forward
pass at 64-128 px on two CPU cores. Here images are decoded once (:func:`decode_images`, kept in
memory as uint8 ``[3, H, W]`` tensors) and each step augments its batch with tensor operations:

- :class:`EvalTransform` - resize to ``size`` x ``size`` and normalise (every evaluation, and the
  deployed student, so training-time validation and deployment see identical pixels);
- :class:`TrainTransform` - DomainBed's training augmentation (random resized crop with scale
  0.7-1 and aspect 3/4-4/3, horizontal flip, colour jitter 0.3, random grayscale 0.1), drawn per
  image from an explicit ``torch.Generator`` so a batch is a pure function of its seed.

Both are also callable on one PIL image (``transform(image) -> [3, S, S]``), so code that feeds
PIL images (the deployed student, ``ImageListDataset``) uses the same implementation.

Differences from torchvision's PIL pipeline, all deliberate: the four colour-jitter operations run
in one random order per *batch* (torchvision draws the order per image); hue jitter is applied per
image in a loop (torchvision has no batched per-image hue); resizing is bilinear with antialias on
tensors, which differs from PIL's filter by at most a grey level or two.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import functional as TF

_DECODED: "OrderedDict[str, torch.Tensor]" = OrderedDict()
_DECODED_LIMIT_BYTES = 2 * 1024**3  # bounded: a job on a large dataset must not grow memory without end
_decoded_bytes = 0


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB uint8 tensor ``[3, H, W]`` of a PIL image."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_images(paths: Sequence[Path | str]) -> list[torch.Tensor]:
    """Each image decoded once per process (uint8 ``[3, H, W]``), memoised by path.

    Several methods of one job, and every validation, read the same images: they share one decode.
    The memo holds at most ~2 GiB; past that the oldest entries are dropped (decoded again if read).
    """
    global _decoded_bytes
    out = []
    for p in paths:
        key = str(p)
        t = _DECODED.get(key)
        if t is None:
            with Image.open(p) as im:
                t = pil_to_uint8(im)
            _DECODED[key] = t
            _decoded_bytes += t.numel()
            while _decoded_bytes > _DECODED_LIMIT_BYTES and len(_DECODED) > 1:
                _, old = _DECODED.popitem(last=False)
                _decoded_bytes -= old.numel()
        out.append(t)
    return out


def _stack_resized(images: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """Float [B, 3, size, size] in [0, 1]: one batched resize when all inputs share a shape."""
    if len({tuple(t.shape) for t in images}) == 1:
        x = torch.stack(list(images)).float().div_(255.0)
        return x if x.shape[-1] == size and x.shape[-2] == size else \
            F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return torch.cat([_stack_resized([t], size) for t in images])


@dataclass(frozen=True)
class EvalTransform:
    """Resize to ``size`` x ``size`` and normalise with the student's ``mean`` / ``std``."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def batch(self, images: Sequence[torch.Tensor], generator: torch.Generator | None = None,
              keep: slice | None = None) -> torch.Tensor:
        """The batch (or its rows ``keep``) resized and normalised; deterministic, so ``keep`` only saves work."""
        x = _stack_resized(images if keep is None else list(images)[keep], self.size)
        return TF.normalize(x, list(self.mean), list(self.std))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.batch([pil_to_uint8(image)])[0]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _crop_box(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
              g: torch.Generator | None) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters (10 tries, then a centre crop), from ``g``."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(_uniform(1, scale[0], scale[1], g))
        aspect = math.exp(float(_uniform(1, log_ratio[0], log_ratio[1], g)))
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            i = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            j = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return i, j, ch, cw
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


@dataclass(frozen=True)
class TrainTransform:
    """DomainBed's training augmentation on a batch of uint8 images, per image, from a generator."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: float = 0.3
    grayscale_p: float = 0.1
    flip_p: float = 0.5

    def batch(self, images: Sequence[torch.Tensor], generator: torch.Generator | None = None,
              keep: slice | None = None) -> torch.Tensor:
        """The augmented batch, or only its rows ``keep`` (one DDP rank's share of a global batch).

        Every random draw is made for *all* ``images``, in the same order, whoever keeps which rows:
        a rank's rows are then exactly the rows a single process drawing the whole batch from the
        same generator would produce, while the rank crops, resizes and jitters only its own.
        """
        g = generator
        boxes = [_crop_box(t.shape[-2], t.shape[-1], self.scale, self.ratio, g) for t in images]
        rows = keep if keep is not None else slice(None)
        chosen = list(zip(images, boxes))[rows]
        x = _stack_resized([t[:, i:i + h, j:j + w] for t, (i, j, h, w) in chosen], self.size)
        n = len(images)
        flip = (torch.rand(n, generator=g) < self.flip_p)[rows]
        if bool(flip.any()):
            x[flip] = x[flip].flip(-1)
        if self.jitter > 0:
            x = self._colour_jitter(x, g, n, rows)
        gray = (torch.rand(n, generator=g) < self.grayscale_p)[rows]
        if bool(gray.any()):
            x[gray] = _gray(x[gray]).expand(-1, 3, -1, -1)
        return TF.normalize(x, list(self.mean), list(self.std))

    def _colour_jitter(self, x: torch.Tensor, g: torch.Generator | None, n: int, rows: slice) -> torch.Tensor:
        """Jitter factors drawn for all ``n`` images of the batch, applied to ``x`` (its ``rows``)."""
        a = self.jitter
        factors = {"brightness": _uniform(n, max(0.0, 1 - a), 1 + a, g)[rows],
                   "contrast": _uniform(n, max(0.0, 1 - a), 1 + a, g)[rows],
                   "saturation": _uniform(n, max(0.0, 1 - a), 1 + a, g)[rows],
                   "hue": _uniform(n, -min(a, 0.5), min(a, 0.5), g)[rows]}
        for op in torch.randperm(4, generator=g).tolist():
            if op == 0:
                x = (x * factors["brightness"].view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
            elif op == 1:
                means = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
                x = _blend(x, means.expand_as(x), factors["contrast"])
            elif op == 2:
                x = _blend(x, _gray(x).expand_as(x), factors["saturation"])
            else:
                x = torch.stack([TF.adjust_hue(x[k], float(factors["hue"][k])) for k in range(x.shape[0])])
        return x

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.batch([pil_to_uint8(image)], generator)[0]
