"""Two-sided t-tests (Welch and paired) without SciPy: Student's t CDF through the regularized
incomplete beta function (Lentz's continued fraction)."""

from __future__ import annotations

import math
from typing import Sequence, Tuple


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 3e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        even = m * (b - m) * x / ((a + m2 - 1) * (a + m2))
        odd = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))
        for num in (even, odd):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| ≥ |t|) for Student's t with ``df`` degrees of freedom. NaN in, NaN out: a sample
    with a NaN or infinite value (a diverged run's perplexity) has no p-value, and must not
    read as p = 0."""
    if math.isnan(t) or math.isnan(df):
        return math.nan
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def _mean_var(x: Sequence[float]) -> Tuple[float, float]:
    n = len(x)
    mean = sum(x) / n
    return mean, sum((v - mean) ** 2 for v in x) / (n - 1)


def welch(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """(t, two-sided p) of Welch's unequal-variance t-test."""
    if len(x) < 2 or len(y) < 2:
        raise ValueError("each sample needs at least two values")
    mx, vx = _mean_var(x)
    my, vy = _mean_var(y)
    se2 = vx / len(x) + vy / len(y)
    if se2 == 0:
        return (0.0, 1.0) if mx == my else (math.copysign(math.inf, mx - my), 0.0)
    t = (mx - my) / math.sqrt(se2)
    df = se2 ** 2 / ((vx / len(x)) ** 2 / (len(x) - 1) + (vy / len(y)) ** 2 / (len(y) - 1))
    return t, t_two_sided_p(t, df)


def paired(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """(t, two-sided p) of the paired t-test on x − y (e.g. two methods sharing each seed's ν run)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError("paired samples need the same length, at least two")
    d = [a - b for a, b in zip(x, y)]
    md, vd = _mean_var(d)
    if vd == 0:
        return (0.0, 1.0) if md == 0 else (math.copysign(math.inf, md), 0.0)
    t = md / math.sqrt(vd / len(d))
    return t, t_two_sided_p(t, len(d) - 1)
