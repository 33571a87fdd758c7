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


def project_out(rows: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Rows with the span of `directions` (orthonormal rows) removed, renormalised."""
    rows = np.asarray(rows, dtype=np.float64)
    directions = np.asarray(directions, dtype=np.float64).reshape(-1, rows.shape[1])
    return unit(rows - (rows @ directions.T) @ directions)


def cse_directions(answers: np.ndarray, reference: np.ndarray, *, directions: int = 4, clusters: int = 10,
                   pair_share: float = 0.05, seed: int = 0) -> np.ndarray:
    """WARDEN's CSE watermark removal (ACL 2024), its directions: (directions, dim) orthonormal rows.

    Knows: the answers it bought (`answers`) and its own encoder's embeddings of the same inputs
    (`reference`, any model: only its similarities are used). Clustering: k-means on the answers.
    Selection: within each cluster, the `pair_share` of pairs whose standardised similarity differs
    most between the answers and the reference (a watermark pulls triggered inputs toward a target,
    so their similarities in the answers stop matching what the inputs look like). Elimination
    (`project_out`): the top principal directions of those pairs' answer differences."""
    from scipy.cluster.vq import kmeans2

    answers, reference = unit(answers), unit(reference)
    _, labels = kmeans2(answers, clusters, seed=seed, minit="++")
    differences = []
    for cluster in range(clusters):
        members = np.flatnonzero(labels == cluster)
        if len(members) < 3:
            continue
        i, j = np.triu_indices(len(members), 1)
        a, r = (answers[members] @ answers[members].T)[i, j], (reference[members] @ reference[members].T)[i, j]
        z = lambda v: (v - v.mean()) / (v.std() + 1e-12)  # noqa: E731
        top = np.argsort(-np.abs(z(a) - z(r)))[: max(1, int(pair_share * len(a)))]
        differences.append(answers[members[i[top]]] - answers[members[j[top]]])
    _, _, vt = np.linalg.svd(np.concatenate(differences), full_matrices=False)
    return vt[:directions]
