"""Tests that each kill planted bugs that mutation testing (`make mutate MODULE=minipt/exercises/predict.py`) found
in the predict-measure checker: the whole result (exercise id, verdict, message, what was tried) of every path, and
the edges of each bound, with the measurements replaced by round numbers so each edge is exact."""

import pytest

import minipt.exercises.predict as predict
from minipt.exercises.result import CheckResult

TRIED = (
    "step-time ratios from seed-fewshot.json (parity) and train_step-cpu.csv (tiny, 108 tokens); AdamW "
    "state from memory-cpu.csv (gpt2, 20 prompt tokens)",
)
MEASURED = {"step_ratio_10": 3.0, "step_ratio_108": 0.75, "adamw_state_bytes": 100_000.0, "tokens_108": 108}
RIGHT = {"step_ratio_10": 3.0, "step_ratio_108": 0.75, "adamw_state_bytes": 100_000}


@pytest.fixture
def check(monkeypatch):
    """check(predictions, **measured): the checker against these measurements instead of the committed ones."""

    def run(answer, **changed):
        monkeypatch.setattr(predict, "measured", lambda: {**MEASURED, **changed})
        return predict.check_predict_measure(answer)

    return run


def refused(message: str) -> CheckResult:
    return CheckResult("predict_measure", False, message, TRIED)


def test_a_right_prediction_passes_and_says_what_was_measured(check):
    message = (
        "measured: 3.00x at about 10 tokens (the 20 prompt slots triple the sequence), 0.75x at 108 tokens (the "
        "slots add a fifth, and freezing saves the weight gradients and the update), and 100,000 bytes of AdamW "
        "state (2 x 20 x 768 x 4, plus a 4-byte step counter)."
    )
    assert check(lambda: RIGHT) == CheckResult("predict_measure", True, message, TRIED)


def test_without_the_committed_results_the_checker_says_where_to_run(monkeypatch, tmp_path):
    monkeypatch.setattr(predict, "RESULTS", tmp_path / "results")
    assert predict.check_predict_measure(lambda: RIGHT) == refused(
        "the committed results are not here (results/ of a minipt checkout): run this notebook from the repository"
    )


def test_an_answer_that_is_not_a_function_is_named(check):
    assert check(5) == refused("the answer must be the function predict, got int")


def test_an_answer_that_raises_is_reported_with_its_error(check):
    def answer():
        raise ValueError("no idea")

    assert check(answer) == refused("predict() raised ValueError: no idea.")


@pytest.mark.parametrize(
    "got",
    [
        {"step_ratio_10": 3.0},  # a key missing
        {**RIGHT, "step_ratio_108": 0},  # zero is not positive
        {**RIGHT, "adamw_state_bytes": -100_000},  # finite but negative
        {**RIGHT, "step_ratio_10": "3"},  # not a number
    ],
)
def test_anything_but_three_positive_numbers_is_refused_as_such(check, got):
    assert check(lambda: got) == refused(
        "predict() must return a dict of three positive numbers ['step_ratio_10', 'step_ratio_108', "
        f"'adamw_state_bytes'], got {got!r}"
    )


def test_the_wrong_side_of_1_names_the_side_and_the_tokens(check):
    assert check(lambda: {**RIGHT, "step_ratio_10": 1.0}) == refused(  # 1.0 is not slower
        "step_ratio_10: you predicted 1.00x, but at about 10 tokens a prompt-tuning step is slower than a "
        "fine-tuning step (measured 3.00x). Think about what the 20 prompt slots add to a sequence of 10 tokens, "
        "and what freezing saves (weight gradients and the optimizer update)."
    )
    assert check(lambda: {**RIGHT, "step_ratio_108": 1.2}, step_ratio_108=1.0) == refused(  # 1.0 measured: faster
        "step_ratio_108: you predicted 1.20x, but at about 108 tokens a prompt-tuning step is faster than a "
        "fine-tuning step (measured 1.00x). Think about what the 20 prompt slots add to a sequence of 108 tokens, "
        "and what freezing saves (weight gradients and the optimizer update)."
    )


@pytest.mark.parametrize("said, ok", [(2.0, True), (4.5, True), (1.99, False), (4.51, False)])
def test_a_ratio_passes_within_a_factor_of_1_5_edges_included(check, said, ok):
    result = check(lambda: {**RIGHT, "step_ratio_10": said})  # measured 3.0: [2.0, 4.5]
    assert result.passed == ok
    if not ok:
        assert result == refused(
            f"step_ratio_10: you predicted {said:.2f}x, measured 3.00x: the right side of 1, but more than a "
            "factor 1.5 away."
        )


def test_a_measured_ratio_of_1_counts_as_faster(check):
    assert check(lambda: {**RIGHT, "step_ratio_108": 0.9}, step_ratio_108=1.0).passed


@pytest.mark.parametrize("said, ok", [(101_000, True), (99_000, True), (101_001, False), (98_999, False)])
def test_the_bytes_pass_within_1_percent_edges_included(check, said, ok):
    result = check(lambda: {**RIGHT, "adamw_state_bytes": said})
    assert result.passed == ok
    if not ok:
        assert result == refused(
            f"adamw_state_bytes: you predicted {said:,}, measured 100,000. AdamW keeps two moments (exp_avg, "
            "exp_avg_sq) per trained number, each float32, and the prompt is the only trained tensor: 20 x 768 "
            "numbers."
        )
