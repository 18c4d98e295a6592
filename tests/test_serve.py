"""Tests for minipt.serve: mixed-prompt batches equal each request alone (with and without the prompt-prefix KV
cache), eos per row, the prefix cache equals a full forward's keys and values, and every bad request fails
clearly before any generation. Equality tests use float64 random models with large weights, so that greedy
tokens depend on the input and no rounding tie can flip an argmax."""

import pytest
import torch

from helpers import random_gpt
from minipt import PromptBank, PromptTuning
from minipt.checkpoint import CheckpointError
from minipt.model import KVCache
from minipt.serve import RequestError, encode_requests, generate_text
from minipt.tokenizer import ByteTokenizer
from minipt.userdata import DataError

CFG = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=64)


def f64_model(seed=0):
    return random_gpt(CFG, seed=seed, std=0.5).double().eval()


def prompt(model, n_p, seed):
    g = torch.Generator().manual_seed(seed)
    # the reference op: TRITON_INTERPRET=1 runs the kernel on CPU in the interpreter, slowly (one test below does)
    return PromptTuning.from_tensor(model, torch.randn(n_p, model.config.n_embd, generator=g), backend="reference")


@pytest.fixture
def bank_and_requests():
    model = f64_model()
    prompts = {"a": prompt(model, 3, 1), "b": prompt(model, 7, 2), "c": prompt(model, 12, 3)}
    g = torch.Generator().manual_seed(4)
    names = ["a", "b", "c"]
    requests = [
        (names[i % 3], torch.randint(50, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist())
        for i in range(14)
    ]
    return model, prompts, requests


def alone(pt, ids, max_new, eos_id=None):
    out = pt.generate(torch.tensor([ids]), max_new, temperature=0, eos_id=eos_id)[0, len(ids) :].tolist()
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id) + 1]
    return out


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("max_batch", [64, 5])
def test_mixed_batch_equals_each_request_alone(bank_and_requests, prefix_cache, max_batch):
    model, prompts, requests = bank_and_requests
    bank = PromptBank(model, prompts, backend="auto" if max_batch == 5 else "reference")  # auto: the kernel
    answers = bank.generate(requests, max_new_tokens=6, prefix_cache=prefix_cache, max_batch=max_batch)
    expected = [alone(prompts[name], ids, 6) for name, ids in requests]
    assert answers == expected
    assert len({tuple(a) for a in answers}) > 7  # the answers depend on the request


def test_alone_with_cache_equals_the_no_cache_reference(bank_and_requests):
    _, prompts, requests = bank_and_requests
    for name, ids in requests[:4]:
        pt, idx = prompts[name], torch.tensor([ids])
        assert torch.equal(pt.generate(idx, 6, temperature=0), pt.generate(idx, 6, temperature=0, use_cache=False))


def test_eos_stops_each_row_at_its_first_eos(bank_and_requests):
    model, prompts, requests = bank_and_requests
    bank = PromptBank(model, prompts, backend="reference")
    free = bank.generate(requests, max_new_tokens=8)
    eos = max(set(t for a in free for t in a), key=lambda t: sum(t in a for a in free))  # a common token
    answers = bank.generate(requests, max_new_tokens=8, eos_id=eos)
    assert any(len(a) < 8 for a in answers)
    for a, f in zip(answers, free):
        cut = f[: f.index(eos) + 1] if eos in f else f
        assert a == cut
    assert answers == [alone(prompts[n], ids, 8, eos_id=eos) for n, ids in requests]


def test_per_request_budgets(bank_and_requests):
    model, prompts, requests = bank_and_requests
    bank = PromptBank(model, prompts, backend="reference")
    budgets = [1 + i % 4 for i in range(len(requests))]
    answers = bank.generate(requests, max_new_tokens=budgets)
    full = bank.generate(requests, max_new_tokens=4)
    assert answers == [f[:n] for f, n in zip(full, budgets)]


def test_prefix_kv_equals_a_full_forward():
    model = f64_model()
    pt = prompt(model, 5, 0)
    bank = PromptBank(model, {"p": pt}, backend="reference")
    k, v = bank.prefix_kv("p")  # (n_layer, n_head, P, head_dim)
    idx = torch.randint(50, (1, 9))
    cache = KVCache.for_model(model, 1, 5 + 9)
    model.body(pt.embed(idx), cache)  # the prompt and the input, one full prefill
    assert k.shape == (2, 2, 5, 16)
    k_full, v_full = cache.row(0)  # (n_layer, n_head, T_max, head_dim) each
    torch.testing.assert_close(k, k_full[:, :, :5], rtol=0, atol=1e-12)
    torch.testing.assert_close(v, v_full[:, :, :5], rtol=0, atol=1e-12)


@pytest.mark.parametrize("use_cache", [True, False])
def test_single_prompt_generate_with_mask_equals_unpadded_rows(use_cache):
    model = f64_model()
    pt = prompt(model, 4, 0)
    lengths = [3, 9, 1, 6]
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(50, (n,), generator=g) for n in lengths]
    idx = torch.zeros(4, 9, dtype=torch.long)
    mask = torch.zeros(4, 9, dtype=torch.long)
    for b, r in enumerate(rows):
        idx[b, : len(r)], mask[b, : len(r)] = r, 1
    out = pt.generate(idx, 7, temperature=0, attention_mask=mask, use_cache=use_cache)
    for b, r in enumerate(rows):
        assert out[b, 9:].tolist() == pt.generate(r[None], 7, temperature=0)[0, len(r) :].tolist()
    # the base model too
    out = model.generate(idx, 5, temperature=0, attention_mask=mask)
    for b, r in enumerate(rows):
        assert out[b, 9:].tolist() == model.generate(r[None], 5, temperature=0)[0, len(r) :].tolist()


def test_bank_prompt_index_with_mask_equals_rows():
    model = f64_model()
    P = torch.randn(2, 4, 32, dtype=torch.float64)
    pt = PromptTuning.from_tensor(model, P, backend="reference")
    idx = torch.randint(50, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 2 + [0] * 4, [1] * 4 + [0] * 2])
    k = torch.tensor([0, 1, 1])
    out = pt.generate(idx, 5, temperature=0, attention_mask=mask, prompt_index=k)
    ref = pt.generate(idx, 5, temperature=0, attention_mask=mask, prompt_index=k, use_cache=False)
    assert torch.equal(out, ref)


# ---- bad input: a clear error naming the request, before any generation -----------------------------------


def test_bad_requests_fail_before_any_generation(bank_and_requests, monkeypatch):
    model, prompts, _ = bank_and_requests
    bank = PromptBank(model, prompts, backend="reference")
    monkeypatch.setattr(bank, "_generate_batch", lambda *a: pytest.fail("generation started"))
    good = ("a", [1, 2])
    cases = [
        ([good, ("nope", [1])], r"request 1: unknown prompt name 'nope'"),
        ([good, good, ("b", [])], r"request 2: empty request"),
        ([("c", [1] * 50)], r"request 0: prompt 'c' \(12\) \+ 50 tokens \+ max_new_tokens 4 = 66 exceeds"),
        ([good, ("a", [1, 50])], r"request 1: token id 50 is outside \[0, vocab_size=50\)"),
        ([good, ("a", [-1])], r"request 1: token id -1"),
        ([("a", "abc")], r"request 0: token ids must be a list of ints"),
    ]
    for requests, match in cases:
        with pytest.raises(RequestError, match=match):
            bank.generate(requests, max_new_tokens=4)


def test_a_prompt_for_another_model_is_refused(tmp_path):
    model, other = f64_model(0), f64_model(1)
    with pytest.raises(CheckpointError, match="'x' was made for another base model"):
        PromptBank(model, {"ok": prompt(model, 3, 0), "x": prompt(other, 3, 0)})
    prompt(other, 3, 0).save(tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="another base model"):
        PromptBank(model, {"x": tmp_path / "x.safetensors"})
    wide = random_gpt({**CFG, "n_embd": 16}).double()
    with pytest.raises(CheckpointError, match="width 16"):
        PromptBank(model, {"w": prompt(wide, 3, 0)})


def test_prompt_files_load_into_the_bank(tmp_path, bank_and_requests):
    model, prompts, requests = bank_and_requests
    prompts["b"].save(tmp_path / "b.safetensors")
    bank = PromptBank(
        model, {"a": prompts["a"], "b": str(tmp_path / "b.safetensors"), "c": prompts["c"]}, backend="reference"
    )
    assert bank.generate(requests, 3) == PromptBank(model, prompts, backend="reference").generate(requests, 3)


# ---- the command line, end to end on the shipped model -------------------------------------------------------


def tuned_prompt(model, task, n_prompt, steps=3):
    """A prompt tuned for a few steps (enough to be a real prompt file; not enough to be good)."""
    from minipt.data import collate
    from minipt.tasks import make_split
    from minipt.tokenizer import ByteTokenizer

    pt = PromptTuning(model, n_prompt=n_prompt, init="vocab", tokenizer=ByteTokenizer(), backend="reference")
    opt = torch.optim.AdamW([pt.prompt], lr=0.1)
    idx, targets, mask = collate(make_split(task, "train", 8), ByteTokenizer(), instruction=False)
    for _ in range(steps):
        opt.zero_grad()
        pt.loss(idx, targets, mask).backward()
        opt.step()
    return pt


def test_cli_serve_end_to_end(tmp_path, capsys):
    import json

    from minipt.apps.cli import main
    from minipt.assets import load_base
    from minipt.tokenizer import ByteTokenizer

    model = load_base()
    pts = {"upper": tuned_prompt(model, "upper", 4), "parity": tuned_prompt(model, "parity", 9)}
    for name, pt in pts.items():
        pt.save(tmp_path / f"{name}.safetensors")
    records = [
        {"task": "upper", "input": "abc"},
        {"task": "parity", "input": "1234"},
        {"task": "upper", "input": "hello"},
        {"task": "parity", "input": "7"},
    ]
    (tmp_path / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    args = [
        "serve",
        "--prompt",
        f"upper={tmp_path / 'upper.safetensors'}",
        "--prompt",
        f"parity={tmp_path / 'parity.safetensors'}",
        "--requests",
        str(tmp_path / "requests.jsonl"),
        "--max-new-tokens",
        "6",
        "--no-progress",
    ]
    assert main([*args, "--out", str(tmp_path / "answers.jsonl")]) == 0
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [(a["task"], a["input"]) for a in answers] == [(r["task"], r["input"]) for r in records]
    tok = ByteTokenizer()
    for a in answers:  # each answer is what the prompt gives alone, decoded up to <eos>
        ids = tok.encode(a["input"]) + [tok.sep_id]
        loaded = PromptTuning.load(model, tmp_path / f"{a['task']}.safetensors")
        new = alone(loaded, ids, 6, eos_id=tok.eos_id)
        assert a["output"] == tok.decode([t for t in new if t != tok.eos_id])
    # stdout, and the errors: an unknown task (named with its line) and a bad line, before any work
    capsys.readouterr()
    assert main(args) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == answers
    (tmp_path / "bad.jsonl").write_text(json.dumps(records[0]) + "\n" + json.dumps({"task": "nope", "input": "x"}))
    bad = [a if a != str(tmp_path / "requests.jsonl") else str(tmp_path / "bad.jsonl") for a in args]
    assert main(bad) == 2
    assert "bad.jsonl:2: unknown task 'nope'" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text(
        json.dumps(records[0]) + "\n" + json.dumps({"task": "upper", "input": "x" * 200})
    )
    assert main(bad) == 2
    assert "bad.jsonl:2: prompt 'upper' (4) + 201 tokens" in capsys.readouterr().err
    assert main([*args[:-1], "--prompt", "oops"]) == 2


def test_bench_serve_smoke(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # nothing runs at import
    out = tmp_path / "serve.csv"
    rows = bench.main(["--smoke", "--no-peft", "--out", str(out)])["pico"]
    assert {r["config"] for r in rows} == {"alone", "mixed", "mixed-prefix"}
    assert all(r["agree"] == "1.000" for r in rows)  # mixed batches give the reference's tokens
    text = out.read_text()
    assert text.startswith("# bench_serve.py") and "# preset pico: python benchmarks/bench_serve.py --smoke" in text
    assert out.with_suffix(".png").is_file()


def test_encode_requests_writes_the_tuning_format_and_names_a_bad_line():
    tok = ByteTokenizer()
    model = random_gpt(dict(CFG, vocab_size=tok.vocab_size), seed=0).eval()
    bank = PromptBank(model, {"a": prompt(model, 3, 1)}, backend="reference")
    assert encode_requests(bank, tok, [("a", "hi")], 4) == [("a", tok.encode("hi") + [tok.sep_id])]
    with pytest.raises(DataError, match=r"^req.jsonl:2: unknown prompt name 'b'"):  # lines count from 1
        encode_requests(bank, tok, [("a", "hi"), ("b", "hi")], 4, source="req.jsonl")


class Scripted:
    """A module whose generate appends fixed tokens, and records what it was given."""

    def __init__(self, new):
        self.new = new

    def generate(self, idx, max_new_tokens, **sampling):
        self.seen = idx[0].tolist(), max_new_tokens, sampling
        return torch.cat([idx, torch.tensor([self.new])], dim=1)


def test_generate_text_reads_and_ends_answers_as_the_tasks_do():
    tok = ByteTokenizer()
    new = tok.encode("yes") + [tok.eos_id] + tok.encode("zz")
    module = Scripted(new)
    assert generate_text(module, tok, "ab", 9, task_format=True, temperature=0.5) == "yes"
    assert module.seen == (tok.encode("ab") + [tok.sep_id], 9, {"temperature": 0.5})
    assert generate_text(module, tok, "ab", 9) == tok.decode(new)  # plain text: no <sep>, no cut
    assert module.seen[0] == tok.encode("ab")
