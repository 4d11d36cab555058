"""Importance files: round trip, bfloat16 storage, atomic writes (and those of the text/JSON files),
truncated / corrupted / other format versions, and matching against a model."""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hlora
from hlora import Importance
from hlora.importance import read_header

from tiny import TokenData, batches, tiny_lora_model


@pytest.fixture(scope="module")
def recorded():
    model = tiny_lora_model(seed=21)
    recorder = hlora.ImportanceRecorder(model, xi=1e-3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    recorder.optimizer = opt
    for batch in list(batches(TokenData(32, seed=22), 4))[:4]:
        opt.zero_grad()
        model(**batch).loss.backward()
        recorder.before_step()
        opt.step()
        recorder.after_step()
    return model, recorder.finalize()


def test_round_trip_keeps_everything(recorded, tmp_path):
    model, imp = recorded
    path = tmp_path / "imp.safetensors"
    imp.save(str(path))
    back = Importance.load(str(path))
    assert back.names == imp.names
    for name in imp.names:
        assert torch.equal(back.matrices[name], imp.matrices[name])
        assert torch.equal(back.references[name][0], imp.references[name][0])
        assert torch.equal(back.references[name][1], imp.references[name][1])
    assert back.scalings == imp.scalings
    assert back.meta["xi"] == 1e-3 and back.meta["steps"] == 4 and back.meta["clamp"] == "final"
    assert back.meta["adapter_r"] == 4 and back.meta["adapter_lora_alpha"] == 8
    assert back.meta["base_model_fingerprint"] == imp.meta["base_model_fingerprint"]
    back.check(model)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")], "no temporary files left behind"


def test_bfloat16_storage_halves_omega_bytes(recorded, tmp_path):
    _, imp = recorded
    imp.save(str(tmp_path / "f32.safetensors"))
    imp.save(str(tmp_path / "bf16.safetensors"), dtype=torch.bfloat16)
    back = Importance.load(str(tmp_path / "bf16.safetensors"))
    for name in imp.names:
        assert back.matrices[name].dtype == torch.bfloat16
        assert torch.allclose(back.matrices[name].float(), imp.matrices[name], rtol=1e-2, atol=0)
    omega_bytes = sum(t.numel() for t in imp.matrices.values()) * 4
    saved = os.path.getsize(tmp_path / "f32.safetensors") - os.path.getsize(tmp_path / "bf16.safetensors")
    assert saved == omega_bytes // 2
    big = replace(imp, matrices={k: v * 0 + 1e9 for k, v in imp.matrices.items()})
    with pytest.raises(ValueError, match="beyond the range of float16"):
        big.save(str(tmp_path / "f16.safetensors"), dtype=torch.float16)
    assert not (tmp_path / "f16.safetensors").exists()


def test_truncated_corrupted_and_foreign_files_are_clear_errors(recorded, tmp_path):
    _, imp = recorded
    path = tmp_path / "imp.safetensors"
    imp.save(str(path))
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        Importance.load(str(tmp_path / "trunc.safetensors"))
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # inside the last tensor's bytes
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted"):
        Importance.load(str(tmp_path / "flip.safetensors"))
    save_file({"x": torch.ones(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an hlora-importance file"):
        Importance.load(str(tmp_path / "other.safetensors"))
    with pytest.raises(FileNotFoundError):
        Importance.load(str(tmp_path / "missing.safetensors"))
    # The early check (the hf callbacks', before any training) refuses them alike, reading no tensor.
    assert read_header(str(path))["format"] == "hlora-importance"
    (tmp_path / "head.safetensors").write_bytes(data[:4])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_header(str(tmp_path / "head.safetensors"))
    with pytest.raises(ValueError, match="not an hlora-importance file"):
        read_header(str(tmp_path / "other.safetensors"))
    with pytest.raises(FileNotFoundError):
        read_header(str(tmp_path / "missing.safetensors"))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_header(str(tmp_path))


def test_other_format_version_is_refused(recorded, tmp_path, monkeypatch):
    import hlora.importance as importance_module

    _, imp = recorded
    monkeypatch.setattr(importance_module, "FORMAT_VERSION", 99)
    imp.save(str(tmp_path / "v99.safetensors"))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="format version 99"):
        Importance.load(str(tmp_path / "v99.safetensors"))


def test_failed_write_keeps_the_old_file(recorded, tmp_path, monkeypatch):
    import hlora._io as io_module

    _, imp = recorded
    path = tmp_path / "imp.safetensors"
    imp.save(str(path))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(io_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        imp.save(str(path))
    assert path.read_bytes() == before
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_a_folder_as_the_path_is_named(recorded, tmp_path):
    _, imp = recorded
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder"):  # not the temporary file
        imp.save(str(tmp_path))
    assert not any(tmp_path.iterdir())
    # Loading names it too, rather than calling the folder a missing file.
    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder; give the path of the hlora-importance"):
        hlora.Importance.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        hlora.Importance.load(tmp_path / "absent.safetensors")


def test_text_and_json_files_are_replaced_whole_or_not_at_all(tmp_path):
    # The results, summary, benchmark and checkpoint-state JSON files go through these.
    import hlora._io as io_module

    path = tmp_path / "summary.md"
    io_module.write_text_atomic(str(path), "old ünïcode")
    with pytest.raises(UnicodeEncodeError):  # fails halfway through writing the temporary file
        io_module.write_text_atomic(str(path), "new text, then a lone surrogate \udc80")
    assert path.read_text(encoding="utf-8") == "old ünïcode"
    assert os.listdir(tmp_path) == ["summary.md"]
    io_module.write_json_atomic(str(tmp_path / "rows.json"), [{"ms": 0.5}, {"shape": (3, 4)}])
    assert json.loads((tmp_path / "rows.json").read_text()) == [{"ms": 0.5}, {"shape": [3, 4]}]
    assert sorted(os.listdir(tmp_path)) == ["rows.json", "summary.md"]


def test_check_names_every_problem(recorded):
    model, imp = recorded
    names = imp.names
    broken = Importance(dict(imp.matrices), dict(imp.references), dict(imp.scalings), dict(imp.meta))
    del broken.matrices[names[0]]
    broken.matrices["base_model.model.extra.q_proj"] = torch.ones(3, 3)
    broken.matrices[names[1]] = torch.ones(5, 7)
    with pytest.raises(ValueError) as err:
        broken.check(model)
    msg = str(err.value)
    assert f"missing: {names[0]}" in msg
    assert "extra: base_model.model.extra.q_proj" in msg
    assert f"mis-shaped: {names[1]}" in msg
    imp.check(tiny_lora_model(seed=21, r=2))  # another rank: the Regularizer pads the smaller pair
    a_ref, b_ref = imp.references[names[2]]
    unfactored = Importance(imp.matrices, {**imp.references, names[2]: (a_ref, b_ref[:, 1:])}, imp.scalings, imp.meta)
    with pytest.raises(ValueError, match=rf"mis-shaped: {names[2]} reference factors .* do not factor its weight"):
        unfactored.check(model)
    fingerprinted = Importance(imp.matrices, imp.references, imp.scalings,
                               {**imp.meta, "base_model_fingerprint": "0000"})
    with pytest.raises(ValueError, match="another architecture"):
        fingerprinted.check(model)


def test_metadata_is_plain_json(recorded, tmp_path):
    from safetensors import safe_open

    _, imp = recorded
    imp.save(str(tmp_path / "imp.safetensors"))
    with safe_open(str(tmp_path / "imp.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "hlora-importance" and meta["format_version"] == "1"
    assert json.loads(meta["names"]) == imp.names
    assert "checksum" in meta and "hlora_version" in meta


def test_plots_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from hlora.experiments import plots

    path = tmp_path / "accuracy.png"
    plots.violins({"LoRA": [0.5, 0.6], "HLoRA": [0.7, 0.8]}, str(path), "accuracy")
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")

    def half_written(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(before[:100])
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", half_written)
    with pytest.raises(OSError, match="disk full"):
        plots.violins({"LoRA": [0.1, 0.2]}, str(path), "accuracy")
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["accuracy.png"]


def test_a_diverged_seed_is_counted_on_the_violin_plot_not_dropped_unsaid(tmp_path):
    from hlora.experiments import plots

    per_method = {"LoRA": [1.0, math.nan, 2.0], "HLoRA": [0.5, 0.7, 0.6], "EWC": [math.inf, math.nan]}
    assert plots.violin_labels(per_method, {"LoRA": 0.04, "EWC": math.nan}) == [
        "LoRA\np=0.04\n1 of 3 diverged", "HLoRA", "EWC\np=nan\n2 of 2 diverged"]
    path = plots.violins(per_method, str(tmp_path / "rise.png"), "PPL rise")  # a method with no finite seed too
    assert Path(path).read_bytes()[:4] == b"\x89PNG"


def test_the_heatmap_names_norms_it_cannot_place(tmp_path):
    # A model whose matrices are not named `layers.<i>.<...>_proj` (GPT-2's h.0.attn.c_attn) had
    # the heatmap fail with "max() arg is an empty sequence".
    from hlora.experiments import plots

    with pytest.raises(ValueError, match=r"norms has no matrix named like .* \(got 1: h\.0\.attn\.c_attn\)"):
        plots.importance_heatmap({"h.0.attn.c_attn": 2.0}, str(tmp_path / "heatmap.png"))
    assert not any(tmp_path.iterdir())
    path = plots.importance_heatmap({"model.layers.3.self_attn.q_proj": 2.0, "h.0.attn.c_attn": 2.0},
                                    str(tmp_path / "heatmap.png"))
    assert Path(path).read_bytes().startswith(b"\x89PNG")


def test_to_keeps_omega_a_floating_tensor_within_range():
    imp = Importance({"m": torch.tensor([[1e6, 2.0]])}, {"m": (torch.ones(1, 2), torch.ones(1, 1))})
    with pytest.raises(TypeError, match="dtype must be a floating dtype for Ω .* got torch.int64"):
        imp.to(torch.int64)  # would keep 0 for every entry below 1
    with pytest.raises(ValueError, match="m: Ω reaches 1e\\+06, beyond the range of float16"):
        imp.to(torch.float16)
    with pytest.raises(ValueError, match="device: .*tpu"):  # torch's parse error is a RuntimeError
        imp.to("tpu")
    half = imp.to("cpu", torch.bfloat16)
    assert half.matrices["m"].dtype == torch.bfloat16 and half.references["m"][0].dtype == torch.float32
    assert imp.matrices["m"].dtype == torch.float32  # a new Importance; this one is untouched


def test_an_adapter_folder_is_replaced_whole_or_not_at_all(tmp_path):
    # `hlora record` and `hlora finetune` save their adapter through this: a crash while saving a
    # rerun's adapter must not cost the last one.
    import hlora._io as io_module

    def contents(folder):
        return {f: (folder / f).read_bytes() for f in sorted(os.listdir(folder))}

    target = tmp_path / "adapter"
    first = tiny_lora_model(seed=22)
    with io_module.atomic_folder(str(target)) as folder:
        first.save_pretrained(folder)
    saved = contents(target)
    assert "adapter_config.json" in saved and "adapter_model.safetensors" in saved
    second = tiny_lora_model(seed=23)
    with pytest.raises(OSError, match="disk full"):
        with io_module.atomic_folder(str(target)) as folder:
            second.save_pretrained(folder)  # written whole, then the disk fills before the swap
            raise OSError("disk full")
    assert contents(target) == saved
    assert os.listdir(tmp_path) == ["adapter"], "no temporary folder left behind"
    with io_module.atomic_folder(str(target)) as folder:
        second.save_pretrained(folder)
    assert contents(target)["adapter_model.safetensors"] != saved["adapter_model.safetensors"]
    assert os.listdir(tmp_path) == ["adapter"], "the old folder removed once the new one is in place"
    # A link to a folder is replaced, the folder it names kept.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked").symlink_to(elsewhere)
    with io_module.atomic_folder(str(tmp_path / "linked")) as folder:
        second.save_pretrained(folder)
    assert not (tmp_path / "linked").is_symlink() and (tmp_path / "linked" / "adapter_config.json").is_file()
    assert elsewhere.is_dir() and sorted(os.listdir(tmp_path)) == ["adapter", "elsewhere", "linked"]
    (tmp_path / "a-file").write_text("")
    with pytest.raises(NotADirectoryError, match="a-file is a file"):
        with io_module.atomic_folder(str(tmp_path / "a-file")):
            pass


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_and_folders_get_the_permissions_the_umask_gives(recorded, tmp_path, umask):
    # The temporary files and folders they are written through are private (0600/0700); what takes
    # the target's place must be as readable as a plain open() or mkdir() would have made it.
    import stat

    import hlora._io as io_module

    _, imp = recorded
    old = os.umask(umask)
    try:
        imp.save(str(tmp_path / "imp.safetensors"))
        io_module.write_text_atomic(str(tmp_path / "summary.md"), "text")
        with io_module.atomic_folder(str(tmp_path / "adapter")) as folder:
            tiny_lora_model(seed=24).save_pretrained(folder)
    finally:
        os.umask(old)
    for name in ("imp.safetensors", "summary.md"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name
    assert stat.S_IMODE(os.stat(tmp_path / "adapter").st_mode) == 0o777 & ~umask
    # A file replaced keeps the permissions its owner gave it, as one rewritten in place does.
    os.chmod(tmp_path / "summary.md", 0o640)
    io_module.write_text_atomic(str(tmp_path / "summary.md"), "new text")
    assert stat.S_IMODE(os.stat(tmp_path / "summary.md").st_mode) == 0o640
