"""Keyed noise that is a function of what the model sees: a locality-sensitive hash of the clean
embedding under secret hyperplanes selects the noise.

Why not seed the noise by the request's bytes (the first version): two files with the same
pixels (another PNG `compress_level`, an added tEXt chunk) or two texts with the same tokens
(case, spacing) got independent noise, and averaging 64 of them recovered the clean embedding at
cosine 0.99. Keyed on the clean embedding itself, inputs the model cannot tell apart get the same
noise by construction, and near-duplicates (crops, recompressions, paraphrases) share most of it:

    z(e) = (1 / sqrt(L)) * sum_l g(key, modality, l, code_l(e)),   g ~ N(0, I / D)

`code_l(e)` is the sign pattern of `BITS` secret hyperplanes (table l) applied to the embedding
centred on the teacher's calibration mean for its modality, each plane thresholded at its median
over the calibration set, so every bit splits typical inputs in half (CLIP embeddings sit in a
narrow cone: planes through the origin would give nearly every input the same code, i.e. one
constant, learnable offset). `L` independent tables make the sharing gradual: two inputs share
the fraction of `g` terms whose tables agree, so an averaging attack over near-duplicates removes
only the part of the noise on which they disagree. `z` is still N(0, I/D), so `sigma` keeps its
meaning (cos(clean, noisy) ~ 1 / sqrt(1 + sigma^2)).

Inputs in the same cell of a table share that table's term. That is deliberate: noise that is
locally constant is a distortion a distilled student learns rather than averages out.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

from .base import keyed_rng

# Measured on pretrained encoders (benchmarks/results/protection_lsh.md): 16 tables of 3 bits let
# 15 JPEG/crop near-duplicates average to cos 0.695 with the clean embedding from 0.704 for one
# answer (8 x 4: 0.726; 4 x 8: 0.781; independent noise: 0.857), while unrelated images share
# 15% of their noise.
TABLES = 16
BITS = 3


@lru_cache(maxsize=256)
def _planes(secret: bytes, label: str, digest: str, modality: str, dim: int, tables: int, bits: int) -> np.ndarray:
    """The key's secret hyperplane normals for one modality: (tables * bits, dim)."""
    return keyed_rng(secret, "lsh-planes", label, digest, modality, str(dim), f"{tables}x{bits}").standard_normal(
        (tables * bits, dim))


@lru_cache(maxsize=16384)
def _cell_noise(secret: bytes, label: str, digest: str, modality: str, table: int, code: int, dim: int) -> np.ndarray:
    """One table cell's Gaussian term, N(0, I / dim); cached (a few hundred cells per key)."""
    vector = keyed_rng(secret, "lsh-noise", label, digest, modality, str(table), str(code), str(dim)).standard_normal(dim)
    vector.flags.writeable = False
    return vector / np.sqrt(dim)


def lsh_codes(clean: np.ndarray, modality: str, samples: np.ndarray, *, secret: bytes, label: str, digest: str,
              tables: int = TABLES, bits: int = BITS) -> np.ndarray:
    """(n, tables) cell ids of `clean` rows of one modality; `samples` are the calibration
    embeddings of that modality (they give the centre and each plane's median threshold)."""
    clean = np.asarray(clean, dtype=np.float64)
    samples = np.asarray(samples, dtype=np.float64)
    planes = _planes(secret, label, digest, modality, clean.shape[1], tables, bits)
    center = samples.mean(axis=0)
    thresholds = np.median((samples - center) @ planes.T, axis=0)
    signs = ((clean - center) @ planes.T > thresholds).reshape(len(clean), tables, bits)
    return (signs.astype(np.int64) << np.arange(bits)).sum(axis=2)


def lsh_noise(clean: np.ndarray, modalities: Sequence[str], calibration_samples: dict[str, np.ndarray], *,
              secret: bytes, label: str, digest: str, tables: int = TABLES, bits: int = BITS) -> np.ndarray:
    """One noise row per clean row, N(0, I/D), a function of (secret, key, modality, LSH cells of
    the clean embedding) only. `label` separates the modes (noise and b4b never share noise)."""
    if not secret:
        raise RuntimeError("protection secret missing: the service must resolve it before noisy modes run")
    clean = np.asarray(clean, dtype=np.float64)
    out = np.zeros_like(clean)
    if len(modalities) != len(clean):
        raise ValueError(f"{len(clean)} rows but {len(modalities)} modalities")
    kinds = np.asarray(modalities)
    for modality in sorted(set(modalities)):
        rows = np.flatnonzero(kinds == modality)
        codes = lsh_codes(clean[rows], modality, calibration_samples[modality], secret=secret, label=label,
                          digest=digest, tables=tables, bits=bits)
        for row, row_codes in zip(rows, codes):
            out[row] = sum(_cell_noise(secret, label, digest, modality, t, int(c), clean.shape[1])
                           for t, c in enumerate(row_codes))
    return out / np.sqrt(tables)
