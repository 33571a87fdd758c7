"""Perceptual codes of an image: what the class-list limit counts per image, so a re-compressed or
slightly altered copy is mostly the same image to it.

The class-list limit (`class_lists.py`) must decide before any charge, so before the model runs:
a code from the clean embedding (the near-duplicate LSH of `overlap.py`) would make every refused
request cost the vendor an inference. A DCT hash of the pixels the model sees costs microseconds:
the image in grey, averaged down to SIDE x SIDE, its 2-D DCT, and one bit per low-frequency
coefficient (the BLOCK x BLOCK corner without the constant term): above or below the median of
those coefficients. Small pixel changes (JPEG, resampling, a slight crop) move the high
frequencies and leave most of these bits alone.

One flipped bit would make an exact 63-bit code another image, so the bits are dealt into BANDS
interleaved bands, and an image's codes are its bands: a copy that keeps any one band whole is the
same image to the limit. The price is collisions, two unrelated images sharing a band; for the
limit that only matters to a key that asks several distinct class lists of both (an honest client
asks one list, its label set, of everything). Band count and width were chosen by measurement on
the offline benchmark (`benchmarks/class_list_codes.py`, results in `benchmarks/results/`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SIDE = 32
BLOCK = 8  # BLOCK**2 - 1 = 63 bits
BANDS = 3  # of 21 bits: see benchmarks/results/class_list_codes.md


def perceptual_bits(pixels: torch.Tensor) -> np.ndarray:
    """The BLOCK**2 - 1 hash bits of one image tensor (C, H, W, any normalisation)."""
    from scipy.fft import dctn

    if pixels.ndim != 3:
        raise ValueError(f"expected one image tensor (C, H, W), got shape {tuple(pixels.shape)}")
    grey = pixels.detach().float().mean(dim=0)[None, None]
    small = F.adaptive_avg_pool2d(grey, SIDE)[0, 0].double().cpu().numpy()
    coefficients = dctn(small, norm="ortho")[:BLOCK, :BLOCK].ravel()[1:]
    return coefficients > np.median(coefficients)


def perceptual_codes(pixels: torch.Tensor, bands: int = BANDS) -> tuple[str, ...]:
    """The image's band codes ("<band>:<hex bits>"): two images are the same image to the
    class-list limit when they share any one."""
    bits = perceptual_bits(pixels)
    return tuple(f"{b}:{np.packbits(bits[b::bands]).tobytes().hex()}" for b in range(bands))
