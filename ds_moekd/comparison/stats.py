"""Seed statistics of a method comparison: mean, sample std, Student-t 95% intervals, and whether
a difference between two methods is inside the seed spread (docs/comparison.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Two-sided 95% quantiles of Student's t, t_{0.975}(df), for df = 1..30; beyond, the normal's 1.96
# is within 2% of the true value.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: float) -> float:
    """t_{0.975} for (possibly fractional, Welch) degrees of freedom: rounded down, which is conservative."""
    if df < 1:
        return math.inf
    whole = int(df)
    return _T975[whole - 1] if whole <= len(_T975) else 1.96


@dataclass(frozen=True)
class Summary:
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def std(self) -> float:
        """Sample standard deviation (n-1); 0 for one value."""
        if self.n < 2:
            return 0.0
        return math.sqrt(sum((v - self.mean) ** 2 for v in self.values) / (self.n - 1))

    @property
    def half_width(self) -> float:
        """Half-width of the 95% confidence interval of the mean (inf for one value: no spread known)."""
        return t975(self.n - 1) * self.std / math.sqrt(self.n) if self.n > 1 else math.inf


def summarize(values) -> Summary:
    values = tuple(float(v) for v in values)
    if not values:
        raise ValueError("no values to summarize")
    return Summary(values)


def difference(a: Summary, b: Summary) -> tuple[float, float]:
    """(mean of a - mean of b, half-width of its 95% interval) by Welch's t: the seeds of two methods
    are independent and their spreads may differ. The half-width is inf with fewer than 2 seeds."""
    delta = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return delta, math.inf
    va, vb = a.std**2 / a.n, b.std**2 / b.n
    if va + vb == 0:
        return delta, 0.0
    df = (va + vb) ** 2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    return delta, t975(df) * math.sqrt(va + vb)


def inside_spread(a: Summary, b: Summary) -> bool:
    """True when the 95% interval of the difference contains 0: the seeds cannot tell a from b."""
    delta, half = difference(a, b)
    return abs(delta) <= half


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """(mean of a_s - b_s over seeds s, half-width of its 95% interval, Student t with n-1 df): the runs
    of one seed share the student init and the data order, so their difference removes what the seed
    does to both. The half-width is inf with fewer than 2 pairs."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired difference needs equal, non-empty seed lists (got {len(a)} and {len(b)})")
    deltas = summarize(x - y for x, y in zip(a, b))
    return deltas.mean, deltas.half_width


def excludes_zero(delta: float, half_width: float) -> bool:
    """True when the 95% interval delta ± half_width lies wholly on one side of 0."""
    return math.isfinite(half_width) and abs(delta) > half_width
