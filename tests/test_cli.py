"""The CLI and the benchmark script run end to end (what they print, not how fast)."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest
import torch

import hlora
from hlora import cli, ops
from hlora.experiments import bench, bench_training, checkpoint, grid


def test_bench_rows_cover_every_op_and_shape():
    rows = bench.run(threads=1, repeats=2, shapes=[("tiny", 17, 33), ("odd", 5, 3)])
    assert [(r["shape"], r["op"]) for r in rows] == [
        (f"{n} ({o}x{i})", op) for n, o, i in [("tiny", 17, 33), ("odd", 5, 3)] for op in bench.PASSES]
    for r in rows:
        assert r["reference_ms"] > 0 and r["hlora_ms"] > 0 and r["speedup"] > 0
        # The no-work autograd Function is timed beside the penalty only.
        assert ("ceiling" in r) == (r["op"] == bench.DIFFERENTIABLE)
        if "ceiling" in r:
            assert r["no_work_ms"] > 0 and r["ceiling"] == pytest.approx(r["reference_ms"] / r["no_work_ms"])
    table = bench.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "speed-up" in table
    ceilings = bench.format_ceilings(rows)
    assert ceilings.count("\n") == 3 and "ceiling" in ceilings and "odd (5x3)" in ceilings


def test_bench_times_each_provider_the_build_has():
    before = hlora.backend_info()["provider"]
    rows = bench.run_providers(threads=1, repeats=2, shapes=[("tiny", 9, 13, 1), ("three", 4, 4, 3)])
    providers = hlora.backend_info()["providers"]
    assert [(r["shape"], r["op"]) for r in rows] == [
        ("tiny (9x13)", "omega update"), ("tiny (9x13)", "penalty fwd+bwd"),
        ("three", "omega update"), ("three", "penalty fwd+bwd")]
    for r in rows:
        assert all(r[f"{p}_ms"] > 0 for p in providers)
        if len(providers) == 2:
            assert r["view_over_tch"] == pytest.approx(r["view_ms"] / r["tch_ms"])
    table = bench.format_providers(rows)
    assert table.count("\n") == len(rows) + 1 and all(f"{p} (ms)" in table for p in providers)
    assert hlora.backend_info()["provider"] == before  # the caller's provider restored


def test_no_work_function_passes_on_the_kernels_gradients():
    """The bench's floor is the penalty's autograd round trip with the same results: the value and
    the gradients that reach a and b are hlora's own (scaled by the incoming gradient)."""
    x = bench._inputs(9, 13, 3, torch.device("cpu"))
    a = x["a1"].clone().requires_grad_()
    b = x["b1"].clone().requires_grad_()
    value = ops.importance_penalty(x["omega"], a, b, x["a0"], x["b0"], scaling=4.0)
    (3.0 * value).backward()
    results = (value.detach(), a.grad.clone() / 3.0, b.grad.clone() / 3.0)
    a2 = x["a1"].clone().requires_grad_()
    b2 = x["b1"].clone().requires_grad_()
    out = bench._NoWork.apply(x["omega"], a2, b2, x["a0"], x["b0"], *results)
    (3.0 * out).backward()
    assert torch.equal(out.detach(), value.detach())
    torch.testing.assert_close(a2.grad, a.grad)
    torch.testing.assert_close(b2.grad, b.grad)


def test_cli_help_and_unknown_command():
    proc = subprocess.run([sys.executable, "-m", "hlora.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "demo" in proc.stdout and "bench" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "hlora.cli", "fly"], capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def _parsers():
    """Every parser a user meets: each `hlora` sub-command's, the benchmarks'."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = {f"hlora {name}": p for name, p in sub.choices.items() if name != "bench"}
    return {**commands, "hlora bench": bench.build_parser(),
            "python -m hlora.experiments.bench_training": bench_training.build_parser()}


def test_every_option_says_what_it_does_and_its_default():
    parsers = _parsers()
    assert {"hlora demo", "hlora experiment", "hlora record", "hlora finetune", "hlora evaluate"} <= set(parsers)
    for command, parser in parsers.items():
        help_text = parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0]
            assert action.help, f"{command} {flag} has no help"
            # A default worth stating is stated (None: the help says what stands in for it).
            if action.default not in (None, False, []) and action.default is not argparse.SUPPRESS:
                assert "default" in action.help, f"{command} {flag} hides its default {action.default!r}"
        assert "%(" not in help_text  # every placeholder expanded


def test_experiment_seeds_default_per_domain_or_one_count_for_all(monkeypatch, capsys, tmp_path):
    """`--domains science` alone used to fail: the default was the three domains' 5 3 3."""
    ran = []
    monkeypatch.setattr(grid, "run_grid", lambda out, domains, seeds, budget, model_name: ran.append((domains, seeds)))
    monkeypatch.setattr(grid, "summarize", lambda out: "")
    out, two = str(tmp_path), ["medical", "science"]
    for argv, expected in ((["--domains", "science"], (["science"], [3])),
                           (["--domains", "physical", "medical"], (["physical", "medical"], [3, 5])),
                           ([], (list(cli.DEFAULT_SEEDS), list(cli.DEFAULT_SEEDS.values()))),
                           (["--domains", *two, "--seeds", "2"], (two, [2, 2])),
                           (["--domains", *two, "--seeds", "4", "1"], (two, [4, 1]))):
        assert cli.main(["experiment", "--out", out, *argv]) == 0
        assert ran.pop() == expected, argv
    with pytest.raises(SystemExit) as exit_:
        cli.main(["experiment", "--out", out, "--domains", "medical", "science", "--seeds", "1", "2", "3"])
    assert exit_.value.code == 2
    assert "--seeds needs one count, or one per domain: 3 for 2" in capsys.readouterr().err and not ran


def test_training_benchmark_prints_its_overheads(capsys):
    assert bench_training.main(["--steps", "1", "--batch", "1", "--seq", "16", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "model=tiny" in out and "LoRA step" in out and "recording" in out and "penalty fwd+bwd" in out
    for argv, message in ((["--steps", "0"], "--steps: must be at least 1"),  # was a StatisticsError
                          (["--device", "tpu"], "invalid choice")):
        with pytest.raises(SystemExit) as exit_:
            bench_training.main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_both_benchmarks_refuse_cuda_where_torch_sees_no_gpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on a GPU machine
    for main in (bench.main, bench_training.main):
        with pytest.raises(SystemExit) as exit_:
            main(["--device", "cuda"])
        assert exit_.value.code == 2 and "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_quick_example_prints_real_numbers(capsys):
    cli._quick_example()
    out = capsys.readouterr().out
    assert "penalty of a drifted A" in out and "nan" not in out.lower()


def test_bad_numbers_are_usage_errors_not_empty_runs(capsys, tmp_path):
    # --steps -5 used to record nothing and write an all-zero importance file.
    for argv, message in ((["record", "--out", str(tmp_path), "--steps", "-5"], "--steps: must be at least 1"),
                          (["record", "--out", str(tmp_path), "--lr", "nan"], "--lr: must be finite"),
                          (["finetune", "--out", str(tmp_path), "--phi", "-1"], "--phi: must be 0 or more"),
                          (["bench", "--threads", "0"], "--threads: must be at least 1"),
                          (["evaluate", "--seq-len", "1"], "--seq-len: must be at least 2"),
                          (["record", "--out", str(tmp_path), "--seq-len", "1"], "--seq-len: must be at least 2"),
                          (["experiment", "--seeds", "two"], "--seeds: expected a whole number")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_errors_past_parsing_are_one_line(tmp_path):
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"not a safetensors file")
    proc = subprocess.run([sys.executable, "-m", "hlora.cli", "finetune", "--out", str(tmp_path / "out"),
                           "--importance", str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hlora finetune: error: ") and "is not a readable safetensors file" in last
    assert "Traceback" not in proc.stderr


def test_missing_input_files_are_usage_errors(capsys, tmp_path):
    missing = str(tmp_path / "missing")
    for argv, flag in ((["record", "--out", str(tmp_path), "--text", missing], "--text"),
                       (["finetune", "--out", str(tmp_path), "--importance", missing], "--importance"),
                       (["finetune", "--out", str(tmp_path), "--mcq", missing], "--mcq"),
                       (["evaluate", "--text", missing], "--text"),
                       (["evaluate", "--mcq", missing], "--mcq"),
                       (["experiment", "--out", str(tmp_path), "--selection", missing], "--selection")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        assert f"argument {flag}: no such file: {missing}" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # a typo in one domain must not cost the runs of those before it
        cli.main(["experiment", "--out", str(tmp_path), "--domains", "medical", "sceince"])
    assert exit_.value.code == 2 and "invalid choice: 'sceince'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_selection_made_on_another_model_is_pointed_out(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(grid, "run_grid", lambda *a, **k: None)
    monkeypatch.setattr(grid, "summarize", lambda out: "")
    chosen = tmp_path / "selection.json"
    chosen.write_text('{"phi": 1000.0, "lam": 10000.0, "model": "other/model"}')
    assert cli.main(["experiment", "--out", str(tmp_path / "grid"), "--selection", str(chosen)]) == 0
    out = capsys.readouterr().out
    assert "φ = 1000 and λ = 10000" in out
    assert "was chosen on model other/model, this grid runs SmolLM2-135M-Instruct (the default)" in out
    chosen.write_text('{"phi": 1000.0, "lam": 10000.0, "model": "smollm2"}')  # the default, named
    assert cli.main(["experiment", "--out", str(tmp_path / "grid"), "--selection", str(chosen)]) == 0
    assert "was chosen on model" not in capsys.readouterr().out


def test_summary_only_of_a_folder_without_runs_is_an_error(capsys, tmp_path):
    """A mistyped --out used to make that folder and an empty summary.md, with exit status 0."""
    missing = tmp_path / "typo"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["experiment", "--summary-only", "--out", str(missing)])
    assert exit_.value.code == 2
    assert f"--summary-only: no finished runs in {missing}" in capsys.readouterr().err
    assert not missing.exists()


def test_version_names_the_backend_the_provider_and_torch(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    provider = hlora.backend_info()["provider"]
    said = f", provider {provider}" if provider else ""
    assert capsys.readouterr().out.strip() == (f"hlora {hlora.__version__} (backend {hlora.backend()}{said}, "
                                               f"torch {torch.__version__})")


def test_an_adapter_that_is_not_there_is_a_usage_error(capsys, tmp_path):
    """--adapter is checked before the model loads; the record folder instead of its adapter
    subfolder (the likely slip) gets the right path named."""
    record_out = tmp_path / "nu"
    (record_out / "adapter").mkdir(parents=True)
    (record_out / "adapter" / "adapter_config.json").write_text("{}")
    out = str(tmp_path / "mu")
    for adapter, message in ((tmp_path / "missing", f"no such folder: {tmp_path / 'missing'}"),
                             (tmp_path, f"{tmp_path} is no PEFT adapter folder (it has no adapter_config.json)"),
                             (record_out, f"{record_out} holds no adapter_config.json; did you mean "
                                          f"{record_out / 'adapter'}?")):
        for argv in (["finetune", "--out", out, "--adapter", str(adapter)], ["evaluate", "--adapter", str(adapter)]):
            with pytest.raises(SystemExit) as exit_:
                cli.main(argv)
            assert exit_.value.code == 2
            assert f"argument --adapter: {message}" in capsys.readouterr().err
    assert not (tmp_path / "mu").exists()


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: what is checked here must fail before the model loads."""
    from hlora.experiments import models

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was noticed")

    monkeypatch.setattr(models, "load", load)


def test_bad_inputs_and_outputs_fail_before_the_model_loads(no_model, capsys, tmp_path):
    not_json = tmp_path / "items.jsonl"
    not_json.write_text('{"question": "q", "options": ["a", "b"], "answer": 0}\n{oops\n')
    corrupt = tmp_path / "importance.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    selection = tmp_path / "selection.json"
    selection.write_text('{"phi": 100.0}')
    unwritable = str(a_file / "out")  # a folder inside a file: --out can never be made
    (tmp_path / "grid2" / "medical").mkdir(parents=True)
    (tmp_path / "grid2" / "medical" / "seed0.json").write_text('{"domain": "medical", ')  # edited by hand
    (tmp_path / "rec2").mkdir()  # a record run killed at step 50 of 100, rerun with other steps
    torch.save({"format": checkpoint.FORMAT, "settings": {"command": "record", "steps": 100}, "step": 50},
               tmp_path / "rec2" / "resume.pt")
    (tmp_path / "nu" / "adapter").mkdir(parents=True)  # what `hlora record --out nu` leaves
    (tmp_path / "nu" / "adapter" / "adapter_config.json").write_text("{}")
    nu_adapter = str(tmp_path / "nu" / "adapter")
    latin1 = tmp_path / "general.txt"
    latin1.write_bytes("A general text,\nin Latin-1: déjà vu.\n".encode("latin-1"))
    for argv, message in ((["evaluate", "--mcq", str(not_json)], "items.jsonl:2: not valid JSON"),
                          (["finetune", "--out", str(tmp_path / "ft"), "--mcq", str(not_json)], "not valid JSON"),
                          (["finetune", "--out", str(tmp_path / "ft"), "--importance", str(corrupt)],
                           "is not a readable safetensors file"),
                          (["finetune", "--out", unwritable], "Not a directory"),
                          (["finetune", "--out", str(tmp_path / "nu" / "."), "--adapter", nu_adapter],
                           f"would save over the adapter it continues ({nu_adapter}); give another --out"),
                          (["record", "--out", unwritable], "Not a directory"),
                          (["record", "--out", str(tmp_path / "rec"), "--text", str(latin1)],
                           "general.txt: not UTF-8 text (byte 0xe9 on line 2)"),
                          (["evaluate", "--text", str(latin1)], "not UTF-8 text"),
                          (["record", "--out", str(tmp_path / "rec2")],
                           "resume.pt holds a run interrupted with other settings"),
                          (["experiment", "--out", str(tmp_path / "grid"), "--selection", str(selection)],
                           'has no numbers "phi" and "lam"'),
                          (["experiment", "--out", str(tmp_path / "grid"), "--selection", str(not_json)],
                           "items.jsonl: not valid JSON (Extra data at line 2, column 1)"),
                          (["experiment", "--out", str(tmp_path / "grid2"), "--summary-only"],
                           "seed0.json: not valid JSON (Expecting property name")):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.startswith(f"hlora {argv[0]}: error: "), err


def test_a_finetune_checkpoint_belongs_to_its_inputs_by_content(tmp_path):
    """What `hlora finetune` resumes across: the same adapter, importance and MCQ bytes, the same
    options but --threads and --checkpoint-every; an input edited in between is another run."""
    from tiny import tiny_lora_model

    tiny_lora_model(seed=60).save_pretrained(str(tmp_path / "adapter"))
    importance, items = tmp_path / "importance.safetensors", tmp_path / "items.jsonl"
    importance.write_bytes(b"recorded importance")  # read by content here, not parsed
    items.write_text('{"question": "q", "options": ["a", "b"], "answer": 0}\n')
    argv = ["finetune", "--out", str(tmp_path / "ft"), "--adapter", str(tmp_path / "adapter"),
            "--importance", str(importance), "--mcq", str(items), "--steps", "4"]
    (tmp_path / "ft").mkdir()
    first = cli._step_checkpoint(cli.build_parser().parse_args(argv))
    assert first.settings["command"] == "finetune" and len(first.settings["adapter"]) == 1
    torch.save({"format": checkpoint.FORMAT, "settings": first.settings, "step": 2}, first.path)
    again = cli._step_checkpoint(cli.build_parser().parse_args(argv + ["--threads", "1", "--checkpoint-every", "7"]))
    assert again.step == 2, "the thread count and checkpoint interval do not make another run"
    items.write_text('{"question": "q?", "options": ["a", "b"], "answer": 0}\n')
    with pytest.raises(ValueError, match=r"resume.pt holds a run interrupted with other settings \(mcq '"):
        cli._step_checkpoint(cli.build_parser().parse_args(argv))
