"""`minipt demo`: tune a soft prompt on the frozen tiny base model and show what it gained.

The base model was pretrained on the task mixture, every example led by its written instruction ("Is the
number even or odd?"). Remove the instruction and the frozen model no longer knows what is asked: it does not
answer with a label word at all. A soft prompt of n_prompt vectors, trained on examples without the
instruction while every weight of the model stays frozen, has to learn to say what the instruction said.
Five rows, all scored by exact match on the test split:

    no_prompt      frozen base model, input only
    instruction    frozen base model, the task's written instruction before the input
    soft_uniform   frozen base model + soft prompt, init U(-0.5, 0.5)
    soft_init      frozen base model + soft prompt, init from sampled vocabulary embeddings
    full_finetune  every weight of a copy of the base model trained on the same data, input only
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from ..assets import load_base, shipped_base_path
from ..data import exact_match_accuracy
from ..model import GPT
from ..outputs import claim_outputs
from ..tokenizer import ByteTokenizer
from .plots import plot_runs
from .recipes import FINETUNE_DEFAULTS, PRETRAIN_DEFAULTS, TUNE_DEFAULTS, finetune, pretrain, task_data, tune_prompt

__all__ = ["DEMO_FILES", "DEMO_TASK", "demo_base", "run_demo", "format_table"]

DEMO_FILES = ("prompt.safetensors", "demo.png", "demo.json")  # what run_demo writes into its folder
DEMO_TASK = "parity"  # a classification task, like the SuperGLUE tasks of the paper
ROWS = {
    "no_prompt": "no prompt (frozen model, input only)",
    "instruction": "written instruction (frozen model)",
    "soft_uniform": "soft prompt, uniform init",
    "soft_init": "soft prompt, vocab init",
    "full_finetune": "full fine-tuning (all weights)",
}


def demo_base(path=None, progress: bool = True) -> GPT:
    """The given base model file, else the shipped one, else (a broken install) a freshly pretrained one."""
    if path is not None or shipped_base_path().is_file():
        return load_base(path)
    print(
        f"the shipped base model {shipped_base_path()} is missing: pretraining the tiny preset now "
        "(20 minutes or more on 2 CPU cores)"
    )
    model, _ = pretrain("tiny", replace(PRETRAIN_DEFAULTS, progress=progress))
    return model


def run_demo(
    out="runs/demo",
    task: str = DEMO_TASK,
    n_prompt: int = 20,
    steps: int | None = None,
    base=None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Run the five rows, print the table, and write DEMO_FILES into `out` (its own folder: the demo rewrites
    them; a file there, or a base model among them, is refused before any work)."""
    t0 = time.perf_counter()
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out {out} is a file; the demo writes a folder")
    out = Path(out)
    claim_outputs({"--base": base}, {"--out": [out / name for name in DEMO_FILES]}, overwrite=True)  # rules 1, 2
    out.mkdir(parents=True, exist_ok=True)
    tok = ByteTokenizer()
    model = demo_base(base, progress)
    data = task_data(task, seed=seed)
    test = data[2]
    tune_cfg = replace(TUNE_DEFAULTS, seed=seed, progress=progress, **({"steps": steps} if steps else {}))
    ft_cfg = replace(FINETUNE_DEFAULTS, seed=seed, progress=progress, **({"steps": steps} if steps else {}))

    acc = {
        "no_prompt": exact_match_accuracy(model, test, tok, instruction=False),
        "instruction": exact_match_accuracy(model, test, tok, instruction=True),
    }
    print(
        f"[demo] task {task!r}: tuning two soft prompts of {n_prompt} vectors ({n_prompt * model.config.n_embd:,}"
        f" numbers) on the frozen base model ({model.num_params():,} parameters), then full fine-tuning"
    )
    pt_uniform, run_uniform = tune_prompt(model, task, n_prompt, "uniform", tune_cfg, data=data)
    acc["soft_uniform"] = exact_match_accuracy(pt_uniform, test, tok)
    pt_vocab, run_vocab = tune_prompt(model, task, n_prompt, "vocab", tune_cfg, data=data)
    acc["soft_init"] = exact_match_accuracy(pt_vocab, test, tok)
    tuned, run_ft = finetune(model, task, ft_cfg, data=data)
    acc["full_finetune"] = exact_match_accuracy(tuned, test, tok)

    best = pt_vocab if acc["soft_init"] >= acc["soft_uniform"] else pt_uniform
    best.save(out / "prompt.safetensors")
    plot_runs(
        {"soft prompt, uniform init": run_uniform, "soft prompt, vocab init": run_vocab, "full fine-tuning": run_ft},
        out / "demo.png",
        title=f"task {task!r}, frozen tiny GPT",
        baselines={"no prompt": acc["no_prompt"], "written instruction": acc["instruction"]},
    )
    report = {
        **acc,
        "task": task,
        "n_prompt": n_prompt,
        "n_test": len(test),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    gain = acc["soft_init"] - acc["no_prompt"]
    print(
        f"\nThe soft prompt ({n_prompt} x {model.config.n_embd} trained numbers; the base model stayed frozen) "
        f"raised test exact match from {acc['no_prompt']:.1%} to {max(acc['soft_init'], acc['soft_uniform']):.1%} "
        f"({gain * 100:+.1f} points for vocab init)."
    )
    print(f"Saved: {out / 'prompt.safetensors'}, {out / 'demo.png'}, {out / 'demo.json'} ({report['seconds']:.0f} s)")
    return report


def format_table(report: dict) -> str:
    """The demo's result as a Markdown table (the README shows one)."""
    lines = [f"| {'setting':<40} | test exact match |", f"|{'-' * 42}|------------------|"]
    for key, label in ROWS.items():
        lines.append(f"| {label:<40} | {report[key]:>16.1%} |")
    return "\n".join(lines)
