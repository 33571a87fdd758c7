"""Visual domains: each turns a grey 28 x 28 Fashion-MNIST item into a 64 x 64 RGB picture.

A domain is a renderer plus the caption templates that describe its pictures. The client's
benchmark uses four domains that differ in colour statistics, texture, polarity and geometry
(photo-textured, cartoon, pencil sketch, photographic negative); the vendor's private split adds
two more (pixel art, blueprint) so the demo teacher sees more styles than any client task needs,
as a real foundation model would. Registered in :data:`DOMAINS`; adding one is adding an entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from .geometry import alpha_of, blur, dilate, edges_of, place
from .palette import COLOURS, PASTELS, pick
from .sources import BackgroundPool

#: A renderer: (item, rng, background pool, size) -> (RGB float image in [0, 1], attributes).
Renderer = Callable[[np.ndarray, np.random.Generator, BackgroundPool, int], tuple[np.ndarray, dict[str, str]]]


@dataclass(frozen=True)
class Domain:
    """One visual domain: how to draw it and how to describe a drawing of it."""

    name: str
    description: str
    render: Renderer
    #: Caption templates; ``{c}`` is a class word, ``{colour}`` / ``{bg}`` come from the attributes.
    captions: tuple[str, ...]
    #: The single prompt used when scoring this domain zero-shot with "style-aware" prompts.
    style_prompt: str = "a photo of a {c}"
    attributes: tuple[str, ...] = field(default=())


def _photo(item, rng, pool, size):
    """A coloured item, shaded by its own intensity, on a blurred crop of a natural photo."""
    bg = blur(pool.crop(rng, size), float(rng.uniform(0.0, 1.2)))
    inten = place(item, rng, size, scale=(0.65, 0.95), rotate=15)
    alpha = alpha_of(inten)[..., None]
    colour_name, rgb = pick(rng, COLOURS)
    shade = (0.35 + 0.8 * inten)[..., None]
    fabric = rgb[None, None, :] * shade + rng.normal(0, 0.03, (size, size, 1)).astype(np.float32)
    out = alpha * np.clip(fabric, 0, 1) + (1 - alpha) * bg
    out += rng.normal(0, 0.015, out.shape).astype(np.float32)  # sensor noise
    return out, {"colour": colour_name}


def _cartoon(item, rng, pool, size):
    """Flat posterised colour with a thick black outline on a plain, striped or dotted pastel."""
    bg_name, bg_rgb = pick(rng, PASTELS, jitter=0.02)
    yy, xx = np.mgrid[0:size, 0:size]
    pattern = int(rng.integers(3))
    period = int(rng.integers(6, 12))
    if pattern == 1:
        motif = ((xx + yy) // (period // 2)) % 2 == 0
    elif pattern == 2:
        motif = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 4) ** 2
    else:
        motif = np.zeros((size, size), bool)
    bg = np.broadcast_to(bg_rgb, (size, size, 3)).copy()
    bg[motif] *= 0.9
    inten = place(item, rng, size, scale=(0.6, 0.95), rotate=10)
    alpha = alpha_of(inten)
    colour_name, rgb = pick(rng, COLOURS, jitter=0.02, exclude=("grey",))
    tones = np.where(inten > 0.55, 1.0, np.where(inten > 0.25, 0.8, 0.6)).astype(np.float32)
    fill = rgb[None, None, :] * tones[..., None]
    outline = np.clip(dilate(edges_of(alpha, blur=0.5), 3) * 2.5, 0, 1)[..., None]
    out = alpha[..., None] * fill + (1 - alpha[..., None]) * bg
    out = out * (1 - outline) + 0.05 * outline
    return out, {"colour": colour_name, "bg": bg_name}


def _sketch(item, rng, pool, size):
    """Graphite contour lines and sparse hatching on slightly noisy off-white paper."""
    inten = place(item, rng, size, scale=(0.6, 0.95), rotate=20)
    alpha = alpha_of(inten)
    lines = np.clip(edges_of(inten, blur=float(rng.uniform(0.5, 1.0))) * rng.uniform(1.8, 3.0), 0, 1)
    yy, xx = np.mgrid[0:size, 0:size]
    period = int(rng.integers(3, 6))
    hatch = (((xx + yy * int(rng.choice([-1, 1]))) % period) == 0) & (inten > rng.uniform(0.3, 0.7))
    lines = np.maximum(lines, hatch * alpha * rng.uniform(0.2, 0.5))
    paper = float(rng.uniform(0.86, 0.98)) + rng.normal(0, 0.02, (size, size)).astype(np.float32)
    tint = np.array([1.0, 0.99, 0.95], np.float32)
    ink = float(rng.uniform(0.1, 0.35))
    grey = paper * (1 - lines) + ink * lines
    return grey[..., None] * tint[None, None, :], {}


def _negative(item, rng, pool, size):
    """A greyscale photo of the item, inverted; items are turned and shrunk much more than elsewhere."""
    bg = pool.crop(rng, size).mean(axis=2) * float(rng.uniform(0.3, 0.7))
    inten = place(item, rng, size, scale=(0.4, 1.0), rotate=60)
    alpha = alpha_of(inten)
    tone = float(rng.uniform(0.6, 1.0))
    grey = alpha * np.clip((0.25 + 0.8 * inten) * tone, 0, 1) + (1 - alpha) * bg
    neg = 1.0 - grey
    return np.repeat(neg[..., None], 3, axis=2), {}


def _pixel_art(item, rng, pool, size):
    """Blocky low-resolution pixel art with a few palette colours (vendor-only style)."""
    inten = place(item, rng, size, scale=(0.7, 0.95), rotate=8)
    cells = int(rng.choice([12, 16, 20]))
    small = np.asarray(Image.fromarray((inten * 255).astype(np.uint8)).resize((cells, cells), Image.BOX),
                       np.float32) / 255.0
    colour_name, rgb = pick(rng, COLOURS, jitter=0.0, exclude=("grey", "black"))
    _, bg_rgb = pick(rng, PASTELS, jitter=0.0)
    level = np.digitize(small, [0.15, 0.45, 0.75])
    shades = np.stack([bg_rgb, rgb * 0.55, rgb * 0.8, rgb], 0)
    img = shades[level]
    big = Image.fromarray((img * 255).astype(np.uint8)).resize((size, size), Image.NEAREST)
    return np.asarray(big, np.float32) / 255.0, {"colour": colour_name}


def _blueprint(item, rng, pool, size):
    """White technical contour lines on a blue grid (vendor-only style)."""
    inten = place(item, rng, size, scale=(0.6, 0.95), rotate=25)
    lines = np.clip(edges_of(inten, blur=0.6) * 2.5, 0, 1)
    yy, xx = np.mgrid[0:size, 0:size]
    grid = ((xx % 8 == 0) | (yy % 8 == 0)).astype(np.float32) * 0.25
    blue = np.array([0.08, 0.22, 0.55], np.float32) + rng.normal(0, 0.03, 3).astype(np.float32)
    ink = np.maximum(lines, grid)[..., None]
    return (1 - ink) * blue[None, None, :] + ink * 0.95, {}


DOMAINS: dict[str, Domain] = {d.name: d for d in (
    Domain("photo", "coloured item on a blurred crop of a natural photo", _photo,
           ("a photo of a {c} on a patterned background", "a photo of a {colour} {c}",
            "a {colour} {c} photographed on a textured background", "a close-up photo of a {c}"),
           style_prompt="a photo of a {c}"),
    Domain("cartoon", "flat posterised colour, thick outline, pastel background", _cartoon,
           ("a cartoon drawing of a {c}", "a colourful clip art {c}", "a cartoon of a {colour} {c}",
            "a cartoon {c} on a {bg} background"),
           style_prompt="a cartoon drawing of a {c}"),
    Domain("sketch", "graphite contour and hatching on off-white paper", _sketch,
           ("a pencil sketch of a {c}", "a black and white line drawing of a {c}",
            "a hand-drawn sketch of a {c}", "a pencil drawing of a {c} on paper"),
           style_prompt="a pencil sketch of a {c}"),
    Domain("negative", "inverted greyscale photo, strongly turned and rescaled", _negative,
           ("a negative image of a {c}", "an inverted black and white photo of a {c}",
            "a photographic negative of a {c}", "a rotated negative photo of a {c}"),
           style_prompt="a negative image of a {c}"),
    Domain("pixel_art", "blocky low-resolution palette art", _pixel_art,
           ("a pixel art {c}", "a pixelated {colour} {c}", "an 8-bit video game sprite of a {c}"),
           style_prompt="a pixel art {c}"),
    Domain("blueprint", "white contour lines on a blue grid", _blueprint,
           ("a blueprint drawing of a {c}", "a technical drawing of a {c} on blue paper",
            "white lines of a {c} on a blueprint"),
           style_prompt="a blueprint drawing of a {c}"),
)}


def render(domain: str, item: np.ndarray, rng: np.random.Generator, pool: BackgroundPool,
           size: int) -> tuple[Image.Image, dict[str, str]]:
    """Render one item in one domain as an 8-bit RGB PIL image plus its caption attributes."""
    arr, attrs = DOMAINS[domain].render(item, rng, pool, size)
    return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB"), attrs
