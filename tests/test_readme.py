"""The README's Python blocks run as printed: the quickstart of the ops on random factors, and the
PEFT + Trainer pattern on a tiny Llama (the names the README leaves to the reader are defined here)."""

from __future__ import annotations

import re

import torch
from transformers import TrainingArguments

import hlora

from conftest import REPO
from tiny import TokenData, batches, tiny_base_model, tiny_lora_model


def _python_block(containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"the README should have one Python block with {containing!r}"
    return found[0]


def test_the_quickstart_runs_as_printed(capsys):
    g = torch.Generator().manual_seed(3)

    def rnd(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    a0, b0 = rnd(8, 576, scale=0.02), rnd(576, 8, scale=0.02)
    grad_a, grad_b = rnd(8, 576, scale=1e-3), rnd(576, 8, scale=1e-3)
    a1, b1 = a0 - 8e-4 * grad_a.sign(), b0 - 8e-4 * grad_b.sign()
    a, b = (a1 + rnd(8, 576, scale=1e-3)).requires_grad_(), (b1 + rnd(576, 8, scale=1e-3)).requires_grad_()
    names = {"a0": a0, "b0": b0, "grad_a": grad_a, "grad_b": grad_b, "a1": a1, "b1": b1, "a": a, "b": b,
             "a_ref": a1, "b_ref": b1, "phi": 1e3, "task_loss": (a * a).sum() + (b * b).sum()}
    exec(_python_block("ops.accumulate_omega_"), names)
    omega, importance = names["omega"], names["Omega"]
    assert omega.shape == importance.shape == (576, 576)
    assert omega.abs().sum() > 0 and torch.isfinite(importance).all() and importance.min() >= 0
    assert names["penalty"].item() > 0
    assert a.grad is not None and b.grad is not None and torch.isfinite(a.grad).all()
    assert capsys.readouterr().out.strip() == hlora.backend()


def test_the_trainer_pattern_runs_as_printed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the block writes importance.safetensors where it runs

    def args(name: str) -> TrainingArguments:
        return TrainingArguments(output_dir=str(tmp_path / name), max_steps=4, per_device_train_batch_size=4,
                                 learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to=[], seed=0,
                                 use_cpu=True, disable_tqdm=True)

    names = {"base": tiny_base_model(seed=5), "args_general": args("general"), "args_domain": args("domain"),
             "general": TokenData(32, seed=6), "domain": TokenData(32, seed=7)}
    exec(_python_block("ImportanceCallback"), names)
    imp = hlora.Importance.load(str(tmp_path / "importance.safetensors"))
    assert imp.meta["steps"] == 4 and len(imp.names) == 4  # q_proj and v_proj of both layers
    logged = [entry for entry in names["trainer"].state.log_history if "hlora/penalty" in entry]
    assert len(logged) == 4 and all(entry["hlora/penalty"] >= 0 for entry in logged)
    assert any(entry["hlora/penalty"] > 0 for entry in logged)


def _docs_python_block(page: str, containing: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / page).read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"{page} should have one Python block with {containing!r}"
    return found[0]


def _tiny_loop_names() -> dict:
    model = tiny_lora_model(seed=3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    general, domain = list(batches(TokenData(16, seed=1), 4)), list(batches(TokenData(16, seed=2), 4))
    return {"hlora": hlora, "model": model, "optimizer": optimizer, "general": general, "domain": domain,
            "general_batch": general[0], "domain_batch": domain[0]}


def test_the_readme_loop_runs_as_printed() -> None:
    names = _tiny_loop_names()
    lora = [p for p in names["model"].parameters() if p.requires_grad]
    exec(_python_block("hlora.ImportanceRecorder(model, optimizer)"), names)
    assert names["imp"].meta["steps"] == 1 and len(names["imp"].names) == 4
    assert names["reg"].penalty().item() >= 0
    assert all(p.grad is not None for p in lora)  # the penalty's backward reached every factor


def test_the_training_pages_loop_runs_as_printed(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the block saves importance.safetensors where it runs
    names = _tiny_loop_names()
    exec(_docs_python_block("docs/training.md", "hlora.ImportanceRecorder(model, optimizer)"), names)
    assert names["imp"].meta["steps"] == len(names["general"])
    assert hlora.Importance.load(str(tmp_path / "importance.safetensors")).names == names["imp"].names


#: Markdown the project keeps: the README and every page of docs/ (and the tuning notes).
PAGES = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
         "scripts/dev/README.md"]


def _anchors(path) -> set:
    """GitHub's anchors of a Markdown file: its headings' slugs and explicit `<a id=...>`."""
    text = path.read_text()
    slugs = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    checked = 0
    for page in PAGES:
        path = REPO / page
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            assert linked.exists(), f"{page} links to {target}, which does not exist"
            if anchor and linked.suffix == ".md":
                assert anchor in _anchors(linked), f"{page} links to {target}: no such heading in {linked.name}"
            checked += 1
    assert checked > 20  # the parsing found the links


def test_the_readme_stays_short() -> None:
    # Users read it to the end; detail goes to docs/.
    lines = len((REPO / "README.md").read_text().splitlines())
    assert lines <= 300, f"README.md is {lines} lines"


def test_every_environment_variable_is_on_the_configuration_page() -> None:
    used = set()
    for folder in ("src", "python", "scripts", "tests"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix in (".rs", ".py", ".sh", ".cu", ".cpp"):
                used |= set(re.findall(r"\bHLORA_[A-Z_]+\b", path.read_text(errors="replace")))
    page = (REPO / "docs" / "configuration.md").read_text()
    assert {"HLORA_BACKEND", "HLORA_PROVIDER", "HLORA_SIMD"} <= used  # the search found them
    missing = sorted(v for v in used if f"`{v}`" not in page)
    assert not missing, f"docs/configuration.md does not describe {missing}"


def test_the_fsdp2_memory_tables_are_the_scripts_numbers() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("omega_memory", REPO / "scripts" / "omega_memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)
    page = (REPO / "docs" / "scaling.md").read_text()
    block = re.search(r"<!-- omega_memory table.*?-->\n(.*?)\n<!-- end omega_memory table -->", page, flags=re.S)
    assert block is not None and block.group(1) == memory.table()
    # The README's excerpt: q_proj + v_proj at 1, 8 and 64 ranks.
    readme = (REPO / "README.md").read_text()
    rows = re.findall(r"^\| (LLaMA-3-\w+), (float32|bfloat16) \| (.*?) \|$", readme, flags=re.M)
    assert len(rows) == 3
    for model, dtype, cells in rows:
        size = dict(memory.DTYPES)[dtype]
        want = [memory.human(memory.bytes_per_rank(model, ("q_proj", "v_proj"), w, size)) for w in (1, 8, 64)]
        assert cells.split(" | ") == want, model
