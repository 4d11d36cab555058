"""The shipped data (checksums, disjoint splits, schema), the hub-schema loaders on local files,
the metrics against direct computations, the EWC Fisher against per-sequence gradients, and the
t-tests against known values."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re

import pytest
import torch

from hlora.adapters import find_adapted
from hlora.experiments import data, stats
from hlora.experiments import eval as metrics
from hlora.experiments.baselines.ewc import EWCPenalty, empirical_fisher

from tiny import VOCAB, tiny_lora_model


def test_shipped_files_match_their_manifest():
    manifest = json.load(open(os.path.join(data.FILES, "MANIFEST.json")))
    for name, entry in manifest.items():
        digest = hashlib.sha256(open(os.path.join(data.FILES, name), "rb").read()).hexdigest()
        assert digest == entry["sha256"], name
        assert entry["licence"]
    total = sum(os.path.getsize(os.path.join(data.FILES, n)) for n in manifest)
    assert total < 5e6, "the package ships a few MB at most"


@pytest.mark.parametrize("domain", data.DOMAINS)
def test_domain_splits_are_disjoint_and_valid(domain):
    splits = {s: data.mcq(domain, s) for s in data.SPLITS}
    questions = {s: {it["question"] for it in items} for s, items in splits.items()}
    assert not questions["train"] & questions["test"]
    assert not questions["train"] & questions["val"]
    assert not questions["val"] & questions["test"]
    for item in splits["test"]:
        answer = item["options"][item["answer"]]
        assert len(item["options"]) == 4 and len(set(item["options"])) == 4
        assert not re.search(r"\b" + re.escape(answer.lower()) + r"\b", item["question"].lower())
    if domain == "medical":
        assert len(splits["test"]) >= 500


def test_the_general_knowledge_set_is_valid_and_its_splits_disjoint():
    test, val = data.general_knowledge("test"), data.general_knowledge("val")
    assert len(test) == 300 and len(val) == 100
    assert not {it["question"] for it in test} & {it["question"] for it in val}
    for item in test + val:
        answer = item["options"][item["answer"]]
        assert len(set(item["options"])) == 4 and answer.isalpha() and answer.islower()
        assert not re.search(r"\b" + re.escape(answer) + r"\b", item["question"].lower())
        # Scored in prose, not in the Question/Answer frame domain training teaches.
        definition = re.fullmatch(r"Which word means '(.+)'\?", item["question"]).group(1)
        assert data.prompt(item) == f"The word for '{definition}' is"
    with pytest.raises(ValueError, match="no training split"):
        data.general_knowledge("train")


def test_general_test_text_is_never_trained_on():
    train = set(data.general_text("train").split("\n\n"))
    test = data.general_text("test").split("\n\n")
    assert len(test) > 100 and not train.intersection(test)


def test_hub_schemas_from_local_files(tmp_path):
    sciq = tmp_path / "sciq.jsonl"
    sciq.write_text(json.dumps({"question": "What gas do plants absorb?", "correct_answer": "carbon dioxide",
                                "distractor1": "oxygen", "distractor2": "helium", "distractor3": "neon",
                                "support": ""}) + "\n")
    piqa = tmp_path / "piqa.jsonl"
    piqa.write_text(json.dumps({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "freeze it", "label": 0}) + "\n")
    med = tmp_path / "medmcqa.json"
    med.write_text(json.dumps([{"question": "Vitamin C deficiency causes?", "opa": "scurvy", "opb": "rickets",
                                "opc": "beriberi", "opd": "pellagra", "cop": 0}]))
    pile = tmp_path / "pile.jsonl"
    pile.write_text("\n".join(json.dumps({"text": t, "meta": {}}) for t in ("first doc", "second doc")))
    assert data.hub_mcq("sciq", path=str(sciq))[0]["options"][0] == "carbon dioxide"
    assert data.hub_mcq("piqa", path=str(piqa))[0] == {"question": "Open a jar",
                                                      "options": ["twist the lid", "freeze it"], "answer": 0}
    assert data.hub_mcq("medmcqa", path=str(med))[0]["answer"] == 0
    assert data.hub_text("pile", path=str(pile)) == "first doc\n\nsecond doc"
    with pytest.raises(ValueError, match="name must be one of"):
        data.hub_mcq("mmlu", path=str(sciq))


def test_a_medmcqa_file_of_the_original_release_is_read_with_its_answers_counted_from_one(tmp_path):
    """The original release ships JSON lines as .json, with cop 1..4; a datasets export counts from
    0. Read the wrong way, every answer would name the option after the right one."""
    rows = [{"question": f"q{i}", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": cop, "choice_type": "single"}
            for i, cop in enumerate([1, 4, 2, 3])]
    original = tmp_path / "dev.json"
    original.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert [it["answer"] for it in data.hub_mcq("medmcqa", path=str(original))] == [0, 3, 1, 2]
    export = tmp_path / "export.jsonl"
    export.write_text("\n".join(json.dumps({**r, "cop": r["cop"] - 1}) for r in rows))
    assert [it["answer"] for it in data.hub_mcq("medmcqa", path=str(export))] == [0, 3, 1, 2]
    unsure = tmp_path / "unsure.json"
    unsure.write_text(json.dumps([{**r, "cop": 2} for r in rows]))
    with pytest.raises(ValueError, match="'cop' is never 0 or 4.*cop_base=0 or cop_base=1"):
        data.hub_mcq("medmcqa", path=str(unsure))
    assert [it["answer"] for it in data.hub_mcq("medmcqa", path=str(unsure), cop_base=1)] == [1, 1, 1, 1]
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([{**rows[0], "cop": 0}, {**rows[1], "cop": 4}]))
    with pytest.raises(ValueError, match="takes both 0 and 4"):
        data.hub_mcq("medmcqa", path=str(mixed))
    for bad in (2, True, "1"):
        with pytest.raises(ValueError, match="cop_base must be 0 or 1"):
            data.hub_mcq("medmcqa", path=str(original), cop_base=bad)
    unlabeled = tmp_path / "test.json"
    unlabeled.write_text(json.dumps([{**r, "cop": -1} for r in rows]))
    with pytest.raises(ValueError, match="the hub's test split of medmcqa is unlabeled"):
        data.hub_mcq("medmcqa", path=str(unlabeled))
    piqa = tmp_path / "piqa_test.jsonl"
    piqa.write_text(json.dumps({"goal": "g", "sol1": "a", "sol2": "b", "label": -1}))
    with pytest.raises(ValueError, match="the hub's test split of piqa is unlabeled"):
        data.hub_mcq("piqa", path=str(piqa))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"broken.json:2: not valid JSON"):
        data.hub_mcq("medmcqa", path=str(broken))


def test_mcq_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "options": ["a", "b"], "answer": 2}\n')
    with pytest.raises(ValueError, match="answer"):
        data.load_mcq_file(str(bad))
    bad.write_text('{"question": "q", "options": ["a", "b"], "answer": true}\n')  # was read as option 1
    with pytest.raises(ValueError, match="'answer' must be the index"):
        data.load_mcq_file(str(bad))
    bad.write_text('{"question": "q", "prompt": 3, "options": ["a", "b"], "answer": 0}\n')
    with pytest.raises(ValueError, match="'prompt', where given, must be a string"):
        data.load_mcq_file(str(bad))
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match=":1: not valid JSON"):
        data.load_mcq_file(str(bad))
    with pytest.raises(ValueError, match="domain must be one of"):
        data.mcq("law")
    bad.write_bytes('{"question": "caf\u00e9?", "options": ["a", "b"], "answer": 0}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"bad.jsonl: not UTF-8 text \(byte 0xe9 on line 1\)"):
        data.load_mcq_file(str(bad))
    # One item per "\n"-line, whatever the line ending, and a U+2028 inside a string is no line break.
    bad.write_bytes('{"question": "two\u2028lines", "options": ["a", "b"], "answer": 1}\r\n\r\n'.encode())
    (item,) = data.load_mcq_file(str(bad))
    assert item["question"] == "two\u2028lines" and item["answer"] == 1


class CharTokenizer:
    """Bytes as tokens (mod the tiny vocabulary): enough to drive the metrics on a tiny model."""

    pad_token_id = 0
    eos_token_id = 1

    class _Out:
        def __init__(self, ids, tensors):
            self.input_ids = torch.tensor([ids]) if tensors == "pt" else ids

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        return self._Out([2 + (b % (VOCAB - 2)) for b in text.encode()], return_tensors)


def test_perplexity_is_exp_of_token_mean_nll():
    model = tiny_lora_model(seed=70)
    blocks = metrics.token_blocks(CharTokenizer(), "hello world, " * 40, seq_len=16, max_blocks=5)
    assert blocks.shape == (5, 16)
    got = metrics.perplexity(model, blocks, batch_size=2)
    with torch.no_grad():
        want = float(model(input_ids=blocks, labels=blocks).loss)  # equal-length blocks: mean over tokens
    assert got["tokens"] == 5 * 15
    assert got["ppl"] == pytest.approx(math.exp(want), rel=1e-5)


def test_metrics_refuse_what_they_cannot_measure():
    model = tiny_lora_model(seed=73)
    tok = CharTokenizer()
    text = "hello world, " * 40
    blocks = metrics.token_blocks(tok, text, seq_len=16)
    with pytest.raises(ValueError, match="seq_len must be >= 2"):  # a one-token block predicts nothing
        metrics.token_blocks(tok, text, seq_len=1)
    with pytest.raises(TypeError, match="seq_len must be an integer, got float"):
        metrics.token_blocks(tok, text, seq_len=16.0)
    with pytest.raises(ValueError, match="max_blocks must be >= 1"):
        metrics.token_blocks(tok, text, seq_len=16, max_blocks=0)
    for bad, error, match in [(blocks[:0], ValueError, r"n >= 1 .* got shape \[0, 16\]"),
                              (blocks[:, :1], ValueError, r"seq_len >= 2, got shape \[32, 1\]"),
                              (blocks[0], ValueError, r"\(n, seq_len\)"),
                              (blocks.float(), TypeError, "integer token ids, got float32"),
                              (blocks.tolist(), TypeError, "blocks must be a torch.Tensor")]:
        with pytest.raises(error, match=match):
            metrics.perplexity(model, bad)
    for batch_size, error in [(0, ValueError), (True, TypeError), (2.0, TypeError)]:
        with pytest.raises(error, match="batch_size"):
            metrics.perplexity(model, blocks, batch_size=batch_size)
        with pytest.raises(error, match="batch_size"):
            metrics.mcq_accuracy(model, tok, [{"question": "Q?", "options": ["a", "b"], "answer": 0}],
                                 batch_size=batch_size)
    with pytest.raises(ValueError, match="items is empty"):  # not a ZeroDivisionError after the model ran
        metrics.mcq_accuracy(model, tok, [])


def test_a_diverged_model_has_infinite_perplexity_not_an_overflow():
    model = tiny_lora_model(seed=74)
    blocks = metrics.token_blocks(CharTokenizer(), "hello world, " * 40, seq_len=16, max_blocks=2)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1e5)  # logits of ~1e5: NLL far past exp's range
    got = metrics.perplexity(model, blocks)
    assert got["nll"] > 710 and math.isfinite(got["nll"]) and got["ppl"] == math.inf


def test_mcq_scores_match_unpadded_scoring():
    model = tiny_lora_model(seed=71)
    tok = CharTokenizer()
    # Prompts of different lengths; options of one token (" ") to many; an option count other than 4.
    items = [{"question": "Which?", "options": ["a", "bbb", "", "dddd"], "answer": 1},
             {"question": "A much longer question here?", "options": ["x", "yy"], "answer": 0},
             {"question": "Not what is scored?", "prompt": "Scored after this prose", "options": ["p", "qq"],
              "answer": 1},
             {"question": "Odd?", "options": ["a long option, many tokens", "b", "c"], "answer": 2}]
    want = []
    for item in items:
        # An item's own "prompt" replaces the Question/Answer frame.
        ctx = tok(item.get("prompt", f"Question: {item['question']}\nAnswer:")).input_ids
        want.append([])
        for option in item["options"]:
            cont = tok(" " + option).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].float(), -1)
            want[-1].append(sum(float(logp[len(ctx) - 1 + k, c]) for k, c in enumerate(cont)))
    for batch_size in (1, 2, 3, 32):  # prompts (and continuations) per pass: chunk borders everywhere
        scores = metrics.option_logprobs(model, tok, items, batch_size=batch_size)
        assert [len(s) for s in scores] == [4, 2, 2, 3]
        for got, expected in zip(scores, want):
            assert got == pytest.approx(expected, abs=1e-4)
    acc = metrics.mcq_accuracy(model, tok, items)
    assert acc["n"] == 4 and 0 <= acc["acc"] <= 1 and 0 <= acc["acc_norm"] <= 1


def test_the_scoring_check_scripts_whole_sequence_scorer_agrees():
    """scripts/mcq_scoring_check.py times the cached scorer against the former one, kept there."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "scripts", "mcq_scoring_check.py")
    spec = importlib.util.spec_from_file_location("mcq_scoring_check", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model, tok = tiny_lora_model(seed=75), CharTokenizer()
    items = [{"question": "Q" * n, "options": ["a" * n, "b", "cc" * n], "answer": 0} for n in range(1, 6)]
    whole = script.whole_sequence_logprobs(model, tok, items, batch_size=4)
    cached = metrics.option_logprobs(model, tok, items, batch_size=2)
    for w, c in zip(whole, cached):
        assert c == pytest.approx(w, abs=1e-4)
    assert metrics.choices(whole, items) == metrics.choices(cached, items)


def test_ewc_fisher_is_the_mean_of_per_sequence_squared_gradients():
    model = tiny_lora_model(seed=72)
    seqs = torch.randint(2, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    fisher = empirical_fisher(model, seqs)
    assert fisher.sequences == 3 and fisher.nbytes > 0
    name = find_adapted(model)[0].name
    weight = dict(model.named_modules())[name].base_layer.weight
    per_seq = []
    weight.requires_grad_(True)
    with model.disable_adapter():
        for s in seqs:
            loss = model(input_ids=s[None], labels=s[None]).loss
            per_seq.append(torch.autograd.grad(loss, weight)[0])
    weight.requires_grad_(False)
    want = torch.stack([g.square() for g in per_seq]).mean(0)
    batch_mean_sq = torch.stack(per_seq).mean(0).square()
    assert torch.allclose(fisher.matrices[name], want, rtol=1e-4, atol=1e-10)
    assert not torch.allclose(fisher.matrices[name], batch_mean_sq, rtol=1e-2), "not the square of the mean"
    assert all(p.requires_grad for m in find_adapted(model) for p in (m.a, m.b)), "LoRA params restored"
    penalty = EWCPenalty(model, fisher, lam=2.0)
    assert float(penalty.penalty().detach()) == 0.0  # fresh adapter: B = 0, anchored at W0
    for lam, error in [(-1.0, ValueError), (math.nan, ValueError), (True, TypeError)]:
        with pytest.raises(error, match="lam"):
            EWCPenalty(model, fisher, lam=lam)
    with pytest.raises(TypeError, match="fisher must be an hlora.experiments.baselines.ewc.Fisher, got dict"):
        EWCPenalty(model, fisher.matrices, lam=2.0)
    with pytest.raises(ValueError, match="sequences is empty"):  # was a NaN Fisher (0/0)
        empirical_fisher(model, seqs[:0])


def test_ewc_fisher_is_out_by_in_for_fan_in_fan_out_layers():
    # GPT-2's Conv1D stores W as (in, out); F must still be (out, in), like s·B·A — for a square
    # c_proj a transposed F would pass every shape check.
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                            lora_dropout=0.0))
    seqs = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    fisher = empirical_fisher(model, seqs)
    modules = dict(model.named_modules())
    for m in find_adapted(model):
        f = fisher.matrices[m.name]
        assert f.shape == m.shape, m.name
        weight = modules[m.name].base_layer.weight  # (in, out)
        weight.requires_grad_(True)
        with model.disable_adapter():
            grads = [torch.autograd.grad(model(input_ids=s[None], labels=s[None]).loss, weight)[0] for s in seqs]
        weight.requires_grad_(False)
        torch.testing.assert_close(f, torch.stack(grads).square().mean(0).t(), rtol=1e-4, atol=1e-12)
    EWCPenalty(model, fisher, lam=1.0).penalty()


def test_lora_variants_are_refused_and_embedding_adapters_named():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    dora = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ValueError, match=r"q_proj: adapter 'default' is a LoRA variant \(Dora"):
        find_adapted(dora)
    emb = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    with pytest.warns(UserWarning, match="embed_tokens.*trained without importance or penalty"):
        found = find_adapted(emb)
    assert [m.name.split(".")[-1] for m in found] == ["q_proj"]


def test_t_tests_against_known_values():
    assert stats.t_two_sided_p(2.0, 10) == pytest.approx(0.07339, abs=1e-4)
    assert stats.t_two_sided_p(0.0, 5) == pytest.approx(1.0)
    t, p = stats.welch([1, 2, 3, 4, 5], [2, 3, 4, 5, 9])
    assert t == pytest.approx(-1.1429, abs=1e-3) and p == pytest.approx(0.2937, abs=2e-3)
    t, p = stats.paired([1, 2, 3, 4], [1.5, 2.1, 3.7, 4.2])
    assert p == pytest.approx(0.0723, abs=1e-3)
    with pytest.raises(ValueError):
        stats.welch([1.0], [2.0, 3.0])


def test_t_tests_give_no_p_value_for_a_diverged_run():
    """A run whose perplexity is NaN or inf has no p-value: NaN, never p = 0 ("significant")."""
    for bad in (math.nan, math.inf):
        assert math.isnan(stats.welch([1.0, bad, 2.0], [1.0, 2.0, 3.0])[1])
        assert math.isnan(stats.paired([1.0, bad, 2.0], [1.0, 2.0, 2.5])[1])
    assert math.isnan(stats.t_two_sided_p(math.nan, 4))
    assert stats.t_two_sided_p(math.inf, 4) == 0.0  # a finite sample with zero spread can be certain
    assert stats.paired([1.0, 2.0], [2.0, 3.0]) == (-math.inf, 0.0)
    with pytest.raises(ValueError, match="df must be > 0"):
        stats.t_two_sided_p(1.0, 0)
