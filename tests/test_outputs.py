"""One rule for every command's files (minipt.outputs): an output is never an input, no two outputs are one
file, and an existing file is replaced only when it is this run's earlier result or with --overwrite. Each
refusal comes before any work and leaves every file byte-identical."""

import json
import os
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from minipt import GPT, GPTConfig, PromptTuning
from minipt.apps import cli
from minipt.apps.cli import main
from minipt.outputs import STAMP_KEY, claim_command, claim_outputs, claim_training_outputs, stamp_of

SMALL = dict(n_layer=1, n_head=2, n_embd=32, vocab_size=260, block_size=64)
WORDS = ["abc", "hello", "xyz", "prompt", "tune", "minipt"] * 3


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A user's folder: a base model, data, a prompt, requests, a PEFT folder, a checkpoint and links."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    model.save("base.safetensors")
    Path("d.jsonl").write_text("".join(json.dumps({"input": w, "output": w[::-1]}) + "\n" for w in WORDS))
    Path("v.jsonl").write_text(json.dumps({"input": "ab", "output": "ba"}) + "\n")
    pt = PromptTuning(model, n_prompt=3, init="uniform")
    pt.save("p.safetensors")
    pt.save_peft("pdir")
    Path("r.jsonl").write_text(json.dumps({"task": "t", "input": "abc"}) + "\n")
    Path("answers.jsonl").write_text('{"task": "t", "input": "x", "output": "earlier answers"}\n')
    Path("ck.pt").write_bytes(b"the training state of another run")
    os.symlink("d.jsonl", "link-to-data.jsonl")
    os.link("d.jsonl", "hardlink-to-data.jsonl")
    os.symlink("p.safetensors", "link-to-prompt.safetensors")
    Path("hfdir").mkdir()  # a Hugging Face model folder (hf:hfdir)
    Path("hfdir/model.safetensors").write_bytes(b"a Hugging Face model's weights")
    Path("demo").mkdir()
    os.link("base.safetensors", "demo/prompt.safetensors")
    return tmp_path


def snapshot(root: Path) -> dict:
    """Every file and link under root: a link by its target, a file by its bytes."""
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            out[str(path)] = ("link", os.readlink(path))
        elif path.is_file():
            out[str(path)] = path.read_bytes()
    return out


TUNE = [
    "tune",
    "--data",
    "d.jsonl",
    "--base",
    "base.safetensors",
    "--n-prompt",
    "3",
    "--init",
    "uniform",
    "--steps",
    "2",
    "--eval-every",
    "2",
    "--batch-size",
    "4",
    "--no-progress",
]
SERVE = ["serve", "--base", "base.safetensors", "--prompt", "t=p.safetensors", "--requests", "r.jsonl", "--no-progress"]

# (argv, the flags the message names): each must be refused before any model is loaded or file written.
COLLISIONS = [
    # tune: an output that is an input (the same path, a symbolic link, a hard link)
    (["tune", "--base", "base.safetensors", "--task", "parity", "--out", "base.safetensors"], ["--out", "--base"]),
    (TUNE + ["--out", "d.jsonl"], ["--out", "--data"]),
    (TUNE + ["--out", "./sub/../d.jsonl"], ["--out", "--data"]),
    (TUNE + ["--out", "link-to-data.jsonl"], ["--out", "--data"]),
    (TUNE + ["--out", "hardlink-to-data.jsonl"], ["--out", "--data"]),
    (TUNE + ["--val-data", "v.jsonl", "--out", "v.jsonl"], ["--out", "--val-data"]),
    (TUNE + ["--out", "new.safetensors", "--checkpoint", "d.jsonl", "--overwrite"], ["--checkpoint", "--data"]),
    (
        TUNE + ["--out", "new.safetensors", "--peft-out", "pdir", "--base", "pdir/adapter_model.safetensors"],
        ["--peft-out", "--base"],
    ),
    (["tune", "--base", "hf:hfdir", "--task", "parity", "--out", "hfdir/model.safetensors"], ["--out", "--base"]),
    # tune: two outputs that are one file
    (TUNE + ["--out", "pdir/adapter_model.safetensors", "--peft-out", "pdir", "--overwrite"], ["--out", "--peft-out"]),
    (TUNE + ["--out", "new.safetensors", "--checkpoint", "new.safetensors"], ["--checkpoint", "--out"]),
    # tune: existing files that are not this run's
    (TUNE + ["--out", "p.safetensors"], ["--out", "--overwrite"]),
    (TUNE + ["--out", "link-to-prompt.safetensors"], ["--out", "--overwrite"]),
    (TUNE + ["--out", "new.safetensors", "--peft-out", "pdir"], ["--peft-out", "--overwrite"]),
    (TUNE + ["--out", "new.safetensors", "--checkpoint", "ck.pt"], ["--checkpoint", "--resume", "--overwrite"]),
    # pretrain
    (["pretrain", "--preset", "pico", "--out", "base.safetensors"], ["--out", "--overwrite"]),
    (
        ["pretrain", "--preset", "pico", "--out", "m.safetensors", "--checkpoint", "m.safetensors"],
        ["--checkpoint", "--out"],
    ),
    # serve
    (SERVE + ["--out", "r.jsonl"], ["--out", "--requests"]),
    (SERVE + ["--out", "p.safetensors"], ["--out", "--prompt t="]),
    (SERVE + ["--out", "link-to-prompt.safetensors"], ["--out", "--prompt t="]),
    (SERVE + ["--out", "base.safetensors"], ["--out", "--base"]),
    (SERVE + ["--out", "answers.jsonl"], ["--out", "--overwrite"]),
    # demo: its base model inside the folder it writes
    (["demo", "--base", "demo/prompt.safetensors", "--out", "demo"], ["--out", "--base"]),
    (["demo", "--base", "base.safetensors", "--out", "demo"], ["--out", "--base"]),  # a hard link, named apart
]


@pytest.mark.parametrize("argv, flags", COLLISIONS, ids=[f"{a[0]}: {' '.join(a[-4:])}" for a, _ in COLLISIONS])
def test_a_collision_is_refused_before_any_work_and_changes_nothing(folder, capsys, monkeypatch, argv, flags):
    def no_work(*args, **kwargs):
        raise AssertionError("work began before the files were claimed")

    for name in (
        "minipt.assets.load_base_and_tokenizer",
        "minipt.assets.load_base",
        "minipt.apps.recipes.pretrain",
        "minipt.apps.demo.demo_base",  # the demo claims its folder first, then loads its base model
    ):
        monkeypatch.setattr(name, no_work)
    before = snapshot(folder)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(flag in err for flag in flags), err
    assert snapshot(folder) == before


def test_the_same_run_may_replace_its_own_output_another_may_not(folder, capsys):
    """The stamp: the same command again is allowed, other settings need --overwrite, and then stamp anew."""
    argv = TUNE + ["--out", "mine.safetensors", "--peft-out", "mine-peft"]
    assert main(argv) == 0
    first = stamp_of("mine.safetensors")
    assert first is not None and stamp_of("mine-peft/adapter_model.safetensors") == first
    assert main(argv) == 0  # the same run again: its own outputs
    assert stamp_of("mine.safetensors") == first
    before = snapshot(folder)
    assert main([*argv[: argv.index("--steps") + 1], "3", *argv[argv.index("--steps") + 2 :]]) == 2
    assert "--overwrite" in capsys.readouterr().err and snapshot(folder) == before
    Path("d.jsonl").write_text(Path("d.jsonl").read_text() + json.dumps({"input": "q", "output": "q"}) + "\n")
    assert main(argv) == 2  # the same flags on other data: another run
    assert main(argv + ["--overwrite"]) == 0
    assert stamp_of("mine.safetensors") not in (None, first)


def test_a_checkpoint_of_another_run_survives_a_run_without_resume(folder, capsys):
    assert main(TUNE + ["--out", "a.safetensors", "--checkpoint", "state.pt"]) == 0
    saved = Path("state.pt").read_bytes()
    other = TUNE[:-1] + ["--lr", "0.5", "--no-progress", "--out", "b.safetensors", "--checkpoint", "state.pt"]
    assert main(other) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    assert Path("state.pt").read_bytes() == saved and not Path("b.safetensors").exists()
    assert main(other + ["--resume"]) == 2  # resuming it is refused too: another run (minipt.checkpoint)
    assert "another run" in capsys.readouterr().err and Path("state.pt").read_bytes() == saved


def _interrupted(checkpoint, before, resume=False):
    args = Namespace(checkpoint=checkpoint, resume=resume, checkpoint_before=before)
    return cli._how_to_continue(args, ["tune", "--checkpoint", checkpoint])


def test_ctrl_c_offers_a_checkpoint_only_when_it_is_this_runs(folder):
    before = cli._stat("ck.pt")
    line = _interrupted("ck.pt", before)  # --overwrite, interrupted before its first checkpoint
    assert line.startswith("nothing was saved") and "ck.pt is left as it was" in line and "--resume" not in line
    assert "continue with" in _interrupted("ck.pt", before, resume=True)  # resumed from it: it is this run's
    Path("ck.pt").unlink()
    Path("ck.pt").write_bytes(b"written by this run")
    assert "the last checkpoint is ck.pt" in _interrupted("ck.pt", before)
    assert "add --checkpoint" in _interrupted(None, None)


def test_serve_writes_atomically_and_replaces_a_link_not_its_target(folder):
    os.symlink("answers.jsonl", "out-link.jsonl")
    target = Path("answers.jsonl").read_bytes()
    assert main(SERVE + ["--max-new-tokens", "2", "--out", "out-link.jsonl", "--overwrite"]) == 0
    assert not Path("out-link.jsonl").is_symlink() and json.loads(Path("out-link.jsonl").read_text())["task"] == "t"
    assert Path("answers.jsonl").read_bytes() == target  # the link's target is untouched
    assert not list(folder.glob(".*.tmp"))


def test_claim_outputs_needs_nothing_on_disk(tmp_path):
    """The library rule alone: new files, equal new outputs, and stamps."""
    claim_outputs({"--in": tmp_path / "missing.jsonl"}, {"--out": tmp_path / "new.jsonl"})
    with pytest.raises(ValueError, match="--a and --b both write"):
        claim_outputs({}, {"--a": tmp_path / "x", "--b": [tmp_path / "y", tmp_path / "z" / ".." / "x"]})
    PromptTuning(GPT(GPTConfig(**SMALL)), n_prompt=2).save(tmp_path / "s.safetensors", {STAMP_KEY: "abc"})
    claim_outputs({}, {"--out": tmp_path / "s.safetensors"}, stamp="abc")
    with pytest.raises(ValueError, match="not this run's earlier result"):
        claim_outputs({}, {"--out": tmp_path / "s.safetensors"}, stamp="abd")


def test_claim_command_stamps_what_changes_the_output_and_nothing_else(tmp_path):
    data, out = tmp_path / "d.jsonl", tmp_path / "p.safetensors"
    data.write_text("one")
    args = {"lr": 0.1, "overwrite": False, "no_progress": True}
    stamp = claim_command("tune", args, {"--data": data}, {"--out": out})
    quiet = {"lr": 0.1, "overwrite": True, "no_progress": False, "resume": True, "checkpoint": "c.pt"}
    assert claim_command("tune", quiet, {"--data": data}, {"--out": out}) == stamp  # NOT_IN_STAMP
    assert claim_command("tune", {**args, "lr": 0.2}, {"--data": data}, {"--out": out}) != stamp
    data.write_text("two")
    assert claim_command("tune", args, {"--data": data}, {"--out": out}) != stamp  # the input's bytes count
    assert claim_command("serve", args, {}, {"--out": out}, stamped=False) is None
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match="same file as --base"):  # an hf:FOLDER input is every file in it
        claim_command("tune", args, {"--base": f"hf:{hf}"}, {"--out": hf / "model.safetensors"})


def test_claim_training_outputs_guards_the_checkpoint_and_the_peft_folder(tmp_path):
    out, state = tmp_path / "p.safetensors", tmp_path / "state.pt"
    with pytest.raises(ValueError, match="--resume needs --checkpoint"):
        claim_training_outputs("tune", {}, {}, out, resume=True)
    state.write_bytes(b"an earlier run's state")
    with pytest.raises(ValueError, match=r"--checkpoint .*state.pt exists .*add --resume .* or --overwrite"):
        claim_training_outputs("tune", {}, {}, out, state)
    assert claim_training_outputs("tune", {}, {}, out, state, resume=True) == claim_training_outputs(
        "tune", {}, {}, out, state, overwrite=True
    )
    with pytest.raises(ValueError, match="--out and --peft-out both write"):
        claim_training_outputs("tune", {}, {}, tmp_path / "a" / "adapter_model.safetensors", peft_out=tmp_path / "a")
    with pytest.raises(ValueError, match="--out .* is a folder"):
        claim_training_outputs("tune", {}, {}, tmp_path)
    assert state.read_bytes() == b"an earlier run's state" and not out.exists()
