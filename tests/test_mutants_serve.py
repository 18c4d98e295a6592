"""Tests that each kill planted bugs mutation testing (`make mutate MODULE=minipt/serve.py`, README "Mutation
testing") found in minipt/serve.py: how requests are read and checked, and how a bank is built and serves them.
Models are tiny, random and float64, as in tests/test_serve.py."""

import json
import re

import pytest
import torch

from helpers import random_gpt
from minipt import PromptBank, PromptTuning
from minipt.checkpoint import CheckpointError
from minipt.model import KVCache
from minipt.serve import RequestError, encode_requests, read_requests
from minipt.tokenizer import ByteTokenizer
from minipt.userdata import DataError

CFG = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=64)


def f64_model(seed=0, **config):
    return random_gpt({**CFG, **config}, seed=seed, std=0.5).double().eval()


def prompt(model, n_p, seed):
    g = torch.Generator().manual_seed(seed)
    return PromptTuning.from_tensor(model, torch.randn(n_p, model.config.n_embd, generator=g), backend="reference")


# ---- read_requests and encode_requests ------------------------------------------------------------------------


def requests_file(tmp_path, *records) -> str:
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_a_missing_requests_file_is_named_as_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^no such requests file: {re.escape(str(tmp_path / 'r.jsonl'))}$"):
        read_requests(tmp_path / "r.jsonl")


def test_a_request_with_another_key_is_refused_and_shown_cut_at_80_characters(tmp_path):
    record = {"task": "t", "input": "x" * 100, "priority": 1}
    path = requests_file(tmp_path, {"task": "t", "input": "a"}, record)
    expected = f'{path}:2: expected {{"task": NAME, "input": TEXT}}, got {json.dumps(record)[:80]}'
    with pytest.raises(DataError, match=f"^{re.escape(expected)}$"):
        read_requests(path)


@pytest.mark.parametrize("record", [{"task": "t", "input": 3}, {"task": 3, "input": "a"}])
def test_a_task_or_input_that_is_not_a_string_is_refused(tmp_path, record):
    path = requests_file(tmp_path, record)
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:1: 'task' and 'input' must be strings$"):
        read_requests(path)


def test_encode_requests_names_its_source_requests_by_default():
    tok = ByteTokenizer()
    model = f64_model(vocab_size=tok.vocab_size)
    bank = PromptBank(model, {"a": prompt(model, 3, 1)}, backend="reference")
    with pytest.raises(DataError, match=r"^requests:1: unknown prompt name 'b'"):
        encode_requests(bank, tok, [("b", "hi")], 4)


# ---- the KV cache of a batch ------------------------------------------------------------------------------------


def alone(pt, ids, max_new):
    return pt.generate(torch.tensor([ids]), max_new, temperature=0)[0, len(ids) :].tolist()


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_a_prompt_longer_than_the_model_is_wide_is_served(prefix_cache):
    model = f64_model()
    long = prompt(model, model.config.n_embd + 8, 1)  # 40 vectors of width 32
    bank = PromptBank(model, {"long": long}, backend="reference")
    assert bank.generate([("long", [1, 2])], 3, prefix_cache=prefix_cache) == [alone(long, [1, 2], 3)]


@pytest.mark.parametrize("prefix_cache, T_max", [(True, 7 + 5 + 4), (False, max(3 + 5, 7 + 2) + 4)])
def test_a_batchs_kv_cache_holds_exactly_the_positions_it_uses(monkeypatch, prefix_cache, T_max):
    """With the prefix cache: the longest prompt + the longest input + max_new_tokens; without: the longest
    prompt-and-input row + max_new_tokens (the cache of each prompt's prefix holds that prompt alone)."""
    model = f64_model()
    sizes, for_model = [], KVCache.for_model.__func__

    def recorded(cls, model, B, T_max, dtype=None):
        sizes.append((B, T_max))
        return for_model(cls, model, B, T_max, dtype)

    monkeypatch.setattr(KVCache, "for_model", classmethod(recorded))
    bank = PromptBank(model, {"a": prompt(model, 3, 1), "b": prompt(model, 7, 2)}, backend="reference")
    bank.generate([("a", [1, 2, 3, 4, 5]), ("b", [1, 2])], 4, prefix_cache=prefix_cache)
    assert sizes == [(2, T_max)] + ([(1, 3), (1, 7)] if prefix_cache else [])


# ---- sampling ---------------------------------------------------------------------------------------------------


def test_sampling_in_a_bank_follows_top_k_and_its_generator():
    model = f64_model()
    bank = PromptBank(model, {"a": prompt(model, 3, 1), "b": prompt(model, 7, 2)}, backend="reference")
    requests = [("a", [1, 2, 3]), ("b", [4, 5]), ("a", [6])]
    greedy = bank.generate(requests, 5)
    assert bank.generate(requests, 5, temperature=5.0, top_k=1) == greedy  # top_k=1 leaves the greedy token only

    def sampled():
        return bank.generate(requests, 5, temperature=1.0, generator=torch.Generator().manual_seed(0))

    first = sampled()
    assert first != greedy and sampled() == first  # the generator's draws, not the global random state's


# ---- building a bank ----------------------------------------------------------------------------------------------


@pytest.fixture
def model():
    return f64_model()


def test_a_bank_refuses_what_is_not_a_model_or_a_prompt_by_name(model):
    with pytest.raises(TypeError, match=r"^model must be a minipt GPT, got str$"):
        PromptBank("gpt2", {"a": prompt(model, 3, 1)})
    with pytest.raises(ValueError, match=r"^PromptBank needs at least one prompt \(a mapping name -> PromptTuning or"):
        PromptBank(model, {})
    with pytest.raises(TypeError, match=r"^prompt 'x': expected a PromptTuning or a prompt file, got int$"):
        PromptBank(model, {"x": 3})
    bank = PromptTuning.from_tensor(model, torch.zeros(2, 3, 32), backend="reference")
    with pytest.raises(ValueError, match=r"^prompt 'x' is a bank of 2 prompts; give each one its own name$"):
        PromptBank(model, {"x": bank})
    nan = PromptTuning.from_tensor(model, torch.full((3, 32), float("nan")), backend="reference")
    with pytest.raises(CheckpointError, match=r"^prompt 'x': the tensor 'prompt' holds NaN or inf$"):
        PromptBank(model, {"x": nan})


def test_a_banks_prompts_run_on_the_backend_it_was_given(model):
    bank = PromptBank(model, {"a": prompt(model, 3, 1), "b": prompt(model, 7, 2)}, backend="reference")
    assert bank.backend == "reference" and {b.backend for b in bank.banks.values()} == {"reference"}


@pytest.mark.parametrize("max_batch", [0, -1, 1.5, True, "8"])
def test_max_batch_is_a_whole_number_of_at_least_one(model, max_batch):
    with pytest.raises(ValueError, match=rf"^max_batch must be an integer >= 1, got {re.escape(repr(max_batch))}$"):
        PromptBank(model, {"a": prompt(model, 3, 1)}, max_batch=max_batch)


def test_batches_hold_64_requests_by_default_and_may_hold_one(model):
    bank = PromptBank(model, {"a": prompt(model, 3, 1)}, backend="reference")
    sizes = []
    bank.generate([("a", [1])] * 65, 0, progress=sizes.append)
    assert sizes == [64, 1]
    sizes.clear()
    assert bank.generate([("a", [1]), ("a", [2])], 2, max_batch=1, progress=sizes.append) == [
        bank.generate([("a", [1])], 2)[0],
        bank.generate([("a", [2])], 2)[0],
    ]
    assert sizes == [1, 1]
    assert PromptBank(model, {"a": prompt(model, 3, 1)}, max_batch=1).max_batch == 1


# ---- checking requests: a clear error naming the request, before any generation ---------------------------------


@pytest.fixture
def bank(model):
    return PromptBank(model, {"a": prompt(model, 3, 1), "b": prompt(model, 7, 2)}, backend="reference")


BAD = [  # (requests, max_new_tokens, the error, its message)
    ("ab", 2, TypeError, r"^requests must be a list of \(prompt name, token ids\)$"),
    ([("a", [1])], -1, ValueError, r"^max_new_tokens must be an integer >= 0, got -1$"),
    ([("a", [1])], 2.5, TypeError, r"^max_new_tokens must be an integer or one integer per request, got 2\.5$"),
    ([("a", [1])], [2, 2], ValueError, r"^max_new_tokens has 2 entries for 1 requests$"),
    ([("a", [1]), ("a", [1], 5)], 2, RequestError, r"^request 1: expected a \(prompt name, token ids\) pair, got "),
    ([("a", [1]), ("a", torch.tensor([1.0]))], 2, RequestError, r"^request 1: token ids must be a 1-D integer tensor"),
    ([("a", [1]), ("a", torch.tensor([[1]]))], 2, RequestError, r"^request 1: token ids must be a 1-D integer tensor"),
    ([("a", [1]), ("a", torch.tensor([True]))], 2, RequestError, r"^request 1: token ids must be a 1-D integer tensor"),
    ([("a", [1]), ("a", [1, 2.0])], 2, RequestError, r"^request 1: token ids must be a list of ints$"),
    ([("a", [1]), ("a", [1, True])], 2, RequestError, r"^request 1: token ids must be a list of ints$"),
    ([("a", [1]), ("a", [1])], [2, -1], RequestError, r"^request 1: max_new_tokens must be an int >= 0, got -1$"),
    ([("a", [1]), ("a", [1])], [2, 2.5], RequestError, r"^request 1: max_new_tokens must be an int >= 0, got 2\.5$"),
    ([("a", [1]), ("a", [1])], [2, True], RequestError, r"^request 1: max_new_tokens must be an int >= 0, got True$"),
]


@pytest.mark.parametrize("requests, max_new_tokens, error, message", BAD)
def test_a_bad_request_is_refused_by_number_with_the_reason(bank, requests, max_new_tokens, error, message):
    with pytest.raises(error, match=message) as caught:
        bank.generate(requests, max_new_tokens)
    if error is RequestError:
        assert caught.value.index == 1


def test_token_ids_may_be_a_1d_integer_tensor_or_a_tuple(bank):
    expected = bank.generate([("a", [1, 2, 3])], 3)
    assert bank.generate([("a", torch.tensor([1, 2, 3]))], 3) == expected
    assert bank.generate([("a", (1, 2, 3))], 3) == expected


def test_a_budget_of_zero_new_tokens_answers_nothing(bank):
    assert bank.generate([("a", [1]), ("b", [2])], 0) == [[], []]
    assert bank.generate([("a", [1]), ("b", [2])], [0, 2]) == [[], bank.generate([("b", [2])], 2)[0]]


def test_a_request_that_exactly_fills_the_block_is_served(bank, model):
    ids = [1] * (model.config.block_size - 3 - 4)  # prompt 'a' (3) + the ids + 4 new tokens = block_size
    assert len(bank.generate([("a", ids)], 4)[0]) == 4


# ---- a row that has ended leaves the batch ----------------------------------------------------------------------


@pytest.mark.parametrize("with_eos", [False, True])
def test_each_new_token_costs_one_row_of_the_head_rows_that_ended_leave_the_batch(bank, model, monkeypatch, with_eos):
    """A row ends at its budget or its first eos_id; decoding it further would be wasted work."""
    requests = [("a", [1, 2]), ("b", [3]), ("a", [4, 5, 6])]
    free = bank.generate(requests, 6)
    eos = free[0][1] if with_eos else None  # a token the first answer makes second
    rows, head = [], model.head

    def counted(h):
        rows.append(h.shape[0])
        return head(h)

    monkeypatch.setattr(model, "head", counted)
    answers = bank.generate(requests, [6, 2, 6], eos_id=eos)
    assert answers[1] == free[1][:2] and answers[0] == (free[0][:2] if with_eos else free[0])
    assert sum(rows) == sum(len(a) for a in answers) < 3 * 6
