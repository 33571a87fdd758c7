"""The extraction attacks every protection mode is measured against (the vendor's red team).

Pure numpy on answers an attacker could buy; the tests and the attack measurements call these,
so a defence is always judged by the same attack code. Each function says what the attacker is
assumed to know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

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
    """Inverting classification answers of one image to its embedding: plain least squares (the
    naive attacker, kept as the baseline; `invert_classifications` is the strong one).

    Knows: the class prompt embeddings the vendor scored against (`class_rows`, e.g. bought
    through an unprotected key) and the logit scale (published in /v1/models). Each answer is
    (class indices into `class_rows`, probabilities) as returned. Two returned classes i, j give
    one linear equation, log p_i - log p_j = logit_scale * e . (t_i - t_j); zero (rounded-away)
    probabilities give none. Least squares over all answers, then normalised. With exact
    probabilities over enough classes this is the embedding itself.

    Why it fails on rounded answers: the equations only see e along the span of the prompt
    differences t_i - t_j. The minimum-norm solution sets every other component to 0, and CLIP
    embeddings share a large common component that lies mostly outside that span (prompts agree
    with each other along it), so one 5-class answer inverts to a vector nearly orthogonal to the
    image. With many class lists the span is full but badly conditioned (the tiny teacher's
    prompt differences have singular values down to 1e-7 of the largest), and least squares
    without regularisation amplifies the 3-decimal rounding error along those directions until
    it dominates: 25 lists x 6 classes inverted to cos ~0.01, below one query's ~0.18.
    """
    class_rows = np.asarray(class_rows, dtype=np.float64)
    lhs, rhs = [], []
    for indices, probs, *_ in answers:
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


# Relative precision of an unrounded answer: the vendor scores float32 embeddings, so an "exact"
# probability is still only good to ~1e-7 of itself.
_FLOAT_PRECISION = 1e-7


def _rounding_variance(decimals: int | None) -> float:
    """Variance of one probability's error: uniform rounding to 10^-decimals (step^2 / 12), plus
    float32 scoring noise."""
    step = 0.0 if decimals is None or decimals >= 17 else 10.0 ** -decimals
    return step ** 2 / 12 + _FLOAT_PRECISION ** 2


def classification_equations(answers: Sequence[Sequence[Any]], class_rows: np.ndarray, logit_scale: float, *,
                             decimals: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The linear equations classification answers of one image give about its embedding e, each
    with its weight (inverse error variance): rows A, right-hand side y, weights w, so that
    A e ~ y with error variance 1 / w.

    Each answer is (returned class indices, their probabilities[, the class indices asked]). Within
    one answer log p_c = logit_scale * e . t_c - log Z: the unknown normaliser log Z is profiled
    out by centring each answer's rows and logs on their weighted mean (exact for weighted least
    squares). A probability q rounded to 10^-decimals has log error variance ~ step^2 / 12 / q^2:
    small probabilities say little, rounded-away ones (q = 0) nothing. When the list asked holds
    exactly one class more than came back (ask top_k + 1 classes), its probability is 1 - the sum
    of the returned ones (rounding errors add up: k times the variance), so every class of the
    list gives an equation."""
    class_rows = np.asarray(class_rows, dtype=np.float64)
    base = _rounding_variance(decimals)
    step = 0.0 if decimals is None or decimals >= 17 else 10.0 ** -decimals
    rows, lhs, weights = [], [], []
    for answer in answers:
        indices, probs = [int(c) for c in answer[0]], [float(p) for p in answer[1]]
        observed = [(c, p, base) for c, p in zip(indices, probs) if p > 0]
        if len(answer) > 2:
            missing = [int(c) for c in answer[2] if int(c) not in set(indices)]
            rest = 1.0 - sum(probs)
            if len(missing) == 1 and rest > 2 * len(indices) * max(step, _FLOAT_PRECISION):
                observed.append((missing[0], rest, len(indices) * base))
        if len(observed) < 2:
            continue
        classes = np.array([c for c, _, _ in observed])
        p = np.array([q for _, q, _ in observed])
        w = p ** 2 / np.array([v for _, _, v in observed])
        t = logit_scale * class_rows[classes]
        y = np.log(p)
        rows.append(t - (w[:, None] * t).sum(axis=0) / w.sum())
        lhs.append(y - (w * y).sum() / w.sum())
        weights.append(w)
    if not rows:
        dim = class_rows.shape[1]
        return np.zeros((0, dim)), np.zeros(0), np.zeros(0)
    return np.concatenate(rows), np.concatenate(lhs), np.concatenate(weights)


@dataclass(frozen=True)
class EmbeddingPrior:
    """What the attacker believes about an image embedding before asking: Gaussian, mean and
    covariance. `fit` estimates them from clean embeddings of images the attacker owns (a few
    dozen, bought through any embedding key: CLIP image embeddings share a large common component,
    cos ~0.5 between unrelated images on real models, ~0.98 on the tiny test teacher)."""

    mean: np.ndarray
    cov: np.ndarray

    @classmethod
    def fit(cls, rows: np.ndarray, folds: int = 4) -> "EmbeddingPrior":
        """Mean and covariance of `rows`, the covariance shrunk toward a scaled identity (fewer
        images than dimensions leave it singular): (1 - a) S + a tr(S)/D I, with a chosen by
        `folds`-fold cross-validation of the Gaussian log-likelihood of held-out rows (on the
        tiny teacher it picks a ~0.03; Ledoit-Wolf's formula gave 0.15, which inverted worse)."""
        rows = np.asarray(rows, dtype=np.float64)
        grid = np.logspace(-4, 0, 17)

        def shrunk(train: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
            mean = train.mean(axis=0)
            sample = np.cov((train - mean).T, bias=True)
            return mean, (1 - a) * sample + a * np.trace(sample) / rows.shape[1] * np.eye(rows.shape[1])

        def held_out(a: float) -> float:
            total = 0.0
            for fold in range(folds):
                test = rows[fold::folds]
                mean, cov = shrunk(np.delete(rows, np.s_[fold::folds], axis=0), a)
                d = test - mean
                total -= 0.5 * (len(test) * np.linalg.slogdet(cov)[1]
                                + float(np.einsum("ij,ij->", d @ np.linalg.inv(cov), d)))
            return total

        best = max(grid, key=held_out) if len(rows) >= 2 * folds else 1.0
        return cls(*shrunk(rows, float(best)))

    @classmethod
    def isotropic(cls, dim: int, mean: np.ndarray | None = None, variance: float = 1.0) -> "EmbeddingPrior":
        return cls(np.zeros(dim) if mean is None else np.asarray(mean, np.float64), variance * np.eye(dim))


def _ridge(a: np.ndarray, y: np.ndarray, w: np.ndarray, prior: EmbeddingPrior,
           strength: float | None) -> tuple[np.ndarray, float]:
    """argmin_e sum w (A e - y)^2 + strength (e - m)^T C^-1 (e - m), in whitened coordinates
    e = m + L z (C = L L^T), by SVD; strength None: chosen by generalised cross-validation
    (the closed-form leave-one-out estimate of prediction error)."""
    factor = np.linalg.cholesky(prior.cov + 1e-12 * np.trace(prior.cov) * np.eye(len(prior.cov)))
    sw = np.sqrt(w)
    b = (sw[:, None] * a) @ factor
    r = sw * (y - a @ prior.mean)
    if len(r) == 0:
        return prior.mean.copy(), 1.0 if strength is None else strength
    if strength is not None:  # normal equations: a (dim x dim) solve, far cheaper than an SVD
        z = np.linalg.solve(b.T @ b + strength * np.eye(b.shape[1]), b.T @ r)
        return prior.mean + factor @ z, strength
    u, s, vt = np.linalg.svd(b, full_matrices=False)
    ur = u.T @ r
    outside = max(float(r @ r - ur @ ur), 0.0)
    best = (np.inf, 1.0)
    for candidate in np.logspace(-16, 4, 81) * s[0] ** 2:
        f = s ** 2 / (s ** 2 + candidate)
        gcv = (float(np.sum(((1 - f) * ur) ** 2)) + outside) / max(len(r) - f.sum(), 1e-3) ** 2
        best = min(best, (gcv, float(candidate)))
    strength = best[1]
    z = vt.T @ (s * ur / (s ** 2 + strength))
    return prior.mean + factor @ z, strength


def invert_classifications(answers: Sequence[Sequence[Any]], class_rows: np.ndarray, logit_scale: float, *,
                           decimals: int | None = None, prior: EmbeddingPrior | None = None,
                           strength: float | None = None) -> np.ndarray:
    """The strong inversion of one image's classification answers to its embedding (unit norm).

    Knows what `invert_probabilities` knows, plus the vendor's rounding (`decimals`, published in
    the answers' precision) and, optionally, a `prior` over image embeddings (`EmbeddingPrior.fit`
    on clean embeddings of its own images). Solves the weighted equations of
    `classification_equations` (rounding error per probability, normaliser profiled out, the
    unreturned class of a top_k + 1 list recovered) with Tikhonov regularisation toward the prior
    mean, shaped by the prior covariance: the maximum a posteriori embedding when `strength` is 1
    (the weights are the errors' true inverse variances, so no tuning is needed; the default with
    a prior). Without a prior: ridge toward 0 with the strength chosen by generalised
    cross-validation (`strength` None), the attacker who owns no clean image embedding.
    Directions the equations do not pin down are filled from the prior, not set to 0."""
    class_rows = np.asarray(class_rows, dtype=np.float64)
    a, y, w = classification_equations(answers, class_rows, logit_scale, decimals=decimals)
    if prior is None:
        prior = EmbeddingPrior.isotropic(class_rows.shape[1])
    elif strength is None:
        strength = 1.0
    estimate, _ = _ridge(a, y, w, prior, strength)
    return unit(estimate)


class AdaptiveInversion:
    """The adaptive attacker on one image: chooses each next class list to be most informative
    given what the earlier answers said, then inverts all answers (`invert_classifications`).

    Knows: the prompt embeddings of a pool of class names it may ask (`class_rows`), the logit
    scale, the rounding, the number of classes an answer returns (`top_k`, in /v1/models), and a
    prior. Each list has top_k + 1 classes (so the one not returned is 1 - the others). The list
    is built greedily for A-optimal design: starting from a random class, add the class that most
    reduces the trace of the posterior covariance of e (the expected squared error), under the
    linearised model: the current estimate predicts each listed class's probability and so each
    equation's rounding weight. Lists whose classes the estimate puts near one another are
    favoured (their probabilities are large and precise); a class the image plainly dominates
    makes the others' probabilities small and imprecise, so it is avoided."""

    def __init__(self, class_rows: np.ndarray, logit_scale: float, *, top_k: int, decimals: int | None,
                 prior: EmbeddingPrior, seed: int = 0) -> None:
        self.class_rows = np.asarray(class_rows, dtype=np.float64)
        self.logit_scale, self.top_k, self.decimals, self.prior = logit_scale, top_k, decimals, prior
        self.answers: list[tuple[list[int], list[float], list[int]]] = []
        self.rng = np.random.default_rng(seed)
        self._precision_prior = np.linalg.inv(prior.cov)

    def estimate(self, unit_norm: bool = True) -> np.ndarray:
        a, y, w = classification_equations(self.answers, self.class_rows, self.logit_scale, decimals=self.decimals)
        estimate, _ = _ridge(a, y, w, self.prior, 1.0)
        return unit(estimate) if unit_norm else estimate

    def posterior_cov(self) -> np.ndarray:
        a, _, w = classification_equations(self.answers, self.class_rows, self.logit_scale, decimals=self.decimals)
        return np.linalg.inv((a * w[:, None]).T @ a + self._precision_prior)

    def next_list(self) -> list[int]:
        mean, cov = self.estimate(unit_norm=False), self.posterior_cov()
        size = min(self.top_k + 1, len(self.class_rows))
        logits = self.logit_scale * self.class_rows @ mean
        scaled = self.logit_scale * self.class_rows
        base = _rounding_variance(self.decimals)
        chosen = [int(self.rng.integers(len(self.class_rows)))]
        while len(chosen) < size:
            candidates = np.array([c for c in range(len(self.class_rows)) if c not in chosen])
            lists = np.concatenate([np.tile(chosen, (len(candidates), 1)), candidates[:, None]], axis=1)
            z = logits[lists] - logits[lists].max(axis=1, keepdims=True)
            p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
            variance = np.full(p.shape, base)
            if lists.shape[1] == size > self.top_k:  # the least likely is not returned: derived
                variance[np.arange(len(p)), p.argmin(axis=1)] *= self.top_k
            w = p ** 2 / variance
            t = scaled[lists]
            r = np.sqrt(w)[..., None] * (t - (w[..., None] * t).sum(axis=1, keepdims=True) / w.sum(axis=1)[:, None, None])
            rc = r @ cov
            m = np.eye(lists.shape[1]) + rc @ r.transpose(0, 2, 1)
            gain = np.trace(np.linalg.solve(m, rc @ rc.transpose(0, 2, 1)), axis1=1, axis2=2)
            chosen.append(int(candidates[int(np.argmax(gain))]))
        return sorted(chosen)

    def add(self, indices: Sequence[int], probs: Sequence[float], asked: Sequence[int]) -> None:
        self.answers.append(([int(c) for c in indices], [float(p) for p in probs], [int(c) for c in asked]))


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
