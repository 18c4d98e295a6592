"""Numbers the prose takes from committed results are read from those files.

Each row of STATED is (file, sentence template, function of the results): the template filled with the numbers
computed from benchmarks/results/ must appear in the file as committed. When a result changes, the sentence no
longer appears and the test names the file and the sentence, so prose cannot drift from the data. Notebooks 5
and 6 also check their own verdicts and numbers as they run (STATED_VERDICTS, STATED_NUMBERS); this test covers
the README, the sentences those cells do not, and the exercise notebooks, without running anything.

Also: the committed outputs of notebook 2 that list kernel source lines (`show`, the PTX line map) name the
lines the kernel file has now, so a stale output fails here.
"""

import csv
import json
import re
import sys
from functools import cache
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@cache
def results_json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


@cache
def results_csv(name: str) -> tuple:
    lines = [line for line in (RESULTS / name).read_text().splitlines() if not line.startswith("#")]
    return tuple(csv.DictReader(lines))


def csv_row(name: str, **where) -> dict:
    (row,) = [r for r in results_csv(name) if all(r[k] == v for k, v in where.items())]
    return row


def json_row(rows, **where) -> dict:
    (row,) = [r for r in rows if all(r[k] == v for k, v in where.items())]
    return row


def memory(config: str, preset: str = "gpt2") -> dict:
    return csv_row("memory-cpu.csv", preset=preset, config=config)


def step(config: str, preset: str) -> dict:
    return csv_row("train_step-cpu.csv", preset=preset, config=config)


def tuned(task: str, wording: str) -> float:
    return json_row(results_json("seed-design.json")["rows"], task=task, wording=wording)["tuned"]["mean"]


def scale_gaps(tasks) -> list:
    """Mean gap (points) per size, averaged over `tasks`, pico to tiny."""
    rows = results_json("lester-scale.json")["rows"]
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    return [sum(json_row(rows, size=s, task=t)["gap"]["mean"] for t in tasks) / len(tasks) * 100 for s in sizes]


def init_mean(init: str) -> float:
    return json_row(results_json("lester-init.json")["rows"], init=init, task="all")["mean"]


def mib(n) -> str:
    return f"{float(n) / 2**20:,.0f} MiB"


def arrow(values, fmt="{:.1f}") -> str:
    return " → ".join(fmt.format(v) for v in values)


NB2, NB5, NB6 = (
    "notebooks/02_fused_kernel.ipynb",
    "notebooks/05_the_paper_in_miniature.ipynb",
    "notebooks/06_the_seed_claims_tested.ipynb",
)
EX3 = "notebooks/exercises/solutions/03_training.ipynb"

STATED = [
    # README: the memory table (gpt2, one step)
    (
        "README.md",
        "| full fine-tuning (AdamW) | {} | {} | {} | {} | {} | {} ms |",
        lambda: (
            f"{int(memory('full fine-tuning')['trainable_params']):,}",
            *(
                f"{float(memory('full fine-tuning')[k]) / 2**20:,.1f} MiB"
                for k in ("gradient_bytes", "optimizer_state_bytes", "saved_bytes")
            ),
            mib(memory("full fine-tuning")["peak_bytes"]),
            f"{float(memory('full fine-tuning')['ms_per_step']):,.0f}",
        ),
    ),
    (
        "README.md",
        "| minipt prompt tuning | {} | {} | {} | {} ({:.2f}× naive) | {} ({:.2f}×) | {} ms |",
        lambda: (
            f"{int(memory('minipt prompt tuning')['trainable_params']):,}",
            *(
                f"{float(memory('minipt prompt tuning')[k]) / 2**20:,.1f} MiB"
                for k in ("gradient_bytes", "optimizer_state_bytes", "saved_bytes")
            ),
            float(memory("minipt prompt tuning")["saved_bytes"]) / float(memory("naive prompt tuning")["saved_bytes"]),
            mib(memory("minipt prompt tuning")["peak_bytes"]),
            float(memory("minipt prompt tuning")["peak_bytes_ratio"]),
            f"{float(memory('minipt prompt tuning')['ms_per_step']):,.0f}",
        ),
    ),
    # README: minipt against PEFT, gpt2
    (
        "README.md",
        "| gpt2 (B=2, n=64) | {:.1f} tokens/s | {:.1f} tokens/s | {:.2f}x ({:.2f}x paired per round) |",
        lambda: (
            float(step("minipt prompt tuning (reference concat)", "gpt2")["tokens_per_s"]),
            float(step("HF GPT-2 + PEFT prompt tuning", "gpt2")["tokens_per_s"]),
            float(step("minipt prompt tuning (reference concat)", "gpt2")["ratio_to_peft"]),
            float(step("minipt prompt tuning (reference concat)", "gpt2")["paired_ratio_to_peft"]),
        ),
    ),
    # NB6: the step-time ratio belongs to short inputs; the README's benchmarks at 64 and 108 tokens
    (
        NB6,
        "prompt tuning is the faster step: {:.0f} against {:.0f} ms\non `tiny` ({} tokens, `train_step-cpu.csv`) and "
        "{:,.0f} against {:,.0f} ms on GPT-2 small (`memory-cpu.csv`), with\n{:.2f} times the peak memory.",
        lambda: (
            float(step("minipt prompt tuning (reference concat)", "tiny")["ms_per_step"]),
            float(step("minipt full fine-tuning", "tiny")["ms_per_step"]),
            step("minipt prompt tuning (reference concat)", "tiny")["seq_len"],
            float(memory("minipt prompt tuning")["ms_per_step"]),
            float(memory("full fine-tuning")["ms_per_step"]),
            float(memory("minipt prompt tuning")["peak_bytes_ratio"]),
        ),
    ),
    # NB6: a misleading start, by task
    (
        NB6,
        "on parity it is ({:.1%} against {:.1%}), on sentiment it is not ({:.1%} against {:.1%}).",
        lambda: (
            tuned("parity", "misleading"),
            tuned("parity", "empty"),
            tuned("sentiment", "misleading"),
            tuned("sentiment", "empty"),
        ),
    ),
    (
        NB6,
        "on sentiment the misleading start ends at {:.1%}, above the uniform one's {:.1%}.",
        lambda: (tuned("sentiment", "misleading"), tuned("sentiment", "empty")),
    ),
    # NB5: the scale gap, with and without parity
    (NB5, "the gap closes with size:** {} points", lambda: (arrow(scale_gaps(["all"])),)),
    (
        NB5,
        "without parity the gap goes {}, and is wider at `tiny` than at `micro`.",
        lambda: (arrow(scale_gaps(["sentiment", "palindrome"])),),
    ),
    (
        NB5,
        "the gap does not keep closing ({:.1f} → {:.1f} points without parity)",
        lambda: (scale_gaps(["sentiment", "palindrome"])[0], scale_gaps(["sentiment", "palindrome"])[-1]),
    ),
    (
        NB5,
        "(39 → 21 points over a 34x range)",
        lambda: (),
    ),  # rounded from the row above: kept literal, checked next to it
    # the exercise notebook on sampled-vocabulary init
    (
        EX3,
        "test exact match {:.1%} (vocab) against {:.1%} (uniform) and {:.1%}\n(class label)",
        lambda: (init_mean("vocab"), init_mean("uniform"), init_mean("label")),
    ),
]


def prose(path: str) -> str:
    """The text of a file as a reader sees it: a notebook's markdown and code cells, joined."""
    file = ROOT / path
    if file.suffix != ".ipynb":
        return file.read_text()
    return "\n\n".join(cell.source for cell in nbformat.read(file, as_version=4).cells)


@pytest.mark.parametrize("path, template, values", STATED, ids=[f"{p}:{t[:30]}" for p, t, _ in STATED])
def test_stated_number_is_read_from_the_results(path, template, values):
    sentence = template.format(*values())
    assert sentence in prose(path), f"{path} should say, from the committed results:\n{sentence}"


def test_rounded_scale_gap_matches_the_results():
    gaps = scale_gaps(["all"])
    assert f"({gaps[0]:.0f} → {gaps[-1]:.0f} points over a 34x range)" in prose(NB5)


def test_a_planted_change_in_the_results_is_caught(monkeypatch):
    """The test reads the files: a different number in a results file makes its sentence fail."""
    rows = [dict(r) for r in results_csv("memory-cpu.csv")]
    for r in rows:
        if r["config"] == "minipt prompt tuning" and r["preset"] == "gpt2":
            r["peak_bytes_ratio"] = "0.4100"
    original = results_csv
    monkeypatch.setattr(
        sys.modules[__name__], "results_csv", lambda name: tuple(rows) if name == "memory-cpu.csv" else original(name)
    )
    path, template, values = STATED[3]
    with pytest.raises(AssertionError, match="0.41 times the peak memory"):
        test_stated_number_is_read_from_the_results(path, template, values)


# ---- notebook 2's source listings name the lines the file has now ----------------------------------------


def kernel_source() -> list:
    return (ROOT / "kernels" / "prompt_concat.py").read_text().splitlines()


def test_notebook_2_listings_are_not_stale():
    source = kernel_source()
    nb = nbformat.read(ROOT / NB2, as_version=4)
    listed = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        text = "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream")
        for line in text.splitlines():
            shown = re.match(r"^\s*(\d+) \| (.*)$", line)  # show(first, last): "NNN | source, dedented"
            if shown:
                number, body = int(shown.group(1)), shown.group(2)
                assert source[number - 1].strip() == body.strip(), (
                    f"notebook 2 shows line {number} as {body.strip()!r}; the file has "
                    f"{source[number - 1].strip()!r} there: run the notebook again and commit its outputs"
                )
                listed += 1
            mapped = re.search(r"<- line (\d+): (.*)$", line)  # the PTX line map: ".loc" line -> source
            if mapped:
                number, body = int(mapped.group(1)), mapped.group(2)
                assert source[number - 1].strip()[:90] == body.strip(), (
                    f"notebook 2 maps an instruction to line {number} ({body.strip()!r}); the file has "
                    f"{source[number - 1].strip()[:90]!r} there: run the notebook again and commit its outputs"
                )
                listed += 1
    assert listed > 20  # the listings are there to be checked
