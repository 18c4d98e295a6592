"""Predict, measure, explain (notebook `06_predict_measure`): numbers predicted before they are looked up.

The student's `predict()` returns three predictions, made from the model's shapes and the algorithm alone:

    step_ratio_10     a prompt-tuning step's time over a full fine-tuning step's, tiny model, ~10-token inputs
    step_ratio_108    the same at 108 tokens
    adamw_state_bytes AdamW's state for a 20-token prompt on GPT-2 small (D = 768), float32

Each is checked against the project's committed measurements (benchmarks/results/): the seed-claims run on
parity (inputs of about 10 tokens, `seed-fewshot.json`), the train-step benchmark at 108 tokens
(`train_step-cpu.csv`) and the memory benchmark (`memory-cpu.csv`). A time ratio passes when it is on the
measured side of 1 (faster or slower is the point) and within a factor RATIO_FACTOR of the measurement; the
bytes pass within 1% (AdamW also keeps a 4-byte step counter).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .result import CheckResult, call_answer, failed, passed

__all__ = ["CHECKERS", "KEYS", "RATIO_FACTOR", "RESULTS", "check_predict_measure", "measured"]

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
RATIO_FACTOR = 1.5
KEYS = ("step_ratio_10", "step_ratio_108", "adamw_state_bytes")


def measured() -> dict:
    """The three measurements, read from the committed results."""
    fewshot = json.loads((RESULTS / "seed-fewshot.json").read_text())
    parity = fewshot["compute"]["per_task"]["parity"]
    rows = [
        r
        for r in csv.DictReader(
            line for line in (RESULTS / "train_step-cpu.csv").read_text().splitlines() if not line.startswith("#")
        )
    ]
    tiny = {r["config"]: r for r in rows if r["preset"] == "tiny"}
    memory = [
        r
        for r in csv.DictReader(
            line for line in (RESULTS / "memory-cpu.csv").read_text().splitlines() if not line.startswith("#")
        )
    ]
    prompt_gpt2 = next(r for r in memory if r["preset"] == "gpt2" and r["config"] == "minipt prompt tuning")
    return {
        "step_ratio_10": parity["prompt"]["seconds_per_step"] / parity["finetune"]["seconds_per_step"],
        "step_ratio_108": float(tiny["minipt prompt tuning (reference concat)"]["ms_per_step"])
        / float(tiny["minipt full fine-tuning"]["ms_per_step"]),
        "adamw_state_bytes": float(prompt_gpt2["optimizer_state_bytes"]),
        "tokens_108": int(tiny["minipt full fine-tuning"]["seq_len"]),
    }


def check_predict_measure(answer) -> CheckResult:
    """answer() -> dict of the three predictions (see the module docstring)."""
    exercise = "predict_measure"
    tried = [
        "step-time ratios from seed-fewshot.json (parity) and train_step-cpu.csv (tiny, 108 tokens); AdamW "
        "state from memory-cpu.csv (gpt2, 20 prompt tokens)"
    ]
    if not RESULTS.is_dir():
        return failed(
            exercise,
            f"the committed results are not here ({RESULTS.name}/ of a minipt checkout): run "
            f"this notebook from the repository",
            tried,
        )
    if not callable(answer):
        return failed(exercise, f"the answer must be the function predict, got {type(answer).__name__}", tried)
    got, error = call_answer(answer, ())
    if error:
        return failed(exercise, f"predict() {error}.", tried)
    if (
        not isinstance(got, dict)
        or set(got) != set(KEYS)
        or not all(isinstance(got[k], (int, float)) and math.isfinite(got[k]) and got[k] > 0 for k in KEYS)
    ):
        return failed(
            exercise, f"predict() must return a dict of three positive numbers {list(KEYS)}, got {got!r}", tried
        )
    m = measured()
    for key, tokens in (("step_ratio_10", 10), ("step_ratio_108", m["tokens_108"])):
        want, said = m[key], float(got[key])
        side = "slower" if want > 1 else "faster"
        if (said > 1) != (want > 1):
            return failed(
                exercise,
                f"{key}: you predicted {said:.2f}x, but at about {tokens} tokens a prompt-tuning "
                f"step is {side} than a fine-tuning step (measured {want:.2f}x). Think about "
                f"what the 20 prompt slots add to a sequence of {tokens} tokens, and what "
                f"freezing saves (weight gradients and the optimizer update).",
                tried,
            )
        if not want / RATIO_FACTOR <= said <= want * RATIO_FACTOR:
            return failed(
                exercise,
                f"{key}: you predicted {said:.2f}x, measured {want:.2f}x: the right side of 1, "
                f"but more than a factor {RATIO_FACTOR} away.",
                tried,
            )
    want, said = m["adamw_state_bytes"], float(got["adamw_state_bytes"])
    if abs(said - want) > 0.01 * want:
        return failed(
            exercise,
            f"adamw_state_bytes: you predicted {said:,.0f}, measured {want:,.0f}. AdamW keeps two "
            f"moments (exp_avg, exp_avg_sq) per trained number, each float32, and the prompt is "
            f"the only trained tensor: 20 x 768 numbers.",
            tried,
        )
    return passed(
        exercise,
        f"measured: {m['step_ratio_10']:.2f}x at about 10 tokens (the 20 prompt slots triple "
        f"the sequence), {m['step_ratio_108']:.2f}x at {m['tokens_108']} tokens (the slots add "
        f"a fifth, and freezing saves the weight gradients and the update), and "
        f"{m['adamw_state_bytes']:,.0f} bytes of AdamW state (2 x 20 x 768 x 4, plus a 4-byte "
        f"step counter).",
        tried,
    )


CHECKERS = {"predict_measure": check_predict_measure}
