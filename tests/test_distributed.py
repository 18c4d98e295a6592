"""Data-parallel prompt tuning: two gloo processes on CPU give the prompt of one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch

from minipt import GPT, GPTConfig, PromptTuning
from minipt.apps.recipes import tune_prompt
from minipt.distributed import DistInfo, shard_rows
from minipt.tasks import Example
from minipt.tokenizer import ByteTokenizer
from minipt.train import TrainConfig

WORDS = [
    "abc",
    "hello",
    "xyz",
    "minipt",
    "prompt",
    "tune",
    "data",
    "line",
    "json",
    "torch",
    "gloo",
    "nccl",
    "rank",
    "world",
    "shard",
    "batch",
]


def test_shards_cover_the_batch_once():
    rows = [list(range(8))[shard_rows(8, r, 4)] for r in range(4)]
    assert rows == [[0, 1], [2, 3], [4, 5], [6, 7]]
    with pytest.raises(ValueError, match="divisible"):
        shard_rows(6, 0, 4)


def test_one_process_is_the_plain_training_loop():
    """tune_prompt with one process is the plain training loop: deterministic, only the prompt changes."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=260, block_size=64))
    examples = [Example("user", w, w[::-1]) for w in WORDS]
    cfg = TrainConfig(steps=2, batch_size=4, lr=0.05, warmup_steps=1, progress=False)
    runs = [
        tune_prompt(
            model,
            None,
            n_prompt=3,
            init="uniform",
            cfg=cfg,
            data=(examples[:12], examples[12:]),
            tokenizer=ByteTokenizer(),
            info=DistInfo(),
            backend="reference",
        )[0]
        for _ in range(2)
    ]
    assert isinstance(runs[0], PromptTuning) and torch.equal(runs[0].prompt, runs[1].prompt)
    init = PromptTuning(model, n_prompt=3, init="uniform", seed=0, backend="reference").prompt
    assert (runs[0].prompt - init).abs().max() > 1e-3  # it trained: the prompt moved from its init


def run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # both runs: the reference path
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def base_and_data(tmp_path):
    """A random base model file and a .jsonl of WORDS whose answers have different lengths, so that the two
    shards of a batch hold different numbers of supervised tokens."""
    torch.manual_seed(0)
    base = tmp_path / "base.safetensors"
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=260, block_size=64)).save(base)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"input": w, "output": w[::-1] * (1 + i % 3)}) + "\n" for i, w in enumerate(WORDS))
    )
    return base, data


def test_two_processes_give_the_one_process_prompt(tmp_path):
    base, data = base_and_data(tmp_path)
    tune = [
        "-m",
        "minipt",
        "tune",
        "--data",
        str(data),
        "--base",
        str(base),
        "--steps",
        "4",
        "--batch-size",
        "6",
        "--n-prompt",
        "3",
        "--init",
        "uniform",
        "--lr",
        "0.05",
        "--no-progress",
    ]
    one = run([*tune, "--out", "one.safetensors"], tmp_path)
    two = run(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *tune, "--out", "two.safetensors"],
        tmp_path,
    )
    assert "2 processes" in two and two.count("saved") == 1  # only rank 0 prints and writes
    assert "2 processes" not in one
    model = GPT.from_checkpoint(base)
    p1 = PromptTuning.load(model, tmp_path / "one.safetensors").prompt
    p2 = PromptTuning.load(model, tmp_path / "two.safetensors").prompt
    init = PromptTuning(model, n_prompt=3, init="uniform", seed=0).prompt  # what --init uniform --seed 0 starts from
    assert (p1 - init).abs().max() > 1e-2  # it trained
    torch.testing.assert_close(p2, p1, atol=1e-6, rtol=0)
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "base.safetensors",
        "d.jsonl",
        "one.safetensors",
        "two.safetensors",
    ]


def test_two_processes_give_the_one_process_deep_prefix_and_ptuning_encoder(tmp_path):
    """Every trainable tensor is all-reduced: a P-tuning v2 prefix, and P-tuning's table and MLP."""
    from minipt.prefix import PrefixTuning

    base, data = base_and_data(tmp_path)
    model = GPT.from_checkpoint(base)
    for method, load in (
        ("ptuning-v2", lambda p: PrefixTuning.load(model, p).prefix),
        ("ptuning", lambda p: PromptTuning.load(model, p).prompt),
    ):
        tune = [
            "-m",
            "minipt",
            "tune",
            "--data",
            str(data),
            "--base",
            str(base),
            "--steps",
            "3",
            "--batch-size",
            "6",
            "--n-prompt",
            "3",
            "--method",
            method,
            "--no-progress",
        ]
        run([*tune, "--out", f"{method}-one.safetensors"], tmp_path)
        run(
            [
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                *tune,
                "--out",
                f"{method}-two.safetensors",
            ],
            tmp_path,
        )
        one, two = load(tmp_path / f"{method}-one.safetensors"), load(tmp_path / f"{method}-two.safetensors")
        torch.testing.assert_close(two, one, atol=1e-5, rtol=0)
