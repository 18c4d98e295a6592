"""Tests for `minipt experiment seed-claims` (minipt/apps/seed_claims.py): the shifted domains of minipt.tasks,
the run plan, the data rules (nested training subsets, a validation split as small as the training set), the
exactness of the design experiment's starting point, the verdict rules, the --quick run end to end with resume,
and the committed results and README table."""

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from minipt import ByteTokenizer, PromptTuning
from minipt.apps import seed_claims as sc
from minipt.apps.recipes import METHOD_DEFAULTS
from minipt.assets import load_base
from minipt.checkpoint import model_fingerprint
from minipt.data import collate, exact_match_accuracy
from minipt.tasks import DOMAINS, TASKS, get_task, make_split, split_of

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
tok = ByteTokenizer()


# ---- the shifted domains -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DOMAINS))
def test_a_domain_is_a_seeded_hash_split_of_its_own_inputs(name):
    domain = DOMAINS[name]
    task = domain.tasks[0]
    for split in ("train", "val", "test"):
        examples = make_split(task, split, 40, seed=3, domain=name)
        assert all(split_of(ex.input) == split for ex in examples)  # the same hash rule: disjoint splits
        assert all(ex.answer == get_task(task).answer(ex.input) for ex in examples)
        assert examples == make_split(task, split, 40, seed=3, domain=name)  # seeded
        assert examples != make_split(task, split, 40, seed=4, domain=name)
    assert make_split(task, "test", 40, domain=name) != make_split(task, "test", 40)  # not the task's own inputs


def test_the_domains_are_what_they_say():
    assert {len(ex.input) for ex in make_split("parity", "test", 200, domain="short-numbers")} == {3, 4}
    assert {len(ex.input) for ex in make_split("parity", "test", 200, domain="five-digit-numbers")} == {5}
    assert {len(ex.input) for ex in make_split("upper", "train", 200, domain="short-letters")} == {3, 4, 5}
    assert {len(ex.input) for ex in make_split("upper", "test", 200, domain="long-letters")} == {6, 7}
    from minipt.tasks import NEUTRAL_WORDS, UNSEEN_NEUTRAL_WORDS, pretraining_mixture

    assert not set(UNSEEN_NEUTRAL_WORDS) & set(NEUTRAL_WORDS)
    for ex in make_split("sentiment", "test", 200, domain="unseen-words"):
        assert any(w in UNSEEN_NEUTRAL_WORDS for w in ex.input.split())
    pretraining_words = {w for ex in pretraining_mixture(3000) if ex.task == "sentiment" for w in ex.input.split()}
    assert not pretraining_words & set(UNSEEN_NEUTRAL_WORDS)


def test_a_domain_of_another_task_is_refused():
    with pytest.raises(ValueError, match="short-numbers"):
        make_split("sentiment", "test", 5, domain="short-numbers")
    with pytest.raises(ValueError, match="unknown domain"):
        make_split("parity", "test", 5, domain="huge-numbers")


def test_training_sets_of_growing_size_are_nested():
    """make_split(n) is the first n examples of make_split(N > n): a seed's 8 examples are in its 2048."""
    big = make_split("sentiment", "train", 256, seed=2)
    assert make_split("sentiment", "train", 16, seed=2) == big[:16]
    run = sc.Run("fewshot", "finetune", "sentiment", 16, 2)
    train_ex, val_ex, test_ex = sc.run_data(run, sc.SeedSetup())
    assert train_ex == big[:16] and len(val_ex) == 16 and len(test_ex) == 500  # validation as small as training
    assert len(sc.run_data(replace(run, n_train=2048), sc.SeedSetup())[1]) == sc.SeedSetup().val_cap
    assert sc.run_data(replace(run, seed=1), sc.SeedSetup())[0] != train_ex  # the seed draws the subset


# ---- the plan ----------------------------------------------------------------------------------------------


def test_the_plan():
    setup = sc.SeedSetup()
    runs = sc.planned_runs(setup)
    assert len(runs) == len({r.key for r in runs})
    T, S, N, M = len(setup.tasks), len(setup.seeds), len(setup.sizes), len(setup.methods)
    # few-shot curve, 4 design wordings with a text (the empty one is a few-shot run), the shift runs
    assert len(runs) == T * S * (N * M + 4 + len(setup.shift_methods))
    empty = sc.design_run(setup, "parity", "empty", 0)
    assert empty == sc.Run("fewshot", "prompt-uniform", "parity", setup.design_size, 0) and empty in runs
    for n in setup.sizes:  # the same step budget for every method at a size
        assert (
            sc.train_config(setup.tune, setup.steps_for(n), 0).steps
            == sc.train_config(setup.finetune, setup.steps_for(n), 0).steps
        )
    assert list(setup.steps) == sorted(setup.steps)  # a budget that grows (slowly) with the size
    assert set(sc.WORDINGS) >= set(setup.tasks) and set(sc.SHIFTS) >= set(setup.tasks)
    for task in setup.tasks:
        assert list(sc.WORDINGS[task]) == [*sc.PARAPHRASES, "misleading", "empty"]
        assert sc.WORDINGS[task]["pretraining"] == get_task(task).instruction
        assert sc.WORDINGS[task]["misleading"] in {t.instruction for t in TASKS.values()}


def test_a_new_method_keeps_the_recorded_runs_but_a_new_budget_does_not():
    bases = {"tiny": load_base()}
    setup = sc.SeedSetup()
    more = replace(setup, methods=(*setup.methods, "prompt-text"))  # as a P-tuning v2 row would be added
    assert more.fingerprint(bases) == setup.fingerprint(bases)
    assert replace(setup, steps=(1,) * len(setup.sizes)).fingerprint(bases) != setup.fingerprint(bases)
    assert replace(setup, n_prompt=5).fingerprint(bases) != setup.fingerprint(bases)


def test_every_method_has_a_trainer():
    for method in sc.METHODS.values():
        assert method.kind in ("frozen", "finetune", *METHOD_DEFAULTS)  # what runs.train_and_score trains
    assert sc.prompt_init(sc.METHODS["prompt-label"], "parity") == "label"
    assert sc.prompt_init(sc.METHODS["prompt-label"], "upper") == "vocab"  # no class labels to start from


def test_a_prompt_started_from_a_wording_is_that_wording():
    """The design experiment's starting point: a soft prompt of the embeddings of `wording + " "` gives the
    logits of the frozen model reading the wording, exactly (positions included), so 'before tuning' is the
    written instruction itself."""
    model = load_base()
    for task in ("parity", "upper"):
        text = sc.wording_prefix(get_task(task).instruction)
        pt = PromptTuning(model, n_prompt=len(tok.encode(text)), init="text", init_text=text, tokenizer=tok)
        examples = make_split(task, "test", 16)
        idx, _, _ = collate(examples, tok, instruction=False)
        idx_written, _, _ = collate(examples, tok, instruction=True)
        with torch.no_grad():
            assert torch.equal(pt(idx)[0], model(idx_written)[0][:, len(text) :])
        assert sc._frozen_accuracy(model, task, get_task(task).instruction, examples) == exact_match_accuracy(
            model, examples, tok, instruction=True
        )


# ---- the verdict rules -------------------------------------------------------------------------------------


def test_compare_needs_more_than_the_seed_spread():
    a, b = {"mean": 0.8, "std": 0.03}, {"mean": 0.7, "std": 0.04}
    assert sc.beyond_noise(a, b) and not sc.beyond_noise(b, a)
    assert sc.compare(a, b, "yes", "no") == "yes" and sc.compare(b, a, "yes", "no") == "no"
    assert sc.compare(a, {"mean": 0.76, "std": 0.04}, "yes", "no").startswith("inconclusive")


# ---- the quick run -----------------------------------------------------------------------------------------


def _check_files(files: dict, setup: sc.SeedSetup) -> None:
    for part, content in files.items():
        assert content["experiment"] == part and content["setup"]["seeds"] == list(setup.seeds)
    for row in files["fewshot"]["rows"]:
        assert len(row["values"]) == len(setup.seeds) and all(0.0 <= v <= 1.0 for v in row["values"])
    for row in files["design"]["rows"]:
        assert len(row["tuned"]["values"]) == len(setup.seeds)
    for row in files["shift"]["rows"]:
        assert row["drop"]["mean"] == pytest.approx(row["in_domain"]["mean"] - row["shifted"]["mean"])
    for compute in files["fewshot"]["compute"]["per_task"].values():
        assert compute["prompt"]["trainable"] == setup.n_prompt * 128 and compute["finetune"]["trainable"] == 843_008
        # AdamW: two fp32 moments per trainable number (and a step count per tensor)
        assert 8 * compute["prompt"]["trainable"] <= compute["prompt"]["optimizer_state_bytes"] < 9 * 2560
        assert compute["finetune"]["optimizer_state_bytes"] >= 8 * 843_008
    rows = sc.verdicts(files["fewshot"], files["design"], files["shift"])
    assert [r["id"] for r in rows] == ["1a", "1b", "2", "3a", "3b", "4"]


@pytest.mark.slow
def test_quick_run_through_the_cli_then_resume(tmp_path):
    """`minipt experiment seed-claims --quick` as a user runs it; then the same call again trains nothing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    results, work = tmp_path / "results", tmp_path / "work"
    cmd = [
        sys.executable,
        "-m",
        "minipt",
        "experiment",
        "seed-claims",
        "--quick",
        "--results",
        str(results),
        "--work",
        str(work),
        "--no-progress",
        "--threads",
        "1",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    n_runs = len(sc.planned_runs(sc.QUICK))
    assert f"{n_runs} runs planned, {n_runs} to train" in done.stdout
    files = sc.load_results(results)
    assert files["fewshot"]["command"].startswith("minipt experiment seed-claims --quick")
    _check_files(files, sc.QUICK)
    assert (results / "seed-claims.png").stat().st_size > 10_000

    again = sc.run_seed_claims(sc.QUICK, tmp_path / "again", work, command="test", progress=False, threads=1)
    for part in sc.PARTS:  # nothing retrained: the recorded runs were reused
        assert again[part]["rows"] == files[part]["rows"]


# ---- the committed results ---------------------------------------------------------------------------------


def committed():
    return sc.load_results(RESULTS)


def test_committed_results_come_from_one_full_run():
    files = committed()
    assert len({f["created"] for f in files.values()}) == 1  # written together by one call
    for content in files.values():
        assert content["command"].startswith("minipt experiment seed-claims") and "--quick" not in content["command"]
        assert content["setup"] == json.loads(json.dumps(asdict(sc.SeedSetup())))  # the full setup
        assert content["base"]["fingerprint"] == model_fingerprint(load_base())  # the shipped tiny model
    _check_files(files, sc.SeedSetup())
    assert (RESULTS / "seed-claims.png").is_file()


def test_the_readme_table_is_computed_from_the_committed_results():
    files = committed()
    table = sc.verdict_table(sc.verdicts(files["fewshot"], files["design"], files["shift"]))
    readme = (ROOT / "README.md").read_text()
    assert table in readme, "README's table of the explainer's claims differs from verdicts(): paste\n" + table
    assert "benchmarks/results/seed-claims.png" in readme
    assert re.search(r"^\| claim \| measurement \| verdict \|$", readme, re.M)
