"""Placing a 28 x 28 item on a canvas with a random scale, rotation and position.

Shared by all domain renderers; each domain chooses its own ranges, which is one of the ways the
domains differ (the negative domain turns and shrinks items much more than the others).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter


def place(item: np.ndarray, rng: np.random.Generator, size: int, *,
          scale: tuple[float, float] = (0.7, 0.95), rotate: float = 15.0) -> np.ndarray:
    """The item's intensity in [0, 1] on a ``size`` x ``size`` canvas, randomly scaled/turned/moved."""
    side = max(8, int(round(size * rng.uniform(*scale))))
    img = Image.fromarray(item).resize((side, side), Image.BICUBIC)
    img = img.rotate(float(rng.uniform(-rotate, rotate)), resample=Image.BILINEAR, expand=True)
    w, h = img.size
    if w > size or h > size:  # a turned item can outgrow the canvas: keep its centre
        left, top = max(0, (w - size) // 2), max(0, (h - size) // 2)
        img = img.crop((left, top, left + min(w, size), top + min(h, size)))
        w, h = img.size
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(img, (int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def alpha_of(intensity: np.ndarray, gain: float = 4.0) -> np.ndarray:
    """An opacity mask: Fashion-MNIST items have dark interiors, so the mask is a boosted, closed version."""
    img = Image.fromarray((np.clip(intensity * gain, 0, 1) * 255).astype(np.uint8))
    img = img.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))
    return np.asarray(img, dtype=np.float32) / 255.0


def edges_of(intensity: np.ndarray, blur: float = 0.8) -> np.ndarray:
    """Normalised gradient magnitude of a softened intensity map, in [0, 1]."""
    soft = Image.fromarray((intensity * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(soft, dtype=np.float32) / 255.0
    gy, gx = np.gradient(arr)
    mag = np.hypot(gx, gy)
    return mag / (mag.max() + 1e-6)


def blur(rgb: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of an RGB float image in [0, 1]."""
    if radius <= 0:
        return rgb
    img = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(img, dtype=np.float32) / 255.0


def dilate(mask: np.ndarray, size: int = 3) -> np.ndarray:
    """Grey-level dilation (thicker lines)."""
    img = Image.fromarray((np.clip(mask, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(size))
    return np.asarray(img, dtype=np.float32) / 255.0
