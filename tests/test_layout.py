"""The architecture the tree shows: the library (`hlora`, `hlora.hf`) apart from the experiment
harness (`hlora.experiments`), with calls flowing one way — cli → experiments → library."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

PACKAGE = REPO / "python" / "hlora"


def _imported_modules(path) -> set:
    """Every module a file imports, lazily inside functions too (absolute names)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_library_never_imports_the_harness_or_the_cli() -> None:
    library = [p for p in PACKAGE.rglob("*.py") if "experiments" not in p.relative_to(PACKAGE).parts
               and p.name != "cli.py"]
    assert {p.name for p in library} >= {"ops.py", "reference.py", "recorder.py", "importance.py",
                                         "regularizer.py", "hf.py"}
    for path in library:
        wrong = sorted(m for m in _imported_modules(path)
                       if m.startswith(("hlora.experiments", "hlora.cli")) or m in ("matplotlib", "gguf"))
        assert not wrong, f"{path.relative_to(REPO)} imports {wrong}: the library must not depend on the harness"


def test_the_harness_never_imports_the_cli() -> None:
    for path in (PACKAGE / "experiments").rglob("*.py"):
        wrong = sorted(m for m in _imported_modules(path) if m.startswith("hlora.cli"))
        assert not wrong, f"{path.relative_to(REPO)} imports {wrong}"


def test_importing_the_library_loads_no_harness_and_no_matplotlib() -> None:
    # What a user's training script pays: `import hlora, hlora.hf` (in a fresh interpreter).
    code = ("import sys, hlora, hlora.hf\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.startswith(('hlora.experiments', 'hlora.cli', "
            "'matplotlib', 'gguf')))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [], f"import hlora, hlora.hf loaded: {done.stdout.split()}"


def _rust_module_of(path) -> str:
    """`src/cpu/penalty.rs` → `cpu::penalty`; `src/cuda/mod.rs` → `cuda`; `src/lib.rs` → `` (the crate)."""
    parts = list(path.relative_to(REPO / "src").with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return "::".join(parts)


def test_no_two_rust_files_import_each_other_even_through_others() -> None:
    import re

    files = {_rust_module_of(p): p for p in (REPO / "src").rglob("*.rs")}
    edges = {}
    for module, path in files.items():
        code = re.sub(r"//.*", "", path.read_text())
        code = re.sub(r"#\[cfg\(test\)\]\s*mod tests \{.*", "", code, flags=re.S)  # unit tests may reach anywhere
        targets = set()
        for used in re.findall(r"\bcrate((?:::[a-z_0-9]+)+)", code):
            parts = used.strip(":").split("::")
            for n in range(len(parts), 0, -1):  # the longest prefix that is a file
                if "::".join(parts[:n]) in files:
                    targets.add("::".join(parts[:n]))
                    break
        edges[module] = targets - {module, ""}
    assert len(edges) > 20 and "cpu::penalty" in edges  # the parsing found the crate's files

    def cycle_from(start: str):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    for module in edges:
        cycle = cycle_from(module)
        assert cycle is None, "Rust files import each other: " + " → ".join(cycle)
