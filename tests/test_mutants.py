"""Behaviour that mutation testing (`make mutate MODULE=...`, README "Mutation testing") found unchecked: each
test here fails on a bug the rest of the suite let through. Grouped by the module the bug was planted in."""

import importlib.util
import json
import os
import stat
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import random_gpt
from minipt import GPT, ByteTokenizer, GPTConfig, PromptBank, PromptTuning
from minipt.apps.recipes import tune_prompt
from minipt.assets import load_base
from minipt.checkpoint import (
    CheckpointError,
    atomic_write,
    check_same_run,
    file_kind,
    load_train_state,
    model_fingerprint,
    save_tensors,
    save_train_state,
)
from minipt.data import encode_example
from minipt.ensemble import majority_vote
from minipt.model import load_model, sample_next
from minipt.tasks import Example, make_split
from minipt.train import TrainConfig
from minipt.userdata import DataError, check_fits, read_jsonl, split_validation

# ---- model.py: sampling ------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampling_divides_the_logits_by_the_temperature(temperature):
    """softmax(logits / T): the same draws as torch.multinomial on those probabilities, from the same seed."""
    logits = torch.randn(256, 11, generator=torch.Generator().manual_seed(0)) * 3
    got = sample_next(logits, temperature, None, torch.Generator().manual_seed(1))
    probs = F.softmax(logits / temperature, dim=-1)
    assert torch.equal(got, torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(1)))


def test_top_k_keeps_exactly_the_k_largest_logits():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, 3.0]])
    draws = {sample_next(logits, 100.0, 3, torch.Generator().manual_seed(s)).item() for s in range(200)}
    assert draws == {1, 3, 4}  # a high temperature makes the three about equally likely; the rest never


# ---- ensemble.py: the vote --------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [2, 3, 4])
def test_majority_vote_equals_a_vote_counted_by_hand(K):
    """Per (example, position): the token most prompts pick; among tied tokens, the one whose probability
    (softmax over the vocabulary) averaged over the K prompts is largest. Random logits give many ties."""
    logits = torch.randn(K, 3, 4, 5, generator=torch.Generator().manual_seed(K))  # (K, B, n, V)
    probs = logits.softmax(dim=-1).mean(dim=0)  # (B, n, V)
    expected = torch.zeros(3, 4, dtype=torch.long)
    for b in range(3):
        for t in range(4):
            votes = [int(logits[k, b, t].argmax()) for k in range(K)]
            most = max(votes.count(v) for v in votes)
            expected[b, t] = max((v for v in set(votes) if votes.count(v) == most), key=lambda v: probs[b, t, v])
    assert torch.equal(majority_vote(logits), expected)


def test_two_unsure_votes_beat_one_sure_vote():
    """A vote is a vote: two prompts that barely prefer token 0 outvote one that is sure of token 1, although
    token 1 has the larger mean probability."""
    logits = torch.log(torch.tensor([[0.40, 0.35, 0.25], [0.40, 0.35, 0.25], [0.00, 1.00, 0.00]]) + 1e-9)
    assert majority_vote(logits[:, None, None, :]).item() == 0


# ---- serve.py: a bank of prompts of one length -------------------------------------------------------------

CFG = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=64)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_prompts_of_equal_length_each_serve_their_own_rows(prefix_cache):
    """Two prompts of the same length share one bank (prompt_index picks the row's prompt): each request is
    answered as its own prompt alone would answer it, and the two prompts answer differently."""
    model = random_gpt(CFG, seed=0, std=0.5).double().eval()
    g = torch.Generator().manual_seed(0)
    prompts = {
        name: PromptTuning.from_tensor(model, 3 * torch.randn(4, 32, generator=g), backend="reference")
        for name in ("x", "y")
    }
    requests = [(name, [5, 9, 2 + i]) for i in range(3) for name in ("x", "y")]
    answers = PromptBank(model, prompts).generate(requests, max_new_tokens=5, prefix_cache=prefix_cache)
    alone = [prompts[n].generate(torch.tensor([ids]), 5, temperature=0)[0, 3:].tolist() for n, ids in requests]
    assert answers == alone
    assert answers[0::2] != answers[1::2]  # the prompt decides the answer


# ---- checkpoint.py: run identity and saved files -----------------------------------------------------------


def test_a_field_only_one_side_has_is_a_difference(tmp_path):
    check_same_run({"a": 1}, {"a": 1}, tmp_path / "c.pt")
    for saved, current in (({"a": 1}, {"a": 1, "b": 2}), ({"a": 1, "b": 2}, {"a": 1})):
        with pytest.raises(CheckpointError, match=r"another run: b is "):
            check_same_run(saved, current, tmp_path / "c.pt")


def test_resume_refuses_the_same_task_on_other_training_data(tmp_path):
    def tune(seed, resume=False):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=260, block_size=64))
        data = (make_split("parity", "train", 16, seed=seed), make_split("parity", "val", 4))
        cfg = TrainConfig(steps=2, batch_size=4, lr=0.05, warmup_steps=1, eval_every=2, progress=False)
        return tune_prompt(
            model,
            "parity",
            3,
            "uniform",
            cfg,
            data=data,
            backend="reference",
            checkpoint_path=tmp_path / "state.pt",
            resume=resume,
        )

    tune(seed=0)
    with pytest.raises(CheckpointError, match=r"another run: data_sha256 is "):
        tune(seed=1, resume=True)


def test_a_saved_file_gets_the_usual_mode_not_the_temp_files_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "out.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


# ---- userdata.py: the JSONL reader -------------------------------------------------------------------------


def write(tmp_path, data: bytes):
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    return path


def test_a_missing_data_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_errors_name_the_line_counted_from_one_and_the_byte_counted_from_one(tmp_path):
    ok = b'{"input": "a", "output": "b"}\n'
    with pytest.raises(DataError, match=r"d\.jsonl:3: not valid JSON"):
        read_jsonl(write(tmp_path, ok + ok + b"{oops\n"))
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8 text \(byte 4 of the line\)"):
        read_jsonl(write(tmp_path, ok + b'{"i\xff": 1}\n'))


def test_windows_line_ends_and_a_byte_order_mark_are_read_as_text(tmp_path):
    data = '\ufeff{"input": "a", "output": "b"}\r\n{"input": "c", "output": "d\\r"}\r\n'.encode()
    assert read_jsonl(write(tmp_path, data)) == [Example("user", "a", "b"), Example("user", "c", "d\r")]


@pytest.mark.parametrize(
    "line, says",
    [
        (b"[1, 2]", "got list"),
        (b'{"input": 3, "output": "b"}', "'input' must be a string, got int"),
        (b'{"input": "a", "output": "b", "task": ""}', "'task' is empty"),
    ],
)
def test_a_bad_record_says_what_it_got(tmp_path, line, says):
    with pytest.raises(DataError, match=rf"d\.jsonl:1: .*{says}"):
        read_jsonl(write(tmp_path, line + b"\n"))


def test_the_validation_split_bounds():
    examples = [Example("user", str(i), "x") for i in range(3)]
    assert split_validation(examples) == split_validation(examples, seed=0)  # the default split is seed 0's
    for fraction in (0, 1, 1.5):
        with pytest.raises(ValueError, match=rf"val_fraction must be in \(0, 1\), got {fraction}"):
            split_validation(examples, fraction)
    train, val = split_validation(examples[:2], 0.5)  # two records are enough: one each
    assert len(train) == len(val) == 1
    train, val = split_validation(examples, 0.99)  # at least one record is left to train on
    assert (len(train), len(val)) == (1, 2)


def test_a_record_that_exactly_fills_the_block_fits():
    ex = Example("user", "ab", "c")
    n = len(encode_example(ex, ByteTokenizer(), instruction=False)[0])
    check_fits([ex], ByteTokenizer(), n_prompt=3, block_size=n + 3)
    with pytest.raises(DataError, match=rf"^data:1: the record encodes to {n} tokens"):
        check_fits([ex], ByteTokenizer(), n_prompt=4, block_size=n + 3)


# ---- checkpoint.py: what is written and read back ----------------------------------------------------------


def test_a_training_checkpoint_of_nan_is_never_written(tmp_path):
    path = tmp_path / "state.pt"
    with pytest.raises(FloatingPointError, match=rf"not writing {path}: the trainable tensor 'prompt' holds NaN"):
        save_train_state(path, {"step": 1, "trainable": {"prompt": torch.tensor([1.0, float("nan")])}})
    assert not path.exists()


class NotATensor:
    pass


def test_a_training_checkpoint_is_proven_before_it_is_used(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"kind": "something else", "step": 1}, path)  # a dict, but not ours
    with pytest.raises(CheckpointError, match="is not a minipt training checkpoint"):
        load_train_state(path)
    torch.save({"kind": "minipt.train_state", "step": NotATensor()}, path)  # unpickling it would run code
    with pytest.raises(CheckpointError, match="is not a readable training checkpoint"):
        load_train_state(path)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path} is not a file"):
        load_train_state(tmp_path)


def test_the_message_of_another_run_shows_both_values_of_each_field(tmp_path):
    with pytest.raises(
        CheckpointError,
        match=r"another run: a is 1 there, 2 in this run; b is None there, 3 in "
        r"this run\. Use another",
    ):
        check_same_run({"a": 1}, {"a": 2, "b": 3}, tmp_path / "c.pt")


def safetensors_bytes(header: bytes, claimed: int | None = None) -> bytes:
    return (len(header) if claimed is None else claimed).to_bytes(8, "little") + header


def test_a_safetensors_header_is_read_only_when_its_length_is_true(tmp_path):
    path = tmp_path / "m.safetensors"
    header = b'{"__metadata__": {"minipt.kind": "gpt"}}'
    path.write_bytes(safetensors_bytes(header))  # the header ends exactly at the end of the file
    assert file_kind(path) == "gpt"
    path.write_bytes(safetensors_bytes(header, claimed=len(header) + 1))  # a length one byte past the end
    assert file_kind(path) is None
    path.write_bytes(safetensors_bytes(b"[1, 2]"))  # a header that is not a JSON object
    assert file_kind(path) is None


def test_the_fingerprint_covers_the_config_and_is_the_one_results_were_made_with():
    a = random_gpt(dict(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=32), seed=0)
    b = GPT(GPTConfig(**{**a.config.to_dict(), "n_head": 4}))
    b.load_state_dict(a.state_dict())  # the same weights read with other heads: another model
    assert model_fingerprint(a) != model_fingerprint(b)
    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "lester-scale.json"
    assert model_fingerprint(load_base()) == json.loads(results.read_text())["bases"]["tiny"]["fingerprint"]


def test_weights_that_do_not_fit_name_the_mismatch(tmp_path):
    model = random_gpt(dict(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=32), seed=0)
    tensors = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    tensors["transformer.wpe.weight"] = tensors["transformer.wpe.weight"][:16]
    save_tensors(
        tmp_path / "m.safetensors", tensors, kind="gpt", metadata={"config": json.dumps(model.config.to_dict())}
    )
    with pytest.raises(
        CheckpointError,
        match=r"the config says block_size=32 but the weights have 16",
    ):
        load_model(tmp_path / "m.safetensors")


# ---- the mutation-testing table itself ------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; CI runs 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_core_module_and_exercise_checker_has_its_tests_named_for_make_mutate():
    """[tool.minipt.mutate] names an existing module and existing test files for each core module and each exercise
    checker, so `make mutate MODULE=...` runs for all of them (a renamed test file cannot leave a module untested)."""
    table = pyproject()["tool"]["minipt"]["mutate"]
    core = ["serve", "model", "prefix", "loss", "checks", "checkpoint", "distributed", "userdata", "ensemble"]
    checkers = ["grade", "equations", "training", "kernel", "kernel_track", "predict", "capstone"]
    expected = {f"minipt/{m}.py" for m in core} | {f"minipt/exercises/{m}.py" for m in checkers}
    assert expected | {"minipt/apps/recipes.py"} <= set(table)
    missing = [p for module, tests in table.items() for p in [module, *tests] if not (ROOT / p).is_file()]
    assert missing == [] and all(table.values())


def test_make_mutate_copies_every_folder_the_tests_read():
    """mutmut runs the tests in a copy of the project: .ci/mutate.py's folders and [tool.mutmut] also_copy must agree
    and hold notebooks/ (the grader's tests run them), or a module's run stops at "failed to collect stats"."""
    also_copy = pyproject()["tool"]["mutmut"]["also_copy"]
    spec = importlib.util.spec_from_file_location("ci_mutate", ROOT / ".ci" / "mutate.py")
    ci_mutate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ci_mutate)
    assert {p.rstrip("/") for p in also_copy} | {"minipt"} == set(ci_mutate.COPIED)
    assert {"kernels", "tests", "benchmarks", "notebooks"} <= set(ci_mutate.COPIED)
