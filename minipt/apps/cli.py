"""The `minipt` command: demo | pretrain | tune | eval | generate | serve | bench | experiment | exercises.

Every subcommand has --help. This module only parses arguments and prints; the work is in minipt and its apps.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import replace
from pathlib import Path

__all__ = ["build_parser", "main"]

# ---- argument types: every value is checked while parsing, before any model is built or file touched ----
# argparse turns an ArgumentTypeError into "minipt CMD: error: argument --NAME: MESSAGE" and exit code 2.

SEED_RANGE = 2**32


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _bounded(convert, ok, expected: str):
    """An argument type: `convert(text)` (_int or _float), refused as "expected {expected}" unless ok(value)."""

    def parse(text: str):
        value = convert(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


count = _bounded(_int, lambda v: v >= 1, "an integer >= 1")  # steps, batch size, examples, n_prompt, ...
seed = _bounded(_int, lambda v: 0 <= v < SEED_RANGE, "an integer in [0, 2**32)")
rate = _bounded(_float, lambda v: v > 0, "a finite number > 0")  # learning rates
temperature = _bounded(_float, lambda v: v >= 0, "a finite number >= 0")  # 0 is greedy
fraction = _bounded(_float, lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")


def text_arg(text: str) -> str:
    """A non-empty text (blank is refused too)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a non-empty text, got {text!r}")
    return text


def path_arg(text: str) -> str:
    """A non-empty path."""
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a path, got {text!r}")
    return text


def _train_flags(
    p: argparse.ArgumentParser, defaults, lr_help: str = "peak learning rate (default %(default)s)"
) -> None:
    p.add_argument("--steps", type=count, default=defaults.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=count, default=defaults.batch_size, help="default %(default)s")
    p.add_argument("--lr", type=rate, default=defaults.lr, help=lr_help)
    p.add_argument(
        "--optimizer", choices=["adamw", "adafactor"], default=defaults.optimizer, help="default %(default)s"
    )
    p.add_argument("--seed", type=seed, default=defaults.seed, help="default %(default)s")
    p.add_argument(
        "--eval-every",
        type=count,
        default=defaults.eval_every,
        help="steps between evaluations and checkpoints (default %(default)s)",
    )
    p.add_argument(
        "--checkpoint", type=path_arg, help="training-state file written every eval; with --resume, continue from it"
    )
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    _overwrite_flag(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _overwrite_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (without it, only this same run's earlier outputs are replaced); "
        "an output is never an input",
    )


TRAIN_FLAGS = ("steps", "batch_size", "lr", "optimizer", "seed", "eval_every")  # _train_flags' TrainConfig fields


def _config(args, defaults):
    """defaults (a TrainConfig) with the training flags' values."""
    return replace(defaults, **{name: getattr(args, name) for name in TRAIN_FLAGS}, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    from ..model import PRESETS
    from ..prompt import INIT_MODES
    from ..tasks import TASKS
    from .demo import DEMO_TASK
    from .recipes import METHOD_DEFAULTS, METHODS, PRETRAIN_DEFAULTS, TUNE_DEFAULTS

    parser = argparse.ArgumentParser(prog="minipt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="tune a soft prompt on the frozen tiny base model; print what it gained")
    p.add_argument(
        "--out", type=path_arg, default="runs/demo", help="folder for prompt, plot and demo.json (default %(default)s)"
    )
    p.add_argument("--task", default=DEMO_TASK, choices=sorted(TASKS), help="default %(default)s")
    p.add_argument("--n-prompt", type=count, default=20, help="soft prompt length (default %(default)s)")
    p.add_argument("--steps", type=count, default=None, help=f"training steps per run (default {TUNE_DEFAULTS.steps})")
    p.add_argument("--base", type=path_arg, help="base model file (default: the shipped tiny model)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("pretrain", help="pretrain a base model on the task mixture (with instructions)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default %(default)s)")
    p.add_argument("--out", type=path_arg, required=True, help="where to write the model (.safetensors)")
    p.add_argument(
        "--examples", type=count, default=60_000, help="size of the pretraining mixture (default %(default)s)"
    )
    _train_flags(p, PRETRAIN_DEFAULTS)

    p = sub.add_parser(
        "tune",
        help="tune a soft prompt for one task on a frozen base model",
        epilog="Several processes: torchrun --nproc_per_node=N -m minipt tune ... (gloo on CPU, "
        "NCCL on GPU; --batch-size is the global batch; only rank 0 writes files).",
    )
    p.add_argument(
        "--task",
        help=f"a built-in task ({', '.join(sorted(TASKS))}); with --data, the records' "
        f"task to use when the file holds several",
    )
    p.add_argument(
        "--data",
        help='your own examples: a .jsonl file, one {"input": ..., "output": ...} a line '
        '(optional "task"); see minipt.userdata',
    )
    p.add_argument("--val-data", help="validation records (.jsonl); default: hold out --val-fraction of --data")
    p.add_argument("--val-fraction", type=fraction, default=0.1, help="default %(default)s")
    p.add_argument(
        "--base",
        help="base model file (default: the shipped tiny model), or hf:NAME_OR_FOLDER for "
        "a GPT-2 and its tokenizer from the local Hugging Face cache or a folder",
    )
    p.add_argument(
        "--peft-out",
        type=path_arg,
        help="also write the prompt as a PEFT adapter folder (adapter_config.json, adapter_model.safetensors)",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="prompt",
        help="prompt: a soft prompt (Lester et al.); ptuning: the prompt through an MLP; ptuning-v2: a "
        "key/value prefix at every layer; prefix: that prefix through an MLP (Li & Liang). Each "
        "has its own default --lr; default %(default)s",
    )
    p.add_argument("--n-prompt", type=count, default=20, help="prompt (or prefix) length (default %(default)s)")
    p.add_argument(
        "--init",
        choices=(*INIT_MODES, "normal"),
        default="vocab",
        help="label: the class labels' embeddings first (classification only); the prefix methods take "
        "vocab (the keys and values of sampled tokens) or normal; default %(default)s",
    )
    p.add_argument("--init-text", type=text_arg, help="text whose token embeddings start the prompt (with --init text)")
    p.add_argument("--out", type=path_arg, required=True, help="where to write the prompt (.safetensors)")
    method_rates = ", ".join(f"{m} {d.lr:g}" for m, d in METHOD_DEFAULTS.items())
    _train_flags(p, TUNE_DEFAULTS, lr_help=f"peak learning rate (default: the method's own, {method_rates})")
    p.set_defaults(lr=None)  # each method's own rate (recipes.METHOD_DEFAULTS) unless --lr is given

    p = sub.add_parser("eval", help="test-split exact match of a base model, with or without a prompt")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--base", help="base model file (default: the shipped tiny model), or hf:NAME_OR_FOLDER")
    p.add_argument("--prompt", help="a prompt or prefix file from `minipt tune`, or a PEFT adapter folder")
    p.add_argument("--instruction", action="store_true", help="put the task's written instruction first")
    p.add_argument("--split", choices=["train", "val", "test"], default="test", help="default %(default)s")
    p.add_argument("-n", type=count, default=500, help="number of examples (default %(default)s)")

    p = sub.add_parser("generate", help="continue a text greedily (or sampled) with the KV cache")
    p.add_argument("text", type=text_arg, help="input text; a <sep> is appended when --task-format is set")
    p.add_argument("--base", help="base model file (default: the shipped tiny model), or hf:NAME_OR_FOLDER")
    p.add_argument("--prompt", help="a prompt or prefix file from `minipt tune`, or a PEFT adapter folder")
    p.add_argument("--task-format", action="store_true", help="append <sep> and stop at <eos>, as the tasks do")
    p.add_argument("--max-new-tokens", type=count, default=16, help="default %(default)s")
    p.add_argument("--temperature", type=temperature, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=count, default=None)

    p = sub.add_parser(
        "serve",
        help="answer many tasks' requests in mixed batches, one soft prompt per task",
        description='Reads {"task": NAME, "input": TEXT} a line; writes {"task", "input", "output"} '
        'a line, in order. "-" is stdin / stdout.',
    )
    p.add_argument("--base", help="base model file (default: the shipped tiny model), or hf:NAME_OR_FOLDER")
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        metavar="NAME=FILE",
        help="a task's soft prompt file (repeat for each task)",
    )
    p.add_argument("--requests", required=True, help="requests .jsonl file, or - for stdin")
    p.add_argument("--out", default="-", help="answers .jsonl file, or - for stdout (default)")
    p.add_argument("--max-new-tokens", type=count, default=16, help="default %(default)s")
    p.add_argument("--max-batch", type=count, default=64, help="rows per batch (default %(default)s)")
    p.add_argument("--no-prefix-cache", action="store_true", help="run the prompt positions at every prefill")
    _overwrite_flag(p)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser(
        "bench",
        help="run a benchmark script from benchmarks/ (source checkout)",
        description="Runs benchmarks/bench_<name>.py with the remaining arguments; "
        "`minipt bench NAME --help` shows the script's own options.",
    )
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")

    p = sub.add_parser(
        "exercises",
        help="the self-grading exercises: list | build | check NOTEBOOK.ipynb",
        description="Runs `python -m minipt.exercises` with the remaining arguments "
        "(`minipt exercises check -h` shows a command's own options).",
    )
    p.add_argument("exercise_args", nargs=argparse.REMAINDER, help="list | build [--check] | check NOTEBOOK.ipynb")

    p = sub.add_parser("experiment", help="Lester et al.'s experiments in miniature (see minipt/apps/experiments.py)")
    p.add_argument(
        "name",
        choices=["lester", "lester-bases", "seed-claims", "depth"],
        help="lester: length, init, scale and ensembling; lester-bases: pretrain its base models; "
        "depth: P-tuning v2 and P-tuning on the scale curve (see minipt/apps/depth.py); "
        "seed-claims: the explainer's claims (few-shot, vs fine-tuning, prompt design, domain "
        "shift; see minipt/apps/seed_claims.py)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="lester, seed-claims: a small version (one task, short runs; 1-3 minutes on 2 CPU cores)",
    )
    p.add_argument("--bases", help="folder of SIZE.safetensors base models (default: the shipped ones)")
    p.add_argument(
        "--results",
        help="lester: folder for lester-*.json and lester.png "
        "(default benchmarks/results, or runs/lester-quick with --quick); "
        "seed-claims: for seed-*.json and seed-claims.png (likewise)",
    )
    p.add_argument(
        "--work",
        help="lester: folder for finished runs and prompts, to resume from "
        "(default runs/lester, or runs/lester-quick/work with --quick); "
        "seed-claims: likewise, default runs/seed-claims",
    )
    p.add_argument("--out", default="runs/lester-bases", help="lester-bases: output folder (default %(default)s)")
    p.add_argument("--sizes", nargs="+", help="lester-bases: which sizes (default: the whole ladder)")
    p.add_argument("--base", help="seed-claims: base model file (default: the shipped tiny model)")
    p.add_argument("--threads", type=count, help="torch threads for the run (default: torch's own choice)")
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except (ValueError, TypeError, OSError, FloatingPointError) as e:  # OSError: FileNotFound, PermissionError
        print(f"minipt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command that kept some work says what in the exception (apps/runs.py)
        print(
            f"minipt {args.command}: interrupted; {e.args[0] if e.args else _how_to_continue(args, argv)}",
            file=sys.stderr,
        )
        return 130  # 128 + SIGINT, the shell's convention


def _how_to_continue(args, argv) -> str:
    """One line: where the last checkpoint is and the command that continues from it (or that there is none).

    The checkpoint is this run's when it was resumed from, or written by this run (it changed since the start);
    a file of an earlier run that this run replaced nothing of is not offered."""
    checkpoint = getattr(args, "checkpoint", None)
    exists = checkpoint is not None and Path(checkpoint).is_file()
    if not (exists and (args.resume or _stat(checkpoint) != getattr(args, "checkpoint_before", None))):
        kept = f"; {checkpoint} is left as it was" if exists else ""
        hint = (
            " (add --checkpoint FILE to be able to resume)"
            if hasattr(args, "checkpoint") and checkpoint is None
            else ""
        )
        return f"nothing was saved{kept}{hint}"
    again = argv + ([] if "--resume" in argv else ["--resume"])
    return f"the last checkpoint is {checkpoint}; continue with: minipt {shlex.join(again)}"


def check_outputs(args, inputs: dict | None = None) -> str:
    """minipt.outputs.claim_training_outputs for a training command: returns the run stamp for its outputs."""
    from ..outputs import claim_training_outputs

    stamp = claim_training_outputs(
        args.command,
        vars(args),
        inputs or {},
        args.out,
        args.checkpoint,
        resume=args.resume,
        overwrite=args.overwrite,
        peft_out=getattr(args, "peft_out", None),
    )
    # What the Ctrl-C line may call "the last checkpoint": the file as it was before this run (see _how_to_continue).
    args.checkpoint_before = _stat(args.checkpoint)
    return stamp


def _stat(path):
    import os

    return None if path is None or not Path(path).is_file() else (lambda st: (st.st_ino, st.st_mtime_ns))(os.stat(path))


def cmd_demo(args):
    from .demo import run_demo

    run_demo(
        args.out,
        task=args.task,
        n_prompt=args.n_prompt,
        steps=args.steps,
        base=args.base,
        seed=args.seed,
        progress=not args.no_progress,
    )


def cmd_pretrain(args):
    from ..outputs import STAMP_KEY
    from .recipes import PRETRAIN_DEFAULTS, pretrain

    stamp = check_outputs(args)
    model, result = pretrain(
        args.preset,
        _config(args, PRETRAIN_DEFAULTS),
        n_examples=args.examples,
        checkpoint_path=args.checkpoint,
        resume=args.resume,
    )
    model.save(args.out, extra_metadata={STAMP_KEY: stamp})
    print(
        f"saved {args.out}: {model.num_params():,} parameters, final loss {result.losses[-1]:.4f}, "
        f"validation exact match {_percent(result.best_metric)} ({result.seconds:.0f} s)"
    )


def _percent(metric) -> str:
    return "n/a" if metric is None else f"{metric:.1%}"


def cmd_tune(args):
    from ..assets import load_base_and_tokenizer
    from ..data import exact_match_accuracy
    from ..distributed import init_from_env, leave_group
    from ..outputs import STAMP_KEY
    from ..tasks import get_task
    from ..userdata import training_data
    from .recipes import METHOD_DEFAULTS, task_data, tune_prompt

    if args.data is None:
        if args.task is None:
            raise ValueError("tune needs --task (a built-in task) or --data (a .jsonl file of your examples)")
        get_task(args.task)  # an unknown name lists the valid ones
    if (args.init == "text") != (args.init_text is not None):
        raise ValueError("--init-text goes with --init text, and --init text needs --init-text")
    # before the base model is loaded: a bad path, or an output that is an input, fails now, not after training
    stamp = check_outputs(args, {"--base": args.base, "--data": args.data, "--val-data": args.val_data})
    info = init_from_env()  # under torchrun: join the process group; else one process
    model, tok = load_base_and_tokenizer(args.base)
    if args.data is not None:
        data = training_data(
            args.data,
            tok,
            args.n_prompt,
            model.config.block_size,
            task=args.task,
            val_path=args.val_data,
            val_fraction=args.val_fraction,
            seed=args.seed,
        )
    else:
        data = task_data(args.task, seed=args.seed)  # train, val and test: the test split is scored below
    defaults = METHOD_DEFAULTS[args.method]
    args.lr = args.lr or defaults.lr  # the method's own rate unless --lr is given
    cfg = _config(args, defaults)
    pt, result = tune_prompt(
        model,
        args.task,
        args.n_prompt,
        args.init,
        cfg,
        data=data,
        tokenizer=tok,
        init_text=args.init_text,
        info=info,
        method=args.method,
        checkpoint_path=args.checkpoint,
        resume=args.resume,
    )
    if info.is_main:  # only rank 0 writes files and prints
        pt.save(args.out, extra_metadata={STAMP_KEY: stamp})
        if args.peft_out:
            hf_name = args.base[len("hf:") :] if (args.base or "").startswith("hf:") else None
            pt.save_peft(args.peft_out, base_model_name_or_path=hf_name, extra_metadata={STAMP_KEY: stamp})
        what = f"{len(data[0])} training / {len(data[1])} validation examples"
        if info.world_size > 1:
            what += f", {info.world_size} processes"
        line = f"saved {args.out} ({what}): best validation exact match {_percent(result.best_metric)}"
        if args.data is None:
            line += f", test exact match {exact_match_accuracy(pt, data[2], tok, device=info.device):.1%}"
        print(line)
    leave_group(info)


def cmd_eval(args):
    from ..assets import load_base_and_tokenizer
    from ..data import exact_match_accuracy
    from ..tasks import make_split
    from ..tuned import load_tuned

    model, tok = load_base_and_tokenizer(args.base)  # the loader of tune and generate: hf: bases too
    module = load_tuned(model, args.prompt) if args.prompt else model  # a prompt or prefix file, or a PEFT folder
    examples = make_split(args.task, args.split, args.n)
    acc = exact_match_accuracy(module, examples, tok, instruction=args.instruction)
    print(f"{args.task} ({args.split}, n={len(examples)}): exact match {acc:.1%}")


def cmd_generate(args):
    from ..assets import load_base_and_tokenizer
    from ..serve import generate_text
    from ..tuned import load_tuned

    model, tok = load_base_and_tokenizer(args.base)
    module = load_tuned(model, args.prompt) if args.prompt else model
    sampling = dict(temperature=args.temperature, top_k=args.top_k)
    print(generate_text(module, tok, args.text, args.max_new_tokens, args.task_format, **sampling))


def cmd_serve(args):
    import json

    from tqdm import tqdm

    from ..assets import load_base_and_tokenizer
    from ..checkpoint import check_output_path
    from ..outputs import claim_command
    from ..serve import PromptBank, encode_requests, read_requests
    from ..userdata import write_jsonl

    prompts = {}
    for spec in args.prompt:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--prompt expects NAME=FILE, got {spec!r}")
        if name in prompts:
            raise ValueError(f"--prompt {name}= is given twice ({prompts[name]} and {path}); one file a name")
        prompts[name] = path
    inputs = {"--base": args.base, **{f"--prompt {n}=": p for n, p in prompts.items()}, "--requests": args.requests}
    claim_command(args.command, vars(args), inputs, {"--out": args.out}, stamped=False, overwrite=args.overwrite)
    if args.out != "-":
        check_output_path(args.out, "--out")
    requests = read_requests(sys.stdin if args.requests == "-" else args.requests, set(prompts))  # before any work
    model, tok = load_base_and_tokenizer(args.base)
    bank = PromptBank(model, prompts, max_batch=args.max_batch)
    encoded = encode_requests(bank, tok, requests, args.max_new_tokens, source=args.requests)
    with tqdm(total=len(encoded), desc="serve", unit="req", disable=args.no_progress, file=sys.stderr) as bar:
        answers = bank.generate(
            encoded, args.max_new_tokens, eos_id=tok.eos_id, prefix_cache=not args.no_prefix_cache, progress=bar.update
        )
    records = [
        {"task": task, "input": text, "output": tok.decode([t for t in a if t != tok.eos_id])}
        for (task, text), a in zip(requests, answers)
    ]
    if args.out == "-":
        print("\n".join(map(json.dumps, records)))
    else:
        write_jsonl(args.out, records)
        print(f"answered {len(records)} requests ({len(prompts)} tasks) into {args.out}", file=sys.stderr)


# The benchmark scripts live in the source checkout's benchmarks/ folder (they are not installed).
BENCHMARKS = {
    "memory": "bench_memory.py",
    "prompt-concat": "bench_prompt_concat.py",
    "train-step": "bench_train_step.py",
    "serve": "bench_serve.py",
}


def cmd_bench(args):
    import runpy

    script = Path(__file__).resolve().parents[2] / "benchmarks" / BENCHMARKS[args.name]
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: the benchmarks ship with the source checkout, not the wheel")
    saved_argv = sys.argv
    sys.argv = [str(script), *args.script_args]  # the script parses its own arguments
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved_argv


def cmd_exercises(args):
    from ..exercises.__main__ import main as exercises_main

    return exercises_main(args.exercise_args)


def cmd_experiment(args):
    from . import depth, experiments, seed_claims
    from .runs import command_line

    if args.name == "lester-bases":
        experiments.pretrain_bases(args.out, args.sizes or experiments.SIZES, progress=not args.no_progress)
        return
    run, setup, quick = {
        "lester": (experiments.run_lester, experiments.LesterSetup, experiments.QUICK),
        "depth": (depth.run_depth, depth.DepthSetup, depth.DEPTH_QUICK),
        "seed-claims": (seed_claims.run_seed_claims, seed_claims.SeedSetup, seed_claims.QUICK),
    }[args.name]
    # seed-claims runs on one base model (--base); lester and depth on the ladder (--bases)
    base = {"base": args.base} if args.name == "seed-claims" else {"bases_dir": args.bases}
    run(
        quick if args.quick else setup(),
        args.results or (f"runs/{args.name}-quick" if args.quick else "benchmarks/results"),
        args.work or (f"runs/{args.name}-quick/work" if args.quick else f"runs/{args.name}"),
        **base,
        command=command_line(),
        progress=not args.no_progress,
        threads=args.threads,
    )


COMMANDS = {
    "demo": cmd_demo,
    "pretrain": cmd_pretrain,
    "tune": cmd_tune,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "serve": cmd_serve,
    "bench": cmd_bench,
    "experiment": cmd_experiment,
    "exercises": cmd_exercises,
}

if __name__ == "__main__":
    sys.exit(main())
