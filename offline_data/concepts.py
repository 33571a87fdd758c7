"""Held-out everyday-concept test sets: does a teacher know concepts it was never aligned on?

The demo teacher is aligned on fashion pictures and on the names of ImageNet's classes; these
sets ask it, by name only, about generic everyday concepts ("dog", "bus", "umbrella") in pictures
it has never seen in any form: real photos shipped with scikit-image, and emoji drawn from
Debian's Noto Color Emoji font (animals, vehicles, objects). Nothing here is used for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFont, ImageDraw

from .errors import InvalidArgumentError, MissingSourceError, UnknownNameError
from .seeding import rng_for
from .sources import photo_path

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")

#: (class name, source) pairs; for emoji the source is the character, for photos a photo reference.
ConceptRenderer = Callable[[str, np.random.Generator, int], Image.Image]


@dataclass(frozen=True)
class ConceptSet:
    """A named test set: class names, how to draw one picture of a class, and what it needs."""

    name: str
    description: str
    classes: tuple[tuple[str, str], ...]
    render: ConceptRenderer
    requires: str

    @property
    def class_names(self) -> list[str]:
        return [c for c, _ in self.classes]


def _augment(img: Image.Image, rng: np.random.Generator, size: int, bg: tuple[int, int, int]) -> Image.Image:
    """Random scale, rotation, position and flip on a plain canvas."""
    side = int(size * rng.uniform(0.6, 0.95))
    img = img.resize((side, side), Image.BICUBIC).rotate(float(rng.uniform(-15, 15)), Image.BICUBIC, expand=True)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    canvas = Image.new("RGB", (size, size), bg)
    w, h = img.size
    x = int(rng.integers(0, max(1, size - w + 1))) if w < size else (size - w) // 2
    y = int(rng.integers(0, max(1, size - h + 1))) if h < size else (size - h) // 2
    canvas.paste(img, (x, y), img if img.mode == "RGBA" else None)
    return canvas


def _emoji_font() -> ImageFont.FreeTypeFont:
    if not EMOJI_FONT.is_file():
        raise MissingSourceError(f"emoji font {EMOJI_FONT} missing: `apt-get install fonts-noto-color-emoji`")
    return ImageFont.truetype(str(EMOJI_FONT), 109)  # the only size the colour bitmaps come in


def _render_emoji(char: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One emoji, cropped to its ink, on a random light background."""
    font = _emoji_font()
    tile = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((10, 10), char, font=font, embedded_color=True)
    tile = tile.crop(tile.getbbox() or (0, 0, 160, 160))
    square = Image.new("RGBA", (max(tile.size),) * 2, (0, 0, 0, 0))
    square.paste(tile, ((square.width - tile.width) // 2, (square.height - tile.height) // 2))
    bg = tuple(int(v) for v in rng.integers(200, 256, 3))
    return _augment(square, rng, size, bg)


def _render_photo(ref: str, rng: np.random.Generator, size: int) -> Image.Image:
    """A random large crop of a packaged photo (at least 70% of its short side)."""
    with Image.open(photo_path(ref)) as im:
        photo = im.convert("RGB")
    w, h = photo.size
    side = int(min(w, h) * rng.uniform(0.7, 1.0))
    x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def _emoji_set(name: str, description: str, pairs: str) -> ConceptSet:
    classes = tuple((c.strip(), chr(int(h, 16))) for c, h in (p.split("=") for p in pairs.split(",")))
    return ConceptSet(name, description, classes, _render_emoji, "Debian fonts-noto-color-emoji")


CONCEPT_SETS: dict[str, ConceptSet] = {s.name: s for s in (
    ConceptSet("everyday-photos", "real photos shipped with scikit-image, 8 concepts",
               (("cat", "skimage:chelsea.png"), ("cup of coffee", "skimage:coffee.png"),
                ("rocket", "skimage:rocket.jpg"), ("astronaut", "skimage:astronaut.png"),
                ("motorcycle", "skimage:motorcycle_left.png"), ("horse", "skimage:horse.png"),
                ("clock", "skimage:clock_motion.png"), ("coins", "skimage:coins.png")),
               _render_photo, "scikit-image"),
    _emoji_set("emoji-animals", "20 animals drawn by the Noto Color Emoji font",
               "dog=1F415,cat=1F408,horse=1F40E,cow=1F404,pig=1F416,sheep=1F411,elephant=1F418,"
               "bird=1F426,fish=1F41F,snake=1F40D,turtle=1F422,rabbit=1F407,monkey=1F412,penguin=1F427,"
               "butterfly=1F98B,bee=1F41D,octopus=1F419,camel=1F42B,mouse=1F401,rooster=1F413"),
    _emoji_set("emoji-vehicles", "20 vehicles drawn by the Noto Color Emoji font",
               "car=1F697,bus=1F68C,locomotive=1F682,airplane=2708,bicycle=1F6B2,motorcycle=1F3CD,"
               "ship=1F6A2,sailboat=26F5,helicopter=1F681,rocket=1F680,truck=1F69A,tractor=1F69C,"
               "ambulance=1F691,fire engine=1F692,police car=1F693,taxi=1F695,kick scooter=1F6F4,"
               "canoe=1F6F6,racing car=1F3CE,tram=1F68B"),
    _emoji_set("emoji-objects", "20 everyday objects drawn by the Noto Color Emoji font",
               "umbrella=2602,guitar=1F3B8,alarm clock=23F0,laptop=1F4BB,telephone=260E,scissors=2702,"
               "key=1F511,light bulb=1F4A1,chair=1FA91,hammer=1F528,book=1F4D6,camera=1F4F7,"
               "television=1F4FA,balloon=1F388,basketball=1F3C0,pencil=270F,eyeglasses=1F453,"
               "backpack=1F392,bell=1F514,violin=1F3BB"),
)}


def concept_samples(name: str, *, seed: int = 0, per_class: int = 6,
                    size: int = 96) -> tuple[list[Image.Image], list[int], list[str]]:
    """Pictures, integer labels and class names of held-out concept set ``name``."""
    if name not in CONCEPT_SETS:
        raise UnknownNameError("concept set", name, tuple(CONCEPT_SETS))
    if per_class < 1:
        raise InvalidArgumentError(f"per_class must be positive, got {per_class}")
    spec = CONCEPT_SETS[name]
    images, labels = [], []
    for label, (cls, source) in enumerate(spec.classes):
        rng = rng_for(seed, "concepts", name, cls)
        for _ in range(per_class):
            images.append(spec.render(source, rng, size))
            labels.append(label)
    return images, labels, spec.class_names
