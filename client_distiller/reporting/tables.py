"""Mean ± standard error over seeds: the one spread every client table reports. Pure Python (no
torch, no numpy), so the report writers that only format numbers import nothing heavy."""

from __future__ import annotations

import math
from typing import Sequence


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) over seeds: sample standard deviation / sqrt(n), and an
    error of 0 for a single value."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (len(values) - 1)
    return m, math.sqrt(var / len(values))
