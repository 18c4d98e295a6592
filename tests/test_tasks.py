"""Tests for the synthetic task suite: answers, splits, balance, encoding, collation, scoring."""

import hashlib
import random
from collections import Counter

import pytest
import torch

from minipt.data import collate, encode_example, token_frequencies
from minipt.loss import IGNORE_INDEX
from minipt.tasks import (
    HELD_OUT_TASK,
    NEGATIVE_WORDS,
    NEUTRAL_WORDS,
    POSITIVE_WORDS,
    SPLITS,
    TASKS,
    Example,
    get_task,
    make_split,
    pretraining_mixture,
    split_of,
)
from minipt.tokenizer import ByteTokenizer

tok = ByteTokenizer()
LETTER_TASKS = ("copy", "reverse", "sort", "shift", "upper")
CLASSIFICATION_TASKS = [name for name, t in TASKS.items() if t.kind == "classification"]


# --- the suite -------------------------------------------------------------------------------------


def test_suite_has_the_expected_tasks():
    assert len(TASKS) >= 10
    expected = {*LETTER_TASKS, "add", "parity", "contains_digit", "sentiment", "palindrome"}
    assert expected <= set(TASKS)
    assert HELD_OUT_TASK == "palindrome"
    assert len({t.instruction for t in TASKS.values()}) == len(TASKS)  # instructions tell tasks apart
    for name, t in TASKS.items():
        assert t.name == name
        assert (t.kind == "classification") == bool(t.labels)


def test_get_task_unknown_name_lists_valid_ones():
    assert get_task("reverse") is TASKS["reverse"]
    with pytest.raises(ValueError, match="reverse") as info:
        get_task("revrse")
    assert "palindrome" in str(info.value)


@pytest.mark.parametrize(
    "name, x, y",
    [
        ("copy", "abc", "abc"),
        ("reverse", "abc", "cba"),
        ("reverse", "hello", "olleh"),
        ("sort", "dcba", "abcd"),
        ("sort", "banana", "aaabnn"),
        ("shift", "xyz", "yza"),
        ("shift", "abc", "bcd"),
        ("upper", "abc", "ABC"),
        ("add", "37+5", "42"),
        ("add", "0+0", "0"),
        ("add", "99+99", "198"),
        ("parity", "0", "even"),
        ("parity", "7", "odd"),
        ("parity", "99998", "even"),
        ("contains_digit", "abcd", "no"),
        ("contains_digit", "ab3cd", "yes"),
        ("sentiment", "good table bad", None),  # a tie: filled in by the test below
        ("sentiment", "good great bad", "positive"),
        ("sentiment", "awful table chair", "negative"),
        ("sentiment", "happy sad ugly", "negative"),
        ("sentiment", "nice kind sweet", "positive"),
        ("palindrome", "abba", "yes"),
        ("palindrome", "racecar", "yes"),
        ("palindrome", "abc", "no"),
    ],
)
def test_answers_on_hand_written_cases(name, x, y):
    if y is None:
        with pytest.raises(ValueError, match="undecided"):
            get_task(name).answer(x)
    else:
        assert get_task(name).answer(x) == y


def test_sentiment_word_lists():
    for words in (POSITIVE_WORDS, NEGATIVE_WORDS, NEUTRAL_WORDS):
        assert len(words) == 15 and len(set(words)) == 15
    assert not set(POSITIVE_WORDS) & set(NEGATIVE_WORDS)
    assert not (set(POSITIVE_WORDS) | set(NEGATIVE_WORDS)) & set(NEUTRAL_WORDS)


@pytest.mark.parametrize("name", list(TASKS))
def test_sampled_inputs_are_well_formed(name):
    task, rng = get_task(name), random.Random(0)
    for _ in range(300):
        x = task.sample_input(rng)
        y = task.answer(x)  # never raises: sentiment sentences always have a strict majority
        if task.labels:
            assert y in task.labels
        if name in (*LETTER_TASKS, "palindrome"):
            assert 3 <= len(x) <= 7 and x.isalpha() and x.islower()
        elif name == "add":
            a, b = x.split("+")
            assert 0 <= int(a) <= 99 and 0 <= int(b) <= 99
        elif name == "parity":
            assert 0 <= int(x) <= 99_999
        elif name == "contains_digit":
            assert 4 <= len(x) <= 8 and sum(c.isdigit() for c in x) <= 1
        elif name == "sentiment":
            assert len(x.split()) == 3


def test_letter_tasks_share_their_input_distribution():
    """Same seed, same inputs: without the instruction the task cannot be told from the input."""
    draws = set()
    for name in LETTER_TASKS:
        rng = random.Random(3)
        draws.add(tuple(get_task(name).sample_input(rng) for _ in range(50)))
    assert len(draws) == 1


@pytest.mark.parametrize("name", CLASSIFICATION_TASKS)
def test_classes_are_balanced_by_construction(name):
    task, rng = get_task(name), random.Random(1)
    counts = Counter(task.answer(task.sample_input(rng)) for _ in range(2000))
    for label in task.labels:
        assert 0.45 < counts[label] / 2000 < 0.55, counts


# --- splits ----------------------------------------------------------------------------------------


def test_split_of_is_a_stable_hash():
    # pinned values: a change of hash (or Python's salted hash()) would move inputs between splits
    assert (split_of("aaa"), split_of("aac"), split_of("bcb")) == ("train", "val", "test")
    for s in ("abc", "37+5", "12345", "good table bad"):
        bucket = int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "big") % 10
        assert split_of(s) == ("train" if bucket < 8 else "val" if bucket == 8 else "test")
    counts = Counter(split_of(f"{i}") for i in range(10_000))
    assert 0.77 < counts["train"] / 10_000 < 0.83
    assert 0.08 < counts["val"] / 10_000 < 0.12 and 0.08 < counts["test"] / 10_000 < 0.12


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint_and_distinct(name):
    inputs = {}
    for split in SPLITS:
        examples = make_split(name, split, 500)
        assert len(examples) == 500
        assert all(ex.task == name and split_of(ex.input) == split for ex in examples)
        assert all(ex.answer == get_task(name).answer(ex.input) for ex in examples)
        inputs[split] = {ex.input for ex in examples}
        assert len(inputs[split]) == 500  # distinct within the split
    assert not inputs["train"] & inputs["val"]
    assert not inputs["train"] & inputs["test"]
    assert not inputs["val"] & inputs["test"]


def test_make_split_is_deterministic_per_seed():
    assert make_split("reverse", "train", 50, seed=0) == make_split("reverse", "train", 50, seed=0)
    assert make_split("reverse", "train", 50, seed=0) != make_split("reverse", "train", 50, seed=1)
    assert make_split("parity", "test", 50, seed=7) == make_split("parity", "test", 50, seed=7)
    assert make_split("parity", "test", 50, seed=7) != make_split("parity", "test", 50, seed=8)


@pytest.mark.parametrize("name", CLASSIFICATION_TASKS)
@pytest.mark.parametrize("split", SPLITS)
def test_split_labels_are_balanced(name, split):
    examples = make_split(name, split, 201, seed=3)
    counts = Counter(ex.answer for ex in examples)
    assert set(counts) == set(get_task(name).labels)
    for label in get_task(name).labels:
        assert 0.40 <= counts[label] / len(examples) <= 0.60
    # labels alternate, so any prefix is balanced too
    assert [ex.answer for ex in examples[:4]] == list(get_task(name).labels) * 2


def test_make_split_errors():
    with pytest.raises(ValueError, match="split"):
        make_split("copy", "dev", 10)
    with pytest.raises(ValueError, match="valid tasks"):
        make_split("nope", "train", 10)
    assert make_split("copy", "val", 0) == []
    # add has 100 x 100 inputs, about 1,000 of them in val: asking for more must fail, not hang
    with pytest.raises(ValueError, match="distinct"):
        make_split("add", "val", 1500)
    assert len(make_split("add", "val", 1500, unique=False)) == 1500


# --- pretraining mixture ---------------------------------------------------------------------------


def test_pretraining_mixture_covers_all_but_the_held_out_task():
    mix = pretraining_mixture(1000, seed=0)
    assert len(mix) == 1000
    counts = Counter(ex.task for ex in mix)
    assert set(counts) == set(TASKS) - {HELD_OUT_TASK}
    assert max(counts.values()) - min(counts.values()) <= 1  # uniform over tasks
    assert all(split_of(ex.input) == "train" for ex in mix)
    assert [ex.task for ex in mix[:20]] != sorted(ex.task for ex in mix[:20])  # shuffled, not grouped
    assert mix == pretraining_mixture(1000, seed=0)
    assert mix != pretraining_mixture(1000, seed=1)


def test_pretraining_mixture_exclude():
    mix = pretraining_mixture(90, exclude=("palindrome", "add"))
    assert {ex.task for ex in mix} == set(TASKS) - {"palindrome", "add"}
    assert "palindrome" in {ex.task for ex in pretraining_mixture(100, exclude=())}
    with pytest.raises(ValueError, match="valid tasks"):
        pretraining_mixture(10, exclude=("palindrom",))


# --- encoding --------------------------------------------------------------------------------------


@pytest.mark.parametrize("instruction", [True, False])
def test_encode_example_targets_alignment(instruction):
    ex = Example("reverse", "abc", "cba")
    idx, targets = encode_example(ex, tok, instruction)
    prefix = ("Reverse the letters: " if instruction else "") + "abc"
    full = tok.encode(prefix) + [tok.sep_id] + tok.encode("cba") + [tok.eos_id]
    assert idx == full[:-1]
    assert len(targets) == len(idx)
    sep_pos = idx.index(tok.sep_id)
    assert sep_pos == len(tok.encode(prefix))
    assert targets[sep_pos] == ord("c")  # <|sep|> predicts the first answer byte
    assert all(t == IGNORE_INDEX for t in targets[:sep_pos])  # instruction and input are not supervised
    assert targets[-1] == tok.eos_id and idx[-1] == ord("a")  # the last answer byte predicts <|eos|>
    supervised = [t for t in targets if t != IGNORE_INDEX]
    assert tok.decode(supervised, skip_special=False) == "cba<|eos|>"
    # next-token convention: wherever supervised, the target is the following input token
    for t in range(len(idx) - 1):
        if targets[t] != IGNORE_INDEX:
            assert targets[t] == idx[t + 1]


@pytest.mark.parametrize("name", list(TASKS))
def test_encode_example_round_trips_every_task(name):
    for ex in make_split(name, "val", 20):
        idx, targets = encode_example(ex, tok, instruction=True)
        text = tok.decode(idx, skip_special=False)
        assert text == f"{get_task(name).instruction} {ex.input}<|sep|>{ex.answer}"
        assert tok.decode([t for t in targets if t != IGNORE_INDEX]) == ex.answer


def test_collate_pads_right():
    examples = [Example("copy", "abcdefg", "abcdefg"), Example("add", "1+2", "3")]
    idx, targets, mask = collate(examples, tok, instruction=False)
    assert idx.dtype == targets.dtype == mask.dtype == torch.int64
    # "abcdefg" <sep> "abcdefg" <eos> is 16 tokens, so T = 15 after the shift
    assert idx.shape == targets.shape == mask.shape == (2, 15)
    for b, ex in enumerate(examples):
        ids, tgt = encode_example(ex, tok, instruction=False)
        n = len(ids)
        assert idx[b, :n].tolist() == ids and targets[b, :n].tolist() == tgt
        assert (idx[b, n:] == tok.pad_id).all() and (targets[b, n:] == IGNORE_INDEX).all()
        assert mask[b].tolist() == [1] * n + [0] * (15 - n)
    assert mask[1].sum() == len("1+2") + 1 + len("3")
    with pytest.raises(ValueError, match="examples"):
        collate([], tok, instruction=True)


# --- scoring ---------------------------------------------------------------------------------------


def test_token_frequencies():
    examples = [Example("copy", "aab", "aab"), Example("add", "1+1", "2")]
    counts = token_frequencies(examples, tok)
    assert counts.shape == (tok.vocab_size,)
    assert counts[ord("a")] == 4 and counts[ord("b")] == 2 and counts[ord("1")] == 2
    assert counts[tok.sep_id] == 2 and counts[tok.eos_id] == 2 and counts[tok.pad_id] == 0
    assert counts.sum() == (3 + 1 + 3 + 1) + (3 + 1 + 1 + 1)
    with_instruction = token_frequencies(examples, tok, instruction=True)
    assert with_instruction[ord(" ")] > counts[ord(" ")]
