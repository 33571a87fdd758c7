"""Named colours: renderers paint with them and captions say them ("a red sneaker").

Naming the colour that was really used is what makes the vendor's captions richer than bare class
prompts while staying true to the picture.
"""

from __future__ import annotations

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12), "orange": (0.95, 0.55, 0.10), "yellow": (0.95, 0.85, 0.15),
    "green": (0.15, 0.65, 0.20), "blue": (0.15, 0.35, 0.85), "purple": (0.55, 0.20, 0.70),
    "pink": (0.95, 0.50, 0.70), "brown": (0.50, 0.30, 0.15), "white": (0.95, 0.95, 0.95),
    "black": (0.12, 0.12, 0.12), "grey": (0.55, 0.55, 0.55), "teal": (0.10, 0.60, 0.60),
}

PASTELS: dict[str, tuple[float, float, float]] = {
    "light blue": (0.75, 0.88, 0.98), "mint": (0.78, 0.95, 0.82), "cream": (0.98, 0.95, 0.80),
    "lavender": (0.88, 0.82, 0.97), "peach": (0.99, 0.85, 0.75), "pale pink": (0.98, 0.82, 0.88),
}


def pick(rng: np.random.Generator, table: dict[str, tuple[float, float, float]],
         jitter: float = 0.06, exclude: tuple[str, ...] = ()) -> tuple[str, np.ndarray]:
    """A colour name and its RGB value with a little random jitter."""
    names = [n for n in table if n not in exclude]
    name = names[int(rng.integers(len(names)))]
    rgb = np.clip(np.array(table[name], dtype=np.float32) + rng.normal(0, jitter, 3), 0, 1)
    return name, rgb.astype(np.float32)
