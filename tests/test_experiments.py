"""Tests for minipt.experiments (`minipt experiment lester`): the run plan, the committed base-model ladder,
the --quick run end to end through the CLI, resuming from recorded runs, and the committed full results."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import random_gpt
from minipt import GPT
from minipt.apps.experiments import EXPERIMENTS, QUICK, SIZES, LesterSetup, planned_runs, pretrain_bases, run_lester
from minipt.apps.recipes import PRETRAIN_DEFAULTS
from minipt.apps.runs import RunRecorder, spread
from minipt.assets import base_path, load_bases
from minipt.checkpoint import model_fingerprint
from minipt.model import PRESETS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def test_the_plan_trains_every_shared_run_once():
    runs = planned_runs(QUICK)
    assert len(runs) == len({r.key for r in runs})
    # by hand, for QUICK (1 task, 3 seeds, sizes pico < nano, lengths 1 and 5, default n_prompt 5 and init label):
    #   length 2 x 3 = 6; init: uniform and vocab 2 x 3 = 6 (label at n=5 is a length run);
    #   scale: pico prompt 3 + fine-tune of both sizes 6 (nano's prompt is a length run);
    #   ensembles: 3 groups of 3 prompt seeds = 9, of which seeds 0-2 are already there: 6.
    assert len(runs) == 6 + 6 + 9 + 6
    full = planned_runs(LesterSetup())
    assert sum(r.kind == "finetune" for r in full) == 3 * 4 * 3  # tasks x sizes x seeds
    assert {r.seed for r in full if r.kind == "prompt" and r.size == "tiny"} == set(range(15))  # 3 groups of 5
    assert LesterSetup().ensemble_groups() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]


def test_spread_is_mean_and_sample_std():
    s = spread([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2)
    assert spread([0.4])["std"] == 0.0


@pytest.mark.parametrize("size", SIZES)
def test_the_ladder_ships_small_and_matches_its_preset(size):
    path = base_path(size)
    assert path.is_file() and path.stat().st_size < 5 * 1024 * 1024
    model = GPT.from_checkpoint(path)
    preset = PRESETS[size]
    assert (model.config.n_layer, model.config.n_embd) == (preset["n_layer"], preset["n_embd"])


def test_quick_run_through_the_cli_then_resume(tmp_path):
    """`minipt experiment lester --quick` as a user runs it; then the same call again trains nothing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results, work = tmp_path / "results", tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "minipt",
        "experiment",
        "lester",
        "--quick",
        "--results",
        str(results),
        "--work",
        str(work),
        "--no-progress",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "27 runs planned, 27 to train" in done.stdout
    rows = {}
    for name in EXPERIMENTS:
        saved = json.loads((results / f"lester-{name}.json").read_text())
        assert saved["experiment"] == name and saved["command"].startswith("minipt experiment lester --quick")
        assert saved["setup"]["seeds"] == [0, 1, 2]
        rows[name] = saved["rows"]
    assert (results / "lester.png").stat().st_size > 10_000
    assert len(list((work / "prompts").glob("*.safetensors"))) == 21  # every prompt run keeps its prompt
    for row in rows["length"] + rows["init"]:
        assert len(row["values"]) == 3 and all(0.0 <= v <= 1.0 for v in row["values"])
    for row in rows["scale"]:
        for key in ("prompt", "finetune"):
            assert len(row[key]["values"]) == 3
        assert row["gap"]["mean"] == pytest.approx(row["finetune"]["mean"] - row["prompt"]["mean"])
    ens = next(r for r in rows["ensemble"] if r["task"] == "all")
    assert ens["best_single"]["mean"] >= ens["mean_single"]["mean"]

    again = run_lester(QUICK, tmp_path / "again", work, command="test", progress=False)
    assert again["length"] == rows["length"]  # nothing retrained: the recorded runs were reused
    assert again["ensemble"] == rows["ensemble"]


def test_runs_of_another_setup_or_other_bases_are_set_aside(tmp_path):
    bases = {"pico": random_gpt(PRESETS["pico"], seed=0)}
    recorder = RunRecorder.open(tmp_path, QUICK, bases)
    recorder.add("prompt-x", {"test": 0.5})
    assert RunRecorder.open(tmp_path, QUICK, bases).runs == {"prompt-x": {"test": 0.5}}
    other = RunRecorder.open(tmp_path, replace(QUICK, n_test=99), bases)
    assert other.runs == {} and (tmp_path / "runs.old.json").is_file()
    other.add("prompt-y", {"test": 0.1})
    retrained = {"pico": random_gpt(PRESETS["pico"], seed=1)}  # same setup, other weights: nothing is reused
    assert RunRecorder.open(tmp_path, replace(QUICK, n_test=99), retrained).runs == {}


def test_lester_bases_pretrains_each_size_with_one_recipe(tmp_path):
    """`minipt experiment lester-bases` in small: the same recipe, cut to a few steps, for two sizes."""
    cfg = replace(PRETRAIN_DEFAULTS, steps=3, eval_every=3, warmup_steps=1)
    paths = pretrain_bases(tmp_path, ("pico", "nano"), cfg, progress=False, n_examples=200)
    assert paths == [tmp_path / "pico.safetensors", tmp_path / "nano.safetensors"]
    bases = load_bases(("pico", "nano"), tmp_path)  # what `lester --bases DIR` reads
    assert [m.config.n_embd for m in bases.values()] == [PRESETS["pico"]["n_embd"], PRESETS["nano"]["n_embd"]]


def test_missing_base_model_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="lester-bases"):
        run_lester(QUICK, tmp_path / "r", tmp_path / "w", bases_dir=tmp_path, progress=False)


def test_committed_results_come_from_one_full_run():
    """The files the README and notebook 05 show: the full setup, one command, three seeds, all four parts."""
    metas = [json.loads((RESULTS / f"lester-{name}.json").read_text()) for name in EXPERIMENTS]
    assert {m["created"] for m in metas} == {metas[0]["created"]}  # written together by one run
    for meta in metas:
        assert meta["command"] == "minipt experiment lester"
        assert meta["setup"]["lengths"] == [1, 5, 20, 50] and len(meta["setup"]["seeds"]) >= 3
        assert meta["setup"]["sizes"] == list(SIZES) and meta["setup"]["ensemble_size"] == 5
        for size in SIZES:  # made with the base models that ship, not with others
            assert meta["bases"][size]["fingerprint"] == model_fingerprint(GPT.from_checkpoint(base_path(size)))
    assert (RESULTS / "lester.png").is_file()
