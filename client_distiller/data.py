"""DomainBed-layout datasets: ``root/<domain>/<class>/<image>``, split and served as DomainBed does.

This is how the client reads any multi-domain benchmark, the embedded offline one or PACS/VLCS/
OfficeHome/TerraIncognita/DomainNet on disk. What it provides, for ERM and VL2V-ADiP alike:

- :class:`DomainBedFolder` - scans the folders once: domains, classes, files per domain;
- :func:`in_out_split` - each domain's seeded 80/20 in/out split (out = model-selection data);
- :func:`leave_one_out` - the sources' in/out splits and the held-out target domain;
- :func:`train_transform` / :func:`eval_transform` - DomainBed's augmentation for source
  training, a plain resize for everything else (batched tensor transforms, :mod:`client_distiller.training.augment`);
- :class:`ImageListDataset` - a torch dataset over (path, label) pairs, optionally held in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from client_distiller.errors import UsageError
from client_distiller.training.augment import EvalTransform, TrainTransform

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
MANIFEST = "benchmark.json"
OFFLINE_BENCHMARK = "fashion-domains"  # the embedded default every command builds when no --data is given


class DatasetLayoutError(UsageError):
    """The folder is not a DomainBed layout (missing, no domains, no classes, no images)."""


@dataclass(frozen=True)
class DomainBedFolder:
    """The files of a DomainBed-layout dataset, scanned once, in a stable sorted order."""

    root: Path
    domains: tuple[str, ...]
    classes: tuple[str, ...]
    files: dict[str, tuple[tuple[Path, int], ...]]  # domain -> ((path, label), ...)

    @classmethod
    def scan(cls, root: Path | str) -> "DomainBedFolder":
        """Read ``root``; classes are the union of class folders over domains (sorted)."""
        root = Path(root)
        if not root.is_dir():
            raise DatasetLayoutError(f"dataset folder {root} does not exist")
        domain_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not domain_dirs:
            raise DatasetLayoutError(f"{root} has no domain folders (expected root/<domain>/<class>/<image>)")
        classes = sorted({c.name for d in domain_dirs for c in d.iterdir() if c.is_dir()})
        if not classes:
            raise DatasetLayoutError(f"{root} has no class folders (expected root/<domain>/<class>/<image>)")
        index = {c: i for i, c in enumerate(classes)}
        files: dict[str, tuple[tuple[Path, int], ...]] = {}
        for d in domain_dirs:
            items = [(f, index[c.name]) for c in sorted(d.iterdir()) if c.is_dir()
                     for f in sorted(c.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
            if items:
                files[d.name] = tuple(items)
        if not files:
            raise DatasetLayoutError(f"{root} has no images")
        return cls(root, tuple(files), tuple(classes), files)

    @property
    def class_names(self) -> list[str]:
        """Natural-language class names for prompts: the manifest's if present, else folder names."""
        manifest = self.root / MANIFEST
        if manifest.is_file():
            meta = json.loads(manifest.read_text())
            names = dict(zip(meta.get("classes", []), meta.get("class_names", [])))
            if all(c in names for c in self.classes):
                return [names[c] for c in self.classes]
        return [c.replace("_", " ") for c in self.classes]

    def domain_index(self, domain: str) -> int:
        if domain not in self.domains:
            raise DatasetLayoutError(f"unknown domain {domain!r}; {self.root} has: {', '.join(self.domains)}")
        return self.domains.index(domain)


@dataclass(frozen=True)
class DomainSplit:
    """One domain's in (train) and out (validation) halves."""

    domain: str
    train: tuple[tuple[Path, int], ...]
    val: tuple[tuple[Path, int], ...]


def in_out_split(data: DomainBedFolder, domain: str, *, seed: int = 0, holdout: float = 0.2) -> DomainSplit:
    """DomainBed's per-domain seeded shuffle: ``holdout`` of the domain goes to ``val``."""
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1), got {holdout}")
    items = data.files[domain]
    perm = np.random.default_rng([seed, data.domain_index(domain)]).permutation(len(items))
    n_out = int(round(len(items) * holdout))
    return DomainSplit(domain, tuple(items[i] for i in perm[n_out:]), tuple(items[i] for i in perm[:n_out]))


@dataclass(frozen=True)
class LeaveOneOut:
    """Source domains (each split in/out) and the held-out target domain (all of it)."""

    target: str
    sources: tuple[DomainSplit, ...]
    test: tuple[tuple[Path, int], ...]


def leave_one_out(data: DomainBedFolder, target: str, *, seed: int = 0, holdout: float = 0.2) -> LeaveOneOut:
    """The DomainBed protocol for one test domain."""
    data.domain_index(target)
    sources = tuple(in_out_split(data, d, seed=seed, holdout=holdout) for d in data.domains if d != target)
    return LeaveOneOut(target, sources, data.files[target])


def train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> TrainTransform:
    """DomainBed training augmentation: resized crop 0.7-1, flip, colour jitter 0.3, grayscale
    (on uint8 tensor batches; see :mod:`client_distiller.training.augment`)."""
    return TrainTransform(int(size), tuple(mean), tuple(std))


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> EvalTransform:
    """Evaluation: resize to ``size`` x ``size`` and normalise."""
    return EvalTransform(int(size), tuple(mean), tuple(std))


class ImageListDataset(Dataset):
    """(path, label) pairs as a torch dataset; ``preload`` keeps decoded images in memory.

    Preloading pays when the same small images are read for thousands of steps on a CPU.
    """

    def __init__(self, items: Sequence[tuple[Path, int]], transform: Callable[[Image.Image], torch.Tensor] | None = None,
                 *, preload: bool = False) -> None:
        self.items = list(items)
        self.transform = transform
        self._cache = [self._open(p) for p, _ in self.items] if preload else None

    @staticmethod
    def _open(path: Path) -> Image.Image:
        with Image.open(path) as im:
            return im.convert("RGB")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | Image.Image, int]:
        image = self._cache[i] if self._cache is not None else self._open(self.items[i][0])
        return (self.transform(image) if self.transform else image), self.items[i][1]

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.items]
