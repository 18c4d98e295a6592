"""Arguments and tensors are checked at every public entry point, before any work, with a message that names
the argument; and one JSONL reader serves `--data` and serve's `--requests` alike."""

import io
import json

import pytest
import torch

from minipt import GPT, GPTConfig, PromptTuning
from minipt.apps.cli import build_parser, main
from minipt.serve import PromptBank, read_requests
from minipt.userdata import DataError, read_jsonl

SMALL = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=260, block_size=64)


@pytest.fixture(scope="module")
def modules():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL)).eval()
    return model, PromptTuning(model, n_prompt=3, init="uniform").eval()


IDS = torch.tensor([[5, 6, 7], [8, 9, 10]])
MASK = torch.tensor([[1, 1, 1], [0, 0, 0]])
BAD_BATCHES = [  # (idx, attention_mask, error type, the words the message must hold)
    (IDS.to(torch.uint8), None, TypeError, "int64 or int32"),
    (IDS.to(torch.int16), None, TypeError, "int64 or int32"),
    (torch.empty(2, 3, dtype=torch.long, device="meta"), None, ValueError, "meta device"),
    (IDS, MASK.float(), TypeError, "attention_mask must hold integers"),
    (IDS, torch.tensor([[1, 1, 1], [1, 0.5, 0]]), TypeError, "attention_mask"),
    (IDS, MASK, ValueError, "row(s) of zeros"),
]


@pytest.mark.parametrize("idx, mask, error, words", BAD_BATCHES)
@pytest.mark.parametrize("who", ["gpt", "prompt"])
@pytest.mark.parametrize("call", ["forward", "generate", "generate_without_cache"])
def test_bad_ids_and_masks_are_refused_at_every_entry_point(modules, who, call, idx, mask, error, words):
    module = modules[0] if who == "gpt" else modules[1]
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        if call == "forward":
            module(idx, attention_mask=mask)
        else:
            module.generate(idx, 2, temperature=0.0, attention_mask=mask, use_cache=call == "generate")


def test_prompt_bank_arguments_are_checked_before_any_work(modules):
    model, pt = modules
    bank = PromptBank(model, {"a": pt})
    requests = [("a", [5, 6]), ("a", [7])]
    for max_batch in (-1, 0, 1.5, True):
        with pytest.raises(ValueError, match="max_batch"):
            bank.generate(requests, 2, max_batch=max_batch)
        with pytest.raises(ValueError, match="max_batch"):
            PromptBank(model, {"a": pt}, max_batch=max_batch)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got -3"):
        bank.generate(requests, -3)
    with pytest.raises(TypeError, match="max_new_tokens"):
        bank.generate(requests, 2.0)
    with pytest.raises(ValueError, match="temperature"):
        bank.generate(requests, 2, temperature=-1.0)
    assert bank.generate(requests, 2, max_batch=1, temperature=0.0) == bank.generate(requests, 2, temperature=0.0)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (
            ["serve", "--prompt", "t=a.safetensors", "--requests", "r.jsonl", "--max-new-tokens", "0"],
            "--max-new-tokens",
        ),
        (
            ["serve", "--prompt", "t=a.safetensors", "--requests", "r.jsonl", "--max-new-tokens", "-3"],
            "--max-new-tokens",
        ),
        (["serve", "--prompt", "t=a.safetensors", "--requests", "r.jsonl", "--max-batch", "0"], "--max-batch"),
        (["experiment", "lester", "--threads", "-1"], "--threads"),
        (["experiment", "lester", "--threads", "0"], "--threads"),
    ],
)
def test_command_line_counts_are_refused_while_parsing(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2 and flag in capsys.readouterr().err


def test_a_serve_name_given_twice_is_refused(tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text('{"task": "t", "input": "a"}\n')
    argv = [
        "serve",
        "--prompt",
        "t=a.safetensors",
        "--prompt",
        "t=b.safetensors",
        "--requests",
        str(tmp_path / "r.jsonl"),
    ]
    assert main(argv) == 2
    assert "--prompt t= is given twice" in capsys.readouterr().err


# ---- one JSONL reader -------------------------------------------------------------------------------------

# (raw bytes of one record's line, the input text it must give): what editors and other programs write
UNICODE_CASES = [
    ("\ufeff".encode() + b'{"input": "bom", "X": "Y"}', "bom"),  # a byte-order mark before the first record
    ('{"input": "a\u2028b", "X": "Y"}'.encode(), "a\u2028b"),  # LINE SEPARATOR inside a string
    ('{"input": "a\u0085b", "X": "Y"}'.encode(), "a\u0085b"),  # NEL inside a string
    ('{"input": "a\u2029b", "X": "Y"}'.encode(), "a\u2029b"),  # PARAGRAPH SEPARATOR
    (b'{"input": "crlf", "X": "Y"}\r', "crlf"),  # Windows line ends
    ('{"input": "caf\u00e9 \U0001f600", "X": "Y"}'.encode(), "caf\u00e9 \U0001f600"),
]


def _lines(raw: bytes, key: str, value: str) -> bytes:
    return raw.replace(b'"X": "Y"', f'"{key}": "{value}"'.encode()) + b"\n"


@pytest.mark.parametrize("raw, text", UNICODE_CASES)
def test_data_and_requests_read_the_same_unicode(tmp_path, raw, text):
    data = tmp_path / "d.jsonl"
    data.write_bytes(_lines(raw, "output", "o"))
    assert read_jsonl(data)[0].input == text
    requests = tmp_path / "r.jsonl"
    requests.write_bytes(_lines(raw, "task", "t"))
    assert read_requests(requests, {"t"}) == [("t", text)]
    assert read_requests(io.BytesIO(requests.read_bytes()), {"t"}) == [("t", text)]  # stdin's bytes
    assert read_requests(io.TextIOWrapper(io.BytesIO(requests.read_bytes()), encoding="utf-8"), {"t"}) == [("t", text)]


def test_a_non_utf8_byte_names_the_file_and_line_in_both_readers(tmp_path):
    good = json.dumps({"task": "t", "input": "a"}).encode() + b"\n"
    path = tmp_path / "r.jsonl"
    path.write_bytes(good + b'{"task": "t", "input": "\xff"}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:2: not UTF-8"):
        read_requests(path, {"t"})
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"input": "a", "output": "b"}\n{"input": "\xff", "output": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8"):
        read_jsonl(data)


def test_ensemble_and_saved_tensor_report_check_their_arguments(modules):
    from minipt.ensemble import bank_logits, ensemble_accuracy
    from minipt.saved_tensors import saved_tensor_report
    from minipt.tasks import Example
    from minipt.tokenizer import ByteTokenizer

    model, _ = modules
    idx = torch.tensor([[5, 6]])
    for prompts, words in [
        (torch.ones(2, 3, 32, dtype=torch.long), "floating-point"),
        (torch.full((2, 3, 32), float("nan")), "NaN or inf"),
        (torch.zeros(2, 3, 16), "n_embd=32"),
        (torch.zeros(0, 3, 32), "K, n_prompt >= 1"),
    ]:
        with pytest.raises((TypeError, ValueError), match=words):
            bank_logits(model, prompts, idx)
    with pytest.raises(ValueError, match="batch_size"):
        ensemble_accuracy(model, torch.zeros(2, 3, 32), [Example("t", "a", "b")], ByteTokenizer(), batch_size=0)
    x = torch.ones(3, requires_grad=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
        saved_tensor_report(lambda: x.exp().sum())
    with pytest.raises(TypeError, match="fn must be a function"):
        saved_tensor_report(x)
