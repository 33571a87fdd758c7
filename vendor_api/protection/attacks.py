"""The extraction attacks every protection mode is measured against (the vendor's red team).

Pure numpy on answers an attacker could buy; the tests and the attack measurements call these,
so a defence is always judged by the same attack code. Each function says what the attacker is
assumed to know.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def average_attack(answers: np.ndarray) -> np.ndarray:
    """Averaging: several answers believed to share one clean embedding (re-encodings, variants,
    near-duplicates), averaged and renormalised. Independent noise shrinks as 1/sqrt(n)."""
    return unit(np.asarray(answers, dtype=np.float64).mean(axis=0))


def invert_probabilities(answers: Sequence[tuple[Sequence[int], Sequence[float]]], class_rows: np.ndarray,
                         logit_scale: float) -> np.ndarray:
    """Inverting classification answers of one image to its embedding.

    Knows: the class prompt embeddings the vendor scored against (`class_rows`, e.g. bought
    through an unprotected key) and the logit scale (published in /v1/models). Each answer is
    (class indices into `class_rows`, probabilities) as returned. Two returned classes i, j give
    one linear equation, log p_i - log p_j = logit_scale * e . (t_i - t_j); zero (rounded-away)
    probabilities give none. Least squares over all answers, then normalised. With exact
    probabilities over enough classes this is the embedding itself.
    """
    class_rows = np.asarray(class_rows, dtype=np.float64)
    lhs, rhs = [], []
    for indices, probs in answers:
        kept = [(int(c), float(p)) for c, p in zip(indices, probs) if p > 0]
        if len(kept) < 2:
            continue
        c0, p0 = kept[0]
        for c, p in kept[1:]:
            lhs.append(logit_scale * (class_rows[c] - class_rows[c0]))
            rhs.append(np.log(p) - np.log(p0))
    if not lhs:
        return np.zeros(class_rows.shape[1])
    solution, *_ = np.linalg.lstsq(np.stack(lhs), np.asarray(rhs), rcond=None)
    return unit(solution)


def procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Sybil alignment: the orthogonal map W (source dim x target dim, W W^T = I) minimising
    ||source W - target|| over shared queries answered through two keys (orthogonal Procrustes,
    rectangular when the keys' dimensions differ)."""
    u, _, vt = np.linalg.svd(np.asarray(source, np.float64).T @ np.asarray(target, np.float64), full_matrices=False)
    return u @ vt


def mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(unit(a) * unit(b), axis=-1)))
