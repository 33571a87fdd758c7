"""Stable, order-independent random streams.

Each (seed, split, domain, class) cell gets its own generator derived from the names, not from a
running counter, so the images of one cell do not change when another cell's size changes, and a
build is bit-for-bit reproducible for a seed on any machine (Python's ``hash`` is salted per
process, so names are hashed with CRC32 instead).
"""

from __future__ import annotations

import zlib

import numpy as np


def stable_int(*parts: object) -> int:
    """A 32-bit integer that depends only on the text of ``parts``."""
    return zlib.crc32("\x1f".join(str(p) for p in parts).encode("utf-8"))


def rng_for(seed: int, *names: object) -> np.random.Generator:
    """A generator for one named cell of a seeded build."""
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stable_int(*names)]))
