"""The paper's figures as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

import math
import re
import sys
from typing import Dict, List, Sequence

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # a notebook's inline backend, once chosen, is kept
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hlora._io import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: str) -> str:
    """The figure as a PNG at ``path``, written atomically (a crash leaves the previous one)."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def loss_curves(histories: Dict[str, List[Dict[str, float]]], path: str) -> str:
    """Fig. 4: domain task loss per step for each method, and HLoRA's φ·penalty."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in histories.items():
        if hist:
            ax1.plot([h["step"] for h in hist], [h["task_loss"] for h in hist], label=name)
            if any(h["penalty"] for h in hist):
                ax2.plot([h["step"] for h in hist], [h["penalty"] for h in hist], label=name)
    ax1.set(xlabel="optimizer step", ylabel="task loss (answer tokens)", title="Domain fine-tuning")
    ax2.set(xlabel="optimizer step", ylabel="penalty (φ·Σ c·P, or λ·Σ F·ΔW²)", title="Regularization")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def phi_sweep(rows: Sequence[Dict[str, float]], path: str, baseline: Dict[str, float] = None) -> str:
    """Fig. 6: general perplexity against domain accuracy as φ varies."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    xs, ys = [r["acc"] for r in rows], [r["ppl"] for r in rows]
    ax.plot(xs, ys, "o-", label="HLoRA")
    for r in rows:
        ax.annotate(f"φ={r['phi']:g}", (r["acc"], r["ppl"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if baseline:
        ax.plot([baseline["acc"]], [baseline["ppl"]], "s", color="C3", label="LoRA(ν+μ) (φ = 0)")
    ax.set(xlabel="domain accuracy (validation)", ylabel="general perplexity (held out)", title="φ sweep")
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def importance_heatmap(norms: Dict[str, float], path: str) -> str:
    """Fig. 7: log10 ‖Ω_l‖_F per layer for each adapted projection."""
    layers: Dict[str, Dict[int, float]] = {}
    for name, value in norms.items():
        m = re.search(r"layers\.(\d+)\..*?(\w+_proj)$", name)
        if m:
            layers.setdefault(m.group(2), {})[int(m.group(1))] = math.log10(max(value, 1e-30))
    if not layers:
        shown = ", ".join(list(norms)[:3]) or "none"
        raise ValueError(f"norms has no matrix named like 'layers.<i>.<...>_proj' to place in the heatmap "
                         f"(got {len(norms)}: {shown})")
    kinds = sorted(layers)
    depth = max(max(v) for v in layers.values()) + 1
    grid = [[layers[k].get(i, float("nan")) for i in range(depth)] for k in kinds]
    fig, ax = plt.subplots(figsize=(min(14, 2 + depth * 0.35), 2 + 0.5 * len(kinds)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xlabel("layer")
    ax.set_title("log10 ‖Ω‖ per adapted matrix")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def violin_labels(per_method: Dict[str, List[float]], tests: Dict[str, float] = None) -> List[str]:
    """Each method's name, its p-value when tested, and how many of its seeds diverged."""
    labels = []
    for name, values in per_method.items():
        label = f"{name}\np={tests[name]:.3g}" if tests and name in tests else name
        diverged = sum(not math.isfinite(v) for v in values)
        labels.append(label + (f"\n{diverged} of {len(values)} diverged" if diverged else ""))
    return labels


def violins(per_method: Dict[str, List[float]], path: str, ylabel: str, tests: Dict[str, float] = None) -> str:
    """Fig. 3: the spread over seeds for each method, with Welch t-test p-values against HLoRA."""
    names = list(per_method)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4.5))
    # A diverged seed (NaN or inf) has no place on the axis: it is left out and counted in the label.
    data = [[v for v in per_method[n] if math.isfinite(v)] for n in names]
    if all(len(d) > 1 for d in data):
        ax.violinplot(data, showmeans=True)
    for i, d in enumerate(data, 1):
        ax.scatter([i] * len(d), d, s=10, color="k", zorder=3)
    ax.set_xticks(range(1, len(names) + 1), violin_labels(per_method, tests), fontsize=8)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return _save(fig, path)


def fronts(means: Dict[str, List[Dict[str, float]]], path: str, title: str, target: float = None,
           split: str = "test") -> str:
    """Every method's front (seed means, bars: sd over seeds): forgetting against domain accuracy,
    general perplexity rise on the left, general-knowledge accuracy drop on the right; single-point
    methods as large markers, HLoRA bold; the dotted line is the matched accuracy."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, (key, label) in zip(axes, (("rise", "general PPL rise over ν ↓"),
                                       ("drop", "general-knowledge accuracy drop ↓"))):
        for i, (method, points) in enumerate(means.items()):
            style = {"marker": "o" if len(points) > 1 else "*", "markersize": 5 if len(points) > 1 else 12,
                     "linewidth": 2.5 if method == "HLoRA" else 1.2, "color": plt.cm.tab20(i % 20),
                     "linestyle": "--" if method.startswith("WiSE") else "-"}
            ax.errorbar([p["acc"] for p in points], [p[key] for p in points],
                        xerr=[p.get("acc_sd", 0.0) for p in points], yerr=[p.get(f"{key}_sd", 0.0) for p in points],
                        label=method, capsize=2, elinewidth=0.6, **style)
        if target is not None:
            ax.axvline(target, color="grey", linestyle=":", linewidth=1)
        ax.set(xlabel=f"domain accuracy ({split}) ↑", ylabel=label)
    axes[0].set_title(f"{title}: forgetting vs domain accuracy")
    axes[1].legend(fontsize=7, loc="best", ncol=2)
    fig.tight_layout()
    return _save(fig, path)
