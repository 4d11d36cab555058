"""The arithmetic of forgetting–accuracy fronts, apart from any training (so it is tested on
synthetic points with known answers): which knob values a validation pass keeps, a front's
forgetting at a matched domain accuracy, and how much of one front another dominates.

A *point* is a dict with at least ``"acc"`` (domain accuracy, higher is better) and a forgetting
measure (``"rise"``: general perplexity above the ν model's; ``"drop"``: general-knowledge accuracy
below it — lower is better for both). A *front* is a method's points in the order of its knob, from
weakest to strongest.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

#: The matched accuracy: this share of LoRA(ν+μ)'s domain-accuracy gain over the ν model.
MATCHED_SHARE = 0.9
#: A knob value has "no effect" while its forgetting stays above this share of the unregularized
#: method's, and "no learning" once its accuracy gain is at most this share of that method's.
NO_EFFECT_SHARE = 0.9
NO_LEARNING_SHARE = 0.25
#: Values a test front gets at least (the issue's protocol: ≥ 5 per knob).
MIN_VALUES = 5


def window(rows: Sequence[Dict[str, float]], reference_rise: float, reference_gain: float,
           minimum: int = MIN_VALUES) -> List[int]:
    """The indices of ``rows`` (validation points, knob ascending, each with ``rise`` and ``gain``)
    a test front runs: from the last value with no effect before the first that has one, to the first
    value with no learning after it; widened (stronger side first) to ``minimum`` values where the
    grid has them. Diverged rows (rise NaN) count as "no learning"."""
    n = len(rows)
    if n == 0:
        raise ValueError("rows must hold at least one validation point")
    effect = [not (r["rise"] >= NO_EFFECT_SHARE * reference_rise) for r in rows]  # NaN: an effect
    first_effect = next((i for i, e in enumerate(effect) if e), n - 1)
    lo = max(first_effect - 1, 0)
    hi = n - 1
    if reference_gain > 0:  # with no gain to lose, every value "learns": the window runs to the end
        hi = next((i for i in range(lo, n) if not (rows[i]["gain"] > NO_LEARNING_SHARE * reference_gain)), n - 1)
    while hi - lo + 1 < min(minimum, n):
        if hi < n - 1:
            hi += 1
        if hi - lo + 1 < min(minimum, n) and lo > 0:
            lo -= 1
    return list(range(lo, hi + 1))


def at_accuracy(front: Sequence[Dict[str, float]], target: float, measure: str = "rise") -> float:
    """The least forgetting (``measure``) at which the front reaches at least domain accuracy ``target``:
    the lowest over its points at or above ``target`` and the crossings of ``target`` linear between
    consecutive points (knob order); NaN when no point of the front reaches it.

    A front whose every point is above ``target`` (regularizing can raise domain accuracy: science)
    reaches it at its least forgetting, not "never"."""
    best = math.nan
    points = [p for p in front if math.isfinite(p["acc"]) and math.isfinite(p[measure])]
    for p in points:
        if p["acc"] >= target:
            best = _lower(best, p[measure])
    for p, q in zip(points, points[1:]):
        low, high = sorted((p, q), key=lambda x: x["acc"])
        if low["acc"] < target < high["acc"]:
            t = (target - low["acc"]) / (high["acc"] - low["acc"])
            best = _lower(best, low[measure] + t * (high[measure] - low[measure]))
    return best


def _lower(a: float, b: float) -> float:
    return b if math.isnan(a) else min(a, b)


def matched_target(nu_acc: float, reference_acc: float, share: float = MATCHED_SHARE) -> float:
    """The domain accuracy at ``share`` of the reference's (LoRA(ν+μ)'s) gain over the ν model."""
    return nu_acc + share * (reference_acc - nu_acc)


def dominates(p: Dict[str, float], q: Dict[str, float], measure: str = "rise") -> bool:
    """``p`` at least as accurate and forgetting no more than ``q``, strictly better in one."""
    return (p["acc"] >= q["acc"] and p[measure] <= q[measure]
            and (p["acc"] > q["acc"] or p[measure] < q[measure]))


def dominated_share(front: Sequence[Dict[str, float]], by: Sequence[Dict[str, float]],
                    measure: str = "rise") -> float:
    """The fraction of ``front``'s points that some point of ``by`` dominates (NaN for an empty front)."""
    points = [p for p in front if math.isfinite(p[measure])]
    if not points:
        return math.nan
    return sum(any(dominates(q, p, measure) for q in by) for p in points) / len(points)


def mean_front(per_seed: Sequence[Sequence[Dict[str, float]]], keys: Sequence[str] = ("acc", "rise", "drop")
               ) -> List[Dict[str, float]]:
    """Point-by-point means and sample sd (``<key>_sd``) over seeds of fronts run at the same knob
    values (``knob`` copied from the first seed's points)."""
    lengths = {len(front) for front in per_seed}
    if len(lengths) != 1:
        raise ValueError(f"every seed's front must have the same knob values; got lengths {sorted(lengths)}")
    out = []
    for points in zip(*per_seed):
        row: Dict[str, float] = {"knob": points[0].get("knob", math.nan)}
        for key in keys:
            values = [p[key] for p in points if key in p]
            if not values:
                continue
            mean = sum(values) / len(values)
            row[key] = mean
            row[f"{key}_sd"] = (math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                                if len(values) > 1 else 0.0)
        out.append(row)
    return out


def verdict(hlora_value: float, baseline_value: float, p_value: Optional[float], alpha: float = 0.05) -> str:
    """"ahead", "behind" or "tied": HLoRA's forgetting at matched accuracy against one baseline's,
    significant where a paired p-value below ``alpha`` says so. With no p-value (under two seeds) no side is
    called: "HLoRA forgets less/more, untested" says only where its single reading fell."""
    if math.isnan(hlora_value) and math.isnan(baseline_value):
        return "neither reaches it"
    if math.isnan(baseline_value):
        return "ahead (the baseline never reaches it)"
    if math.isnan(hlora_value):
        return "behind (HLoRA never reaches it)"
    if p_value is None:
        return f"HLoRA forgets {'less' if hlora_value < baseline_value else 'more'}, untested (under two paired seeds)"
    if p_value >= alpha:
        return "tied"
    return "ahead" if hlora_value < baseline_value else "behind"
