"""Bad inputs, table-driven: every one gets a clear error before any work, naming what is wrong.

CLI cases run `minipt.apps.cli.main` in the test process: the exit code is 2 (argparse's own errors and
minipt's `minipt CMD: error: ...` alike), nothing is a traceback, and stderr names the argument. Most of them
fail while the arguments are parsed or the output paths are checked, before any model is built: that is the
point, and why the whole table runs in a few seconds.

API cases call the library and assert the exception type and that the message names the argument.
"""

import json
import os
import re

import pytest
import torch

from helpers import random_gpt
from minipt import PromptTuning
from minipt.apps.cli import main
from minipt.checkpoint import (
    CheckpointError,
    check_output_dir,
    check_output_path,
    load_tensors,
    load_train_state,
    save_model,
    save_train_state,
)
from minipt.train import TrainConfig
from minipt.userdata import DataError, read_jsonl

TINY = dict(vocab_size=32, block_size=24, n_layer=1, n_head=2, n_embd=8)

# ---- the CLI ------------------------------------------------------------------------------------------------
# (id, argv with {tmp} for the test's folder, what stderr must name). Files the case needs are made by
# `make_files` below: {tmp}/file (a regular file), {tmp}/dir (a folder), {tmp}/bad.jsonl (not UTF-8),
# {tmp}/notjson.jsonl, {tmp}/ro (a read-only folder).

TUNE = ["tune", "--task", "parity", "--out", "{tmp}/p.safetensors", "--no-progress"]
GEN = ["generate", "abc"]
CLI_CASES = [
    # counts
    ("tune-steps-0", TUNE + ["--steps", "0"], "--steps"),
    ("tune-steps-negative", TUNE + ["--steps", "-1"], "--steps"),
    ("tune-steps-text", TUNE + ["--steps", "ten"], "--steps"),
    ("tune-steps-float", TUNE + ["--steps", "1.5"], "--steps"),
    ("tune-steps-empty", TUNE + ["--steps", ""], "--steps"),
    ("tune-batch-0", TUNE + ["--batch-size", "0"], "--batch-size"),
    ("tune-batch-negative", TUNE + ["--batch-size", "-8"], "--batch-size"),
    ("tune-eval-every-0", TUNE + ["--eval-every", "0"], "--eval-every"),
    ("tune-n-prompt-0", TUNE + ["--n-prompt", "0"], "--n-prompt"),
    ("tune-n-prompt-negative", TUNE + ["--n-prompt", "-3"], "--n-prompt"),
    ("tune-n-prompt-text", TUNE + ["--n-prompt", "many"], "--n-prompt"),
    # rates
    ("tune-lr-0", TUNE + ["--lr", "0"], "--lr"),
    ("tune-lr-negative", TUNE + ["--lr", "-0.1"], "--lr"),
    ("tune-lr-inf", TUNE + ["--lr", "inf"], "--lr"),
    ("tune-lr-minus-inf", TUNE + ["--lr", "-inf"], "--lr"),
    ("tune-lr-nan", TUNE + ["--lr", "nan"], "--lr"),
    ("tune-lr-text", TUNE + ["--lr", "fast"], "--lr"),
    ("tune-lr-overflow", TUNE + ["--lr", "1e999"], "--lr"),
    ("tune-val-fraction-0", TUNE + ["--val-fraction", "0"], "--val-fraction"),
    ("tune-val-fraction-1", TUNE + ["--val-fraction", "1"], "--val-fraction"),
    ("tune-val-fraction-nan", TUNE + ["--val-fraction", "nan"], "--val-fraction"),
    # seeds
    ("tune-seed-negative", TUNE + ["--seed", "-1"], "--seed"),
    ("tune-seed-too-large", TUNE + ["--seed", str(2**32)], "--seed"),
    ("tune-seed-float", TUNE + ["--seed", "0.5"], "--seed"),
    # choices and text
    ("tune-init-unknown", TUNE + ["--init", "zeros"], "--init"),
    ("tune-optimizer-unknown", TUNE + ["--optimizer", "sgd"], "--optimizer"),
    ("tune-init-text-empty", TUNE + ["--init", "text", "--init-text", ""], "--init-text"),
    ("tune-init-text-blank", TUNE + ["--init", "text", "--init-text", "   "], "--init-text"),
    ("tune-init-text-without-text-init", TUNE + ["--init-text", "hello"], "--init-text"),
    ("tune-text-init-without-text", TUNE + ["--init", "text"], "--init-text"),
    ("tune-task-unknown", ["tune", "--task", "sorting", "--out", "{tmp}/p.safetensors"], "sorting"),
    ("tune-no-task-no-data", ["tune", "--out", "{tmp}/p.safetensors"], "--task"),
    ("tune-out-missing", ["tune", "--task", "parity"], "--out"),
    # output paths, checked before any model is built
    ("tune-out-empty", ["tune", "--task", "parity", "--out", ""], "--out"),
    ("tune-out-is-folder", ["tune", "--task", "parity", "--out", "{tmp}/dir"], "--out"),
    ("tune-out-under-a-file", ["tune", "--task", "parity", "--out", "{tmp}/file/p.safetensors"], "--out"),
    ("tune-out-deep-under-a-file", ["tune", "--task", "parity", "--out", "{tmp}/file/a/b/p.safetensors"], "--out"),
    ("tune-out-device", ["tune", "--task", "parity", "--out", os.devnull], "--out"),
    ("tune-out-read-only-folder", ["tune", "--task", "parity", "--out", "{tmp}/ro/p.safetensors"], "--out"),
    ("tune-peft-out-is-file", TUNE + ["--peft-out", "{tmp}/file"], "--peft-out"),
    ("tune-peft-out-under-file", TUNE + ["--peft-out", "{tmp}/file/adapter"], "--peft-out"),
    ("tune-checkpoint-is-folder", TUNE + ["--checkpoint", "{tmp}/dir"], "--checkpoint"),
    ("tune-checkpoint-under-file", TUNE + ["--checkpoint", "{tmp}/file/state.pt"], "--checkpoint"),
    ("tune-checkpoint-is-out", TUNE + ["--checkpoint", "{tmp}/p.safetensors"], "--checkpoint"),
    ("tune-checkpoint-device", TUNE + ["--checkpoint", os.devnull], "--checkpoint"),
    ("tune-resume-without-checkpoint", TUNE + ["--resume"], "--resume"),
    # data files
    ("tune-data-missing", ["tune", "--data", "{tmp}/none.jsonl", "--out", "{tmp}/p.safetensors"], "none.jsonl"),
    ("tune-data-is-folder", ["tune", "--data", "{tmp}/dir", "--out", "{tmp}/p.safetensors"], "dir"),
    ("tune-data-not-utf8", ["tune", "--data", "{tmp}/bad.jsonl", "--out", "{tmp}/p.safetensors"], "bad.jsonl:2"),
    (
        "tune-data-not-json",
        ["tune", "--data", "{tmp}/notjson.jsonl", "--out", "{tmp}/p.safetensors"],
        "notjson.jsonl:1",
    ),
    ("tune-base-missing", TUNE + ["--base", "{tmp}/none.safetensors"], "none.safetensors"),
    ("tune-base-not-a-model", TUNE + ["--base", "{tmp}/file"], "file"),
    # pretrain
    ("pretrain-preset-unknown", ["pretrain", "--preset", "huge", "--out", "{tmp}/m.safetensors"], "--preset"),
    ("pretrain-examples-0", ["pretrain", "--examples", "0", "--out", "{tmp}/m.safetensors"], "--examples"),
    ("pretrain-steps-0", ["pretrain", "--steps", "0", "--out", "{tmp}/m.safetensors"], "--steps"),
    ("pretrain-lr-inf", ["pretrain", "--lr", "inf", "--out", "{tmp}/m.safetensors"], "--lr"),
    ("pretrain-out-is-folder", ["pretrain", "--out", "{tmp}/dir"], "--out"),
    (
        "pretrain-checkpoint-is-folder",
        ["pretrain", "--out", "{tmp}/m.safetensors", "--checkpoint", "{tmp}/dir"],
        "--checkpoint",
    ),
    # eval
    ("eval-n-0", ["eval", "--task", "copy", "-n", "0"], "-n"),
    ("eval-task-unknown", ["eval", "--task", "sorting"], "--task"),
    ("eval-split-unknown", ["eval", "--task", "copy", "--split", "dev"], "--split"),
    ("eval-prompt-missing", ["eval", "--task", "copy", "--prompt", "{tmp}/none.safetensors"], "none.safetensors"),
    ("eval-prompt-is-garbage", ["eval", "--task", "copy", "--prompt", "{tmp}/file"], "file"),
    # generate
    ("generate-max-new-0", GEN + ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("generate-max-new-text", GEN + ["--max-new-tokens", "lots"], "--max-new-tokens"),
    ("generate-temperature-negative", GEN + ["--temperature", "-1"], "--temperature"),
    ("generate-temperature-nan", GEN + ["--temperature", "nan"], "--temperature"),
    ("generate-temperature-inf", GEN + ["--temperature", "inf"], "--temperature"),
    ("generate-top-k-0", GEN + ["--top-k", "0"], "--top-k"),
    ("generate-text-empty", ["generate", ""], "text"),
    ("generate-text-blank", ["generate", "  "], "text"),
    # demo and the rest
    ("demo-n-prompt-0", ["demo", "--n-prompt", "0"], "--n-prompt"),
    ("demo-steps-0", ["demo", "--steps", "0"], "--steps"),
    ("demo-seed-negative", ["demo", "--seed", "-5"], "--seed"),
    ("demo-task-unknown", ["demo", "--task", "sorting"], "--task"),
    ("demo-out-is-file", ["demo", "--out", "{tmp}/file"], "--out"),
    ("experiment-unknown", ["experiment", "ablation"], "name"),
    ("bench-unknown", ["bench", "everything"], "name"),
    ("no-command", [], "command"),
    ("unknown-command", ["train"], "command"),
]


def make_files(tmp):
    (tmp / "file").write_text("not a model\n")
    (tmp / "dir").mkdir()
    (tmp / "bad.jsonl").write_bytes(b'{"input": "a", "output": "b"}\n{"input": "\xff", "output": "b"}\n')
    (tmp / "notjson.jsonl").write_text("input,output\n")
    (tmp / "ro").mkdir()
    os.chmod(tmp / "ro", 0o555)


@pytest.mark.parametrize("case, argv, names", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses(case, argv, names, tmp_path, capsys):
    if case == "tune-out-read-only-folder" and os.geteuid() == 0:
        pytest.skip("root can write to a read-only folder")
    make_files(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert names in err, err
    assert not (tmp_path / "p.safetensors").exists() and not (tmp_path / "m.safetensors").exists()


def test_the_cli_table_is_large():
    assert len(CLI_CASES) + len(API_CASES) >= 60


# ---- the API ------------------------------------------------------------------------------------------------


def _model():
    return random_gpt(TINY)


def _pt():
    return PromptTuning(_model(), n_prompt=2, init="uniform", backend="reference")


def _torch_file(tmp):
    path = tmp / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    return path


def _peft_folder(tmp, config_bytes: bytes):
    folder = tmp / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(config_bytes)
    return folder


def _model_file_that_does_not_fit(tmp):
    model = _model()
    path = tmp / "m.safetensors"
    save_model(model, path, extra_metadata={"config": json.dumps({**model.config.to_dict(), "n_embd": 16})})
    return path


# (id, a call of tmp_path, the exception type, a regex the message must match)
API_CASES = [
    ("config-steps-0", lambda tmp: TrainConfig(steps=0), ValueError, r"TrainConfig\.steps"),
    ("config-steps-bool", lambda tmp: TrainConfig(steps=True), ValueError, r"TrainConfig\.steps"),
    ("config-steps-float", lambda tmp: TrainConfig(steps=2.0), ValueError, r"TrainConfig\.steps"),
    ("config-batch-0", lambda tmp: TrainConfig(batch_size=0), ValueError, r"TrainConfig\.batch_size"),
    ("config-eval-every-0", lambda tmp: TrainConfig(eval_every=0), ValueError, r"TrainConfig\.eval_every"),
    ("config-warmup-negative", lambda tmp: TrainConfig(warmup_steps=-1), ValueError, r"warmup_steps"),
    ("config-lr-0", lambda tmp: TrainConfig(lr=0.0), ValueError, r"TrainConfig\.lr"),
    ("config-lr-inf", lambda tmp: TrainConfig(lr=float("inf")), ValueError, r"TrainConfig\.lr"),
    ("config-lr-nan", lambda tmp: TrainConfig(lr=float("nan")), ValueError, r"TrainConfig\.lr"),
    ("config-lr-text", lambda tmp: TrainConfig(lr="0.1"), ValueError, r"TrainConfig\.lr"),
    ("config-weight-decay-negative", lambda tmp: TrainConfig(weight_decay=-1.0), ValueError, r"weight_decay"),
    ("config-grad-clip-nan", lambda tmp: TrainConfig(grad_clip=float("nan")), ValueError, r"grad_clip"),
    ("config-min-lr-ratio", lambda tmp: TrainConfig(min_lr_ratio=2.0), ValueError, r"min_lr_ratio"),
    ("config-optimizer", lambda tmp: TrainConfig(optimizer="sgd"), ValueError, r"optimizer"),
    ("config-seed-negative", lambda tmp: TrainConfig(seed=-1), ValueError, r"TrainConfig\.seed"),
    ("prompt-n-0", lambda tmp: PromptTuning(_model(), n_prompt=0), ValueError, r"n_prompt"),
    ("prompt-n-block", lambda tmp: PromptTuning(_model(), n_prompt=24), ValueError, r"n_prompt"),
    ("prompt-init-unknown", lambda tmp: PromptTuning(_model(), init="zeros"), ValueError, r"init"),
    ("prompt-text-without-text", lambda tmp: PromptTuning(_model(), n_prompt=2, init="text"), ValueError, r"init_text"),
    ("prompt-not-a-model", lambda tmp: PromptTuning(torch.nn.Linear(2, 2)), TypeError, r"model"),
    ("forward-float-ids", lambda tmp: _pt()(torch.zeros(1, 3)), TypeError, r"idx"),
    ("forward-1d-ids", lambda tmp: _pt()(torch.zeros(3, dtype=torch.long)), ValueError, r"idx"),
    ("forward-id-out-of-range", lambda tmp: _pt()(torch.full((1, 3), 32)), ValueError, r"idx.*vocab_size"),
    ("forward-too-long", lambda tmp: _pt()(torch.zeros(1, 23, dtype=torch.long)), ValueError, r"n_prompt.*block_size"),
    (
        "loss-targets-shape",
        lambda tmp: _pt().loss(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)),
        ValueError,
        r"targets",
    ),
    (
        "loss-nothing-supervised",
        lambda tmp: _pt().loss(torch.zeros(1, 3, dtype=torch.long), torch.full((1, 3), -100)),
        ValueError,
        r"targets",
    ),
    (
        "prompt-file-is-model",
        lambda tmp: (save_model(_model(), tmp / "m.safetensors"), PromptTuning.load(_model(), tmp / "m.safetensors")),
        CheckpointError,
        r"expected a minipt 'prompt' file",
    ),
    (
        "garbage-safetensors",
        lambda tmp: ((tmp / "g").write_bytes(b"\x00" * 64), load_tensors(tmp / "g", "gpt")),
        CheckpointError,
        r"not a readable safetensors file",
    ),
    (
        "model-does-not-fit-config",
        lambda tmp: __import__("minipt").GPT.from_checkpoint(_model_file_that_does_not_fit(tmp)),
        CheckpointError,
        r"the config says n_embd=16 but the weights have 8",
    ),
    (
        "train-state-other-torch-file",
        lambda tmp: load_train_state(_torch_file(tmp)),
        CheckpointError,
        r"not a minipt training checkpoint",
    ),
    ("train-state-folder", lambda tmp: load_train_state(tmp), CheckpointError, r"not a file"),
    (
        "train-state-non-finite",
        lambda tmp: save_train_state(tmp / "s.pt", {"trainable": {"prompt": torch.tensor([1.0, float("inf")])}}),
        FloatingPointError,
        r"'prompt' holds NaN or inf",
    ),
    (
        "jsonl-not-utf8",
        lambda tmp: ((tmp / "d.jsonl").write_bytes(b'{"input": "\xe9", "output": "x"}\n'), read_jsonl(tmp / "d.jsonl")),
        DataError,
        r"d\.jsonl:1: not UTF-8",
    ),
    (
        "peft-config-a-list",
        lambda tmp: PromptTuning.from_peft(_model(), _peft_folder(tmp, b"[1, 2]")),
        CheckpointError,
        r"adapter_config\.json must hold a JSON object",
    ),
    (
        "peft-config-not-utf8",
        lambda tmp: PromptTuning.from_peft(_model(), _peft_folder(tmp, b'{"a": "\xff"}')),
        CheckpointError,
        r"adapter_config\.json is not UTF-8",
    ),
    ("output-is-folder", lambda tmp: check_output_path(tmp, "--out"), ValueError, r"--out .* is a folder"),
    ("output-is-device", lambda tmp: check_output_path(os.devnull, "--out"), ValueError, r"not a regular file"),
    (
        "output-dir-is-file",
        lambda tmp: ((tmp / "f").write_text("x"), check_output_dir(tmp / "f", "--peft-out")),
        ValueError,
        r"--peft-out .* existing file",
    ),
]


@pytest.mark.parametrize("case, call, error, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses(case, call, error, message, tmp_path):
    with pytest.raises(error) as info:
        call(tmp_path)
    assert re.search(message, str(info.value)), str(info.value)


# ---- valid inputs that look odd: accepted ---------------------------------------------------------------


def test_jsonl_strings_may_hold_line_separators(tmp_path):
    """U+2028, U+2029 and U+0085 are valid inside JSON strings; lines split on \\n only."""
    records = [{"input": "a\u2028b", "output": "c\u0085d"}, {"input": "e\u2029f", "output": "g"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    examples = read_jsonl(path)
    assert [(ex.input, ex.answer) for ex in examples] == [("a\u2028b", "c\u0085d"), ("e\u2029f", "g")]
