"""Tables and plots of the fronts study from whatever runs are finished (``hlora fronts --summary-only``):
per domain, every method's front with its seed spread, forgetting at matched accuracy with paired
p-values against HLoRA, and how much of HLoRA's front each baseline dominates and vice versa."""

from __future__ import annotations

import math
import os
import statistics
from typing import Dict, List, Optional, Tuple

from hlora._io import read_json, write_text_atomic
from hlora.experiments import experiment, frontier, fronts, stats

NU = experiment.NU
MEASURES = {"rise": "general PPL rise over ν", "drop": "general-knowledge accuracy drop vs ν"}


def load(out: str) -> Tuple[Optional[Dict], Dict[str, List[Dict]]]:
    """The validation result (None until it is finished) and the finished test runs per domain, seed order."""
    validation = fronts.validation_path(out)
    chosen = read_json(validation) if os.path.isfile(validation) else None
    runs: Dict[str, List[Dict]] = {}
    for domain in sorted(os.listdir(out)) if os.path.isdir(out) else []:
        folder = os.path.join(out, domain)
        if not os.path.isdir(folder):
            continue
        files = sorted((f for f in os.listdir(folder) if f.startswith("seed") and f.endswith(".json")),
                       key=lambda f: (len(f), f))
        if files:
            runs[domain] = [read_json(os.path.join(folder, f)) for f in files]
    return chosen, runs


def _point(result: Dict, nu: Dict, knob: float = math.nan) -> Dict[str, float]:
    known = result.get("extra", {}).get("knowledge_acc", math.nan)
    return {"knob": knob, "acc": result["acc"], "rise": result["ppl"] - nu["ppl"],
            "drop": nu.get("extra", {}).get("knowledge_acc", math.nan) - known}


def seed_fronts(run: Dict) -> Dict[str, List[Dict[str, float]]]:
    """One run's fronts, weakest knob first: the swept methods at their values; WiSE from the trained
    method (m = 1) down to its start (m = 0); each single-point method as a front of one point."""
    results, values = run["results"], run["values"]
    nu = results[NU]
    out: Dict[str, List[Dict[str, float]]] = {}
    for method in fronts.SINGLES:
        if method in results:
            out[method] = [_point(results[method], nu)]
    for method, knob_values in values.items():
        points = [_point(results[fronts.point(method, v)], nu, v) for v in knob_values
                  if fronts.point(method, v) in results]
        if points:
            out[method] = points
    phi = run.get("selected", {}).get("HLoRA")
    ends = {"WiSE LoRA(nu+mu)": ("LoRA(nu+mu)", NU), "WiSE LoRA(mu)": ("LoRA(mu)", "base"),
            "WiSE HLoRA": (fronts.point("HLoRA", phi) if phi is not None else "", NU)}
    for label, (end, start) in ends.items():
        if end not in results and label == "WiSE HLoRA":
            end = "HLoRA (WiSE end)"
        ms = sorted(fronts.WISE_M, reverse=True)
        if end in results and all(fronts.point(label, m) in results for m in ms):
            out[label] = ([_point(results[end], nu, 1.0)]
                          + [_point(results[fronts.point(label, m)], nu, m) for m in ms]
                          + [_point(results[start], nu, 0.0)])
    return out


def matched(runs: List[Dict], measure: str) -> Dict[str, List[float]]:
    """Per method, per seed: its forgetting at 90 % of LoRA(ν+μ)'s accuracy gain (NaN: never reached)."""
    table: Dict[str, List[float]] = {}
    for run in runs:
        target = frontier.matched_target(run["results"][NU]["acc"], run["results"]["LoRA(nu+mu)"]["acc"])
        for method, front in seed_fronts(run).items():
            table.setdefault(method, []).append(frontier.at_accuracy(front, target, measure))
    return table


def _fmt(values: List[float], digits: int = 2) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "never"
    text = f"{statistics.mean(finite):.{digits}f}"
    if len(finite) > 1:
        text += f" ± {statistics.stdev(finite):.{digits}f}"
    return text + (f" ({len(values) - len(finite)} seed(s) never)" if len(finite) < len(values) else "")


def _paired_p(x: List[float], y: List[float]) -> Optional[float]:
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 2:
        return None
    return stats.paired([a for a, _ in pairs], [b for _, b in pairs])[1]


def domain_fronts(runs: List[Dict]) -> Tuple[Dict[str, List[Dict[str, float]]], float]:
    """One domain's fronts, seed means with their sd (the methods every seed ran), and the matched
    accuracy (mean over seeds)."""
    per_seed = [seed_fronts(run) for run in runs]
    methods = [m for m in per_seed[0] if all(m in f for f in per_seed)]
    target = statistics.mean(frontier.matched_target(r["results"][NU]["acc"], r["results"]["LoRA(nu+mu)"]["acc"])
                             for r in runs)
    return {m: frontier.mean_front([f[m] for f in per_seed]) for m in methods}, target


def domain_section(domain: str, runs: List[Dict], out: str) -> List[str]:
    means, target = domain_fronts(runs)
    swept = [m for m in means if len(means[m]) > 1]
    singles = [m for m in means if len(means[m]) == 1]
    lines = [f"### {domain} — {len(runs)} seed(s)", "", "Single-point methods (means ± sd over seeds):", "",
             "| method | domain acc | general PPL rise | general-knowledge drop |", "|---|---:|---:|---:|"]
    for method in singles:
        (row,) = means[method]
        lines.append(f"| {method} | {row['acc']:.3f} ± {row['acc_sd']:.3f} | {row['rise']:.2f} ± {row['rise_sd']:.2f} "
                     f"| {row['drop']:.3f} ± {row['drop_sd']:.3f} |")
    lines.append("")
    for measure, label in MEASURES.items():
        table = matched(runs, measure)
        lines += [f"Forgetting ({label}) at matched accuracy — 90 % of LoRA(ν+μ)'s gain over ν; p: paired t-test "
                  "against HLoRA over seeds; verdict: HLoRA against the method", "",
                  "| method | at matched accuracy | p vs HLoRA | verdict |", "|---|---:|---:|---|"]
        for method in swept:
            p = None if method == "HLoRA" else _paired_p(table[method], table["HLoRA"]) if "HLoRA" in table else None
            verdict = "" if method == "HLoRA" or "HLoRA" not in table else frontier.verdict(
                _mean(table["HLoRA"]), _mean(table[method]), p)
            digits = 2 if measure == "rise" else 3
            lines.append(f"| {method} | {_fmt(table[method], digits)} | {'' if p is None else f'{p:.3g}'} "
                         f"| {verdict} |")
        lines.append("")
    if "HLoRA" in means:
        lines += ["Dominance (seed-mean fronts, PPL rise): the share of HLoRA's points a method dominates, "
                  "and the share of the method's points HLoRA dominates", "",
                  "| method | of HLoRA's front | HLoRA dominates of its |", "|---|---:|---:|"]
        for method in swept + singles:
            if method != "HLoRA":
                lines.append(f"| {method} | {frontier.dominated_share(means['HLoRA'], means[method]):.0%} | "
                             f"{frontier.dominated_share(means[method], means['HLoRA']):.0%} |")
        lines.append("")
    seconds = sum(r["seconds"] + r.get("extra", {}).get("eval_s", 0.0) for run in runs for r in run["results"].values())
    lines += [f"Compute: {seconds / 3600:.2f} h over {len(runs)} run(s) (training and evaluation, 2 threads).", ""]
    from hlora.experiments import plots

    plots.fronts(means, os.path.join(out, f"{domain}_fronts.png"), domain, target=target)
    return lines


def validation_fronts(chosen: Dict) -> Tuple[Dict[str, List[Dict[str, float]]], float]:
    """The validation pass's fronts (each method over every candidate it trained) and its matched
    accuracy."""
    results = chosen["results"]
    run = {**chosen, "values": {m: [v for v in knob.candidates if fronts.point(m, v) in results]
                                for m, knob in fronts.KNOBS.items()}}
    return seed_fronts(run), frontier.matched_target(results[NU]["acc"], results["LoRA(nu+mu)"]["acc"])


def validation_section(chosen: Dict, out: str) -> List[str]:
    """Every point the validation pass trained (medical, validation items, one seed): each method
    over all its candidate values — the fronts the test values were chosen from — with one seed's
    forgetting at matched accuracy, and their PNG."""
    results, nu = chosen["results"], chosen["results"][NU]
    front, target = validation_fronts(chosen)
    lines = [f"## Validation pass (medical, validation items, seed {chosen.get('seed', fronts.VALIDATION_SEED)})",
             "", f"Every candidate, one seed: ν's general PPL {nu['ppl']:.2f}, domain accuracy {nu['acc']:.3f}; "
             f"matched accuracy {target:.3f}. Bold: the selected strength; in parentheses: a candidate the test "
             "pass does not run.", "",
             "| method | knob: domain acc / PPL rise / knowledge drop | at matched acc: PPL rise, drop |",
             "|---|---|---|"]
    for method, points in front.items():
        values = chosen["values"].get(method, [])
        cells = []
        for p in points:
            label = "" if math.isnan(p["knob"]) else f"{p['knob']:g}: "
            text = f"{label}{p['acc']:.3f} / {p['rise']:.1f} / {p['drop']:+.3f}"
            if p["knob"] == chosen["selected"].get(method):
                text = f"**{text}**"
            elif p["knob"] not in values and not math.isnan(p["knob"]):
                text = f"({text})"
            cells.append(text)
        rise, drop = (frontier.at_accuracy(points, target, m) for m in MEASURES)
        at = "never" if math.isnan(rise) else f"{rise:.1f}, {drop:+.3f}"
        lines.append(f"| {method} | {'; '.join(cells)} | {at} |")
    seconds = sum(r["seconds"] + r.get("extra", {}).get("eval_s", 0.0) for r in results.values())
    lines += ["", f"Compute: {seconds / 3600:.2f} h (training and evaluation, 2 threads).", ""]
    from hlora.experiments import plots

    one_seed = {method: frontier.mean_front([points]) for method, points in front.items()}  # zero spread
    plots.fronts(one_seed, os.path.join(out, "validation_fronts.png"), "medical", target=target,
                 split="validation")
    return lines


def _mean(values: List[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.mean(finite) if finite else math.nan


def summarize(out: str) -> str:
    """``out/summary.md`` and one PNG of fronts per domain, from the finished runs."""
    chosen, runs = load(out)
    lines = ["# Forgetting–accuracy fronts", ""]
    if chosen is None:
        lines += ["The validation pass is not finished: no test values yet.", ""]
    else:
        lines += ["Test values chosen on the validation split (medical, seed "
                  f"{chosen.get('seed', fronts.VALIDATION_SEED)}); selected strength in bold:", "",
                  "| method | knob | values |", "|---|---|---|"]
        for method, values in chosen["values"].items():
            knob = fronts.KNOBS[method].name if method in fronts.KNOBS else ""
            shown = ", ".join(f"**{v:g}**" if v == chosen["selected"].get(method) else f"{v:g}" for v in values)
            lines.append(f"| {method} | {knob} | {shown} |")
        lines.append("")
        if "results" in chosen:
            lines += validation_section(chosen, out)
    for domain, kept in runs.items():
        lines += domain_section(domain, kept, out)
    text = "\n".join(lines)
    os.makedirs(out, exist_ok=True)
    write_text_atomic(os.path.join(out, "summary.md"), text)
    return text
