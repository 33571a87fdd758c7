"""A picture grid of every domain x class, so a reader sees at a glance what the domains are."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .builder import iter_samples
from .registry import get_benchmark

_FONT_PATH = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu when Debian's fonts-dejavu is there, Pillow's built-in font otherwise."""
    try:
        return ImageFont.truetype(str(_FONT_PATH), size)
    except OSError:
        return ImageFont.load_default()


def picture_grid(name: str, out_png: Path, *, split: str = "client", seed: int = 0,
                 per_cell: int = 2, cell: int = 64) -> Path:
    """Write a PNG with one row per domain and ``per_cell`` pictures per class column."""
    spec = get_benchmark(name)
    domains = spec.domains_for(split)
    label_w, head_h, pad = 86, 30, 2
    cols = len(spec.classes) * per_cell
    width = label_w + cols * (cell + pad) + pad * 3 * len(spec.classes)
    height = head_h + len(domains) * (cell + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(11)
    col_w = per_cell * (cell + pad) + pad * 3
    for j, cls in enumerate(spec.classes):
        draw.text((label_w + j * col_w + 2, 8), cls.name, fill="black", font=font)
    for i, d in enumerate(domains):
        draw.text((4, head_h + i * (cell + pad) + cell // 2 - 6), d, fill="black", font=font)
    for s in iter_samples(name, split=split, seed=seed, per_class=per_cell):
        i, j = domains.index(s.domain), s.label
        x = label_w + j * col_w + s.index * (cell + pad)
        canvas.paste(s.image.resize((cell, cell), Image.NEAREST), (x, head_h + i * (cell + pad)))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png
