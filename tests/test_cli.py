"""The `minipt` command, end to end, as a user runs it (a subprocess, the plain reference path)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from minipt import GPT, ByteTokenizer, PromptTuning
from minipt.apps.cli import COMMANDS, build_parser, main
from minipt.apps.demo import ROWS
from minipt.apps.recipes import pretraining_token_counts
from minipt.assets import shipped_base_path
from minipt.data import exact_match_accuracy
from minipt.tasks import make_split


def run_minipt(*args, cwd):
    # Without the shipped base model the CLI would pretrain one (an hour): fail fast instead.
    assert shipped_base_path().is_file(), "the shipped base model is missing"
    # The CLI runs without TRITON_INTERPRET, as a user's shell would: CPU tensors take the reference path.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "minipt", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: minipt " + command in capsys.readouterr().out


def test_shipped_base_model_is_small_and_loads():
    path = shipped_base_path()
    assert path.is_file(), "the tiny base model must ship with the package"
    assert path.stat().st_size < 5 * 1024 * 1024
    model = GPT.from_checkpoint(path)
    assert 0.7e6 < model.num_params() < 1.3e6


def test_demo_writes_its_table_plot_and_prompt(tmp_path):
    out = tmp_path / "demo"
    proc = run_minipt("demo", "--steps", "4", "--out", str(out), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "demo.json").read_text())
    for key in ROWS:
        assert 0.0 <= report[key] <= 1.0, key
    assert report["task"] == "parity" and report["seconds"] > 0
    assert (out / "demo.png").stat().st_size > 10_000
    pt = PromptTuning.load(GPT.from_checkpoint(shipped_base_path()), out / "prompt.safetensors")
    assert pt.prompt.shape == (20, 128)
    assert "written instruction" in proc.stdout and "soft prompt" in proc.stdout


def test_tune_eval_generate_round_trip(tmp_path):
    prompt = tmp_path / "copy.safetensors"
    proc = run_minipt(
        "tune", "--task", "copy", "--steps", "3", "--n-prompt", "4", "--out", str(prompt), "--no-progress", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "test exact match" in proc.stdout
    model = GPT.from_checkpoint(shipped_base_path())
    pt = PromptTuning.load(model, prompt)  # the file is a prompt for the shipped model, and it was trained
    assert pt.prompt.shape == (4, model.config.n_embd)
    untrained = PromptTuning(
        model, n_prompt=4, init="vocab", tokenizer=ByteTokenizer(), token_counts=pretraining_token_counts(), seed=0
    ).prompt
    assert not torch.equal(pt.prompt, untrained)
    proc = run_minipt("eval", "--task", "copy", "--prompt", str(prompt), "-n", "20", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = exact_match_accuracy(pt, make_split("copy", "test", 20), ByteTokenizer())
    assert f"copy (test, n=20): exact match {expected:.1%}" in proc.stdout  # the number eval prints is the score
    proc = run_minipt(
        "generate", "abc", "--prompt", str(prompt), "--task-format", "--max-new-tokens", "4", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    ids = ByteTokenizer().encode("abc") + [ByteTokenizer().sep_id]
    out = pt.generate(torch.tensor([ids]), 4, temperature=0.0)[0, len(ids) :].tolist()
    if ByteTokenizer().eos_id in out:
        out = out[: out.index(ByteTokenizer().eos_id)]
    assert proc.stdout.rstrip("\n") == ByteTokenizer().decode(out)  # generate prints the greedy continuation


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["eval", "--task", "copy", "--prompt", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such checkpoint file" in capsys.readouterr().err
    assert main(["eval", "--task", "copy", "--base", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no such checkpoint file" in err or "not found" in err


def test_prompt_for_another_model_is_refused(tmp_path, capsys):
    other = GPT(GPT.from_checkpoint(shipped_base_path()).config)  # same shape, other (random) weights
    path = tmp_path / "other.safetensors"
    PromptTuning(other, n_prompt=4, init="uniform", backend="reference").save(path)
    assert main(["eval", "--task", "copy", "--prompt", str(path), "-n", "4"]) == 2
    assert "another base model" in capsys.readouterr().err


def test_bench_runs_the_script_with_its_own_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "memory", "--help"])
    assert exit_info.value.code == 0
    assert "usage: bench_memory.py" in capsys.readouterr().out
