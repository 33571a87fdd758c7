"""The registry of embedded benchmarks, by name.

A benchmark declares its classes, the domains of each split, its image size, where its items
come from and how many pictures each size preset holds per (domain, class). Builders and command
lines look names up here; nothing branches on a benchmark's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .classes import FASHION_CLASSES, ClassInfo
from .errors import UnknownNameError
from .sources import FASHION_FILES, load_fashion_mnist

SPLITS: tuple[str, ...] = ("client", "vendor")

#: An item source: split -> (items (N, 28, 28) uint8, labels (N,) int).
ItemSource = Callable[[str], tuple[np.ndarray, np.ndarray]]


def _fashion_items(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's training file for the vendor, its test file for the client."""
    return load_fashion_mnist(FASHION_FILES[split])


@dataclass(frozen=True)
class BenchmarkSpec:
    """Everything that defines one embedded benchmark."""

    name: str
    description: str
    classes: tuple[ClassInfo, ...]
    domains: dict[str, tuple[str, ...]]  # split -> domain names
    items: ItemSource
    image_size: int
    #: size preset -> split -> pictures per (domain, class)
    sizes: dict[str, dict[str, int]]

    #: split -> name of the item file it draws from (for provenance checks)
    source_names: dict[str, str] | None = None

    def source_name(self, split: str) -> str:
        return (self.source_names or {}).get(split, split)

    def domains_for(self, split: str) -> tuple[str, ...]:
        if split not in self.domains:
            raise UnknownNameError("split", split, tuple(self.domains))
        return self.domains[split]

    def per_class(self, size: str, split: str) -> int:
        if size not in self.sizes:
            raise UnknownNameError("size", size, tuple(self.sizes))
        return self.sizes[size][split]


BENCHMARKS: dict[str, BenchmarkSpec] = {spec.name: spec for spec in (
    BenchmarkSpec(
        name="fashion-domains",
        description="Fashion-MNIST items drawn in four visual domains (photo, cartoon, sketch, "
                    "negative); the vendor's private split adds pixel art and blueprint",
        classes=FASHION_CLASSES,
        domains={"client": ("photo", "cartoon", "sketch", "negative"),
                 "vendor": ("photo", "cartoon", "sketch", "negative", "pixel_art", "blueprint")},
        items=_fashion_items,
        image_size=64,
        source_names={split: f"fashion-mnist/{part}" for split, part in FASHION_FILES.items()},
        sizes={"full": {"client": 200, "vendor": 200},
               "small": {"client": 50, "vendor": 60},
               "tiny": {"client": 6, "vendor": 12}},
    ),
)}


def get_benchmark(name: str) -> BenchmarkSpec:
    """The registered benchmark ``name``, or :class:`UnknownNameError` listing the known ones."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise UnknownNameError("benchmark", name, tuple(BENCHMARKS)) from None
