"""Raw material that installs from package registries: Fashion-MNIST and natural photos.

Nothing here downloads anything. Fashion-MNIST comes from Debian's ``dataset-fashion-mnist``
(MIT; ``/usr/share/datasets/fashion-mnist``, or ``$FASHION_MNIST_DIR``); photos come from
scikit-image's bundled sample images and scikit-learn's two sample photos. A missing source raises
:class:`MissingSourceError` with the install command, never a bare ``FileNotFoundError``.

The vendor and the client draw from disjoint pools: the vendor's items are Fashion-MNIST's
training file and its backgrounds one half of the photos, the client's items are the test file
and its backgrounds the other half. The split is fixed, not seeded, so no seed can make them meet.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import MissingSourceError

FASHION_MNIST_ENV = "FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT = Path("/usr/share/datasets/fashion-mnist")

#: Which Fashion-MNIST file feeds which split: fixed, so vendor and client never share an item.
FASHION_FILES: dict[str, str] = {"vendor": "train", "client": "t10k"}

#: Background photos per split (disjoint). ``skimage:`` files ship inside scikit-image,
#: ``sklearn:`` files inside scikit-learn. None of them is used by the held-out concept sets.
BACKGROUND_PHOTOS: dict[str, tuple[str, ...]] = {
    "vendor": ("skimage:brick.png", "skimage:gravel.png", "skimage:hubble_deep_field.jpg",
               "skimage:ihc.png", "sklearn:china.jpg", "skimage:cell.png"),
    "client": ("skimage:grass.png", "skimage:retina.jpg", "sklearn:flower.jpg",
               "skimage:page.png", "skimage:coins.png", "skimage:moon.png"),
}


def fashion_mnist_dir() -> Path:
    """Where Fashion-MNIST's IDX files are expected."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT)


def _read_idx(path: Path) -> np.ndarray:
    """Parse one gzipped IDX file (the MNIST family's format) into a uint8 array."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@lru_cache(maxsize=4)
def load_fashion_mnist(part: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) of Fashion-MNIST's ``train`` or ``t10k`` file."""
    root = fashion_mnist_dir()
    images, labels = root / f"{part}-images-idx3-ubyte.gz", root / f"{part}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise MissingSourceError(
            f"Fashion-MNIST not found in {root}: install it with "
            f"`apt-get install dataset-fashion-mnist` or set {FASHION_MNIST_ENV}")
    return _read_idx(images), _read_idx(labels)


def _package_dir(package: str) -> Path:
    """The data folder of scikit-image or scikit-learn, or a one-line install hint."""
    try:
        if package == "skimage":
            import skimage
            return Path(skimage.__file__).parent / "data"
        if package == "sklearn":
            import sklearn
            return Path(sklearn.__file__).parent / "datasets" / "images"
    except ImportError as exc:
        pip_name = {"skimage": "scikit-image", "sklearn": "scikit-learn"}[package]
        raise MissingSourceError(f"{pip_name} is not installed: `pip install {pip_name}`") from exc
    raise MissingSourceError(f"no photo package {package!r}")


def photo_path(ref: str) -> Path:
    """Resolve a ``package:file`` photo reference to a file on disk."""
    package, _, name = ref.partition(":")
    path = _package_dir(package) / name
    if not path.is_file():
        raise MissingSourceError(f"photo {name} missing from the installed {package} package")
    return path


@lru_cache(maxsize=64)
def load_photo(ref: str) -> np.ndarray:
    """An RGB uint8 array of one packaged photo (grey photos are repeated to three channels)."""
    with Image.open(photo_path(ref)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


@dataclass(frozen=True)
class BackgroundPool:
    """The photos one split may cut backgrounds from."""

    photos: tuple[np.ndarray, ...]

    @classmethod
    def for_split(cls, split: str) -> "BackgroundPool":
        return cls(tuple(load_photo(ref) for ref in BACKGROUND_PHOTOS[split]))

    def crop(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """A random crop (random photo, position, scale, flip) resized to ``size`` x ``size``."""
        photo = self.photos[int(rng.integers(len(self.photos)))]
        h, w = photo.shape[:2]
        side = int(rng.integers(max(16, min(h, w) // 6), min(h, w) // 2 + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        patch = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BILINEAR)
        out = np.asarray(patch, dtype=np.float32) / 255.0
        return out[:, ::-1] if rng.random() < 0.5 else out
