"""The `minipt` command: demo | pretrain | tune | eval | generate | bench | experiment | exercises.

Every subcommand has --help. This module only parses arguments and prints; the work is in minipt and its apps.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace


def _train_flags(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default %(default)s")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--optimizer", choices=["adamw", "adafactor"], default=defaults.optimizer)
    p.add_argument("--seed", type=int, default=defaults.seed, help="default %(default)s")
    p.add_argument("--checkpoint", help="training-state file written every eval; with --resume, continue from it")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint if it exists")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _config(args, defaults):
    return replace(defaults, steps=args.steps, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                   seed=args.seed, progress=not args.no_progress)


def build_parser() -> argparse.ArgumentParser:
    from ..prompt import INIT_MODES
    from ..tasks import TASKS
    from .demo import DEMO_TASK
    from .recipes import PRETRAIN_DEFAULTS, TUNE_DEFAULTS

    parser = argparse.ArgumentParser(prog="minipt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="tune a soft prompt on the frozen tiny base model; print what it gained")
    p.add_argument("--out", default="runs/demo", help="folder for prompt, plot and demo.json (default %(default)s)")
    p.add_argument("--task", default=DEMO_TASK, choices=sorted(TASKS), help="default %(default)s")
    p.add_argument("--n-prompt", type=int, default=20, help="soft prompt length (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help=f"training steps per run (default {TUNE_DEFAULTS.steps})")
    p.add_argument("--base", help="base model file (default: the shipped tiny model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("pretrain", help="pretrain a base model on the task mixture (with instructions)")
    p.add_argument("--preset", default="tiny", help="model preset (default %(default)s)")
    p.add_argument("--out", required=True, help="where to write the model (.safetensors)")
    p.add_argument("--examples", type=int, default=60_000, help="size of the pretraining mixture")
    _train_flags(p, PRETRAIN_DEFAULTS)

    p = sub.add_parser("tune", help="tune a soft prompt for one task on a frozen base model",
                       epilog="Several processes: torchrun --nproc_per_node=N -m minipt tune ... (gloo on CPU, "
                              "NCCL on GPU; --batch-size is the global batch; only rank 0 writes files).")
    p.add_argument("--task", help=f"a built-in task ({', '.join(sorted(TASKS))}); with --data, the records' "
                                  f"task to use when the file holds several")
    p.add_argument("--data", help='your own examples: a .jsonl file, one {"input": ..., "output": ...} a line '
                                  '(optional "task"); see minipt.userdata')
    p.add_argument("--val-data", help="validation records (.jsonl); default: hold out --val-fraction of --data")
    p.add_argument("--val-fraction", type=float, default=0.1, help="default %(default)s")
    p.add_argument("--base", help="base model file (default: the shipped tiny model), or hf:NAME_OR_FOLDER for "
                                  "a GPT-2 and its tokenizer from the local Hugging Face cache or a folder")
    p.add_argument("--peft-out", help="also write the prompt as a PEFT adapter folder (adapter_config.json, "
                                      "adapter_model.safetensors)")
    p.add_argument("--n-prompt", type=int, default=20)
    p.add_argument("--init", choices=INIT_MODES, default="vocab",
                   help="label: the class labels' embeddings first (classification only); default %(default)s")
    p.add_argument("--init-text", help="text whose token embeddings start the prompt (with --init text)")
    p.add_argument("--out", required=True, help="where to write the prompt (.safetensors)")
    _train_flags(p, TUNE_DEFAULTS)

    p = sub.add_parser("eval", help="test-split exact match of a base model, with or without a prompt")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--base", help="base model file (default: the shipped tiny model)")
    p.add_argument("--prompt", help="a soft prompt file from `minipt tune`")
    p.add_argument("--instruction", action="store_true", help="put the task's written instruction first")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("-n", type=int, default=500, help="number of examples (default %(default)s)")

    p = sub.add_parser("generate", help="continue a text greedily (or sampled) with the KV cache")
    p.add_argument("text", help="input text; a <sep> is appended when --task-format is set")
    p.add_argument("--base", help="base model file (default: the shipped tiny model), or hf:NAME_OR_FOLDER")
    p.add_argument("--prompt", help="a soft prompt file from `minipt tune`")
    p.add_argument("--task-format", action="store_true", help="append <sep> and stop at <eos>, as the tasks do")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)

    p = sub.add_parser("bench", help="run a benchmark script from benchmarks/ (source checkout)",
                       description="Runs benchmarks/bench_<name>.py with the remaining arguments; "
                                   "`minipt bench NAME --help` shows the script's own options.")
    p.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")

    p = sub.add_parser("experiment", help="Lester et al.'s experiments in miniature (see minipt/experiments.py)")
    p.add_argument("name", choices=["lester", "lester-bases"],
                   help="lester: length, init, scale and ensembling; lester-bases: pretrain its base models")
    p.add_argument("--quick", action="store_true", help="lester: a small version (one task, short runs, ~1 min)")
    p.add_argument("--bases", help="folder of SIZE.safetensors base models (default: the shipped ones)")
    p.add_argument("--results", help="lester: folder for lester-*.json and lester.png "
                                     "(default benchmarks/results, or runs/lester-quick with --quick)")
    p.add_argument("--work", help="lester: folder for finished runs and prompts, to resume from "
                                  "(default runs/lester, or runs/lester-quick/work with --quick)")
    p.add_argument("--out", default="runs/lester-bases", help="lester-bases: output folder (default %(default)s)")
    p.add_argument("--sizes", nargs="+", help="lester-bases: which sizes (default: the whole ladder)")
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except (ValueError, TypeError, FileNotFoundError, FloatingPointError) as e:
        print(f"minipt {args.command}: error: {e}", file=sys.stderr)
        return 2


def cmd_demo(args):
    from .demo import run_demo

    run_demo(args.out, task=args.task, n_prompt=args.n_prompt, steps=args.steps, base=args.base, seed=args.seed,
             progress=not args.no_progress)


def cmd_pretrain(args):
    from .recipes import PRETRAIN_DEFAULTS, pretrain

    model, result = pretrain(args.preset, _config(args, PRETRAIN_DEFAULTS), n_examples=args.examples,
                             checkpoint_path=args.checkpoint, resume=args.resume)
    model.save(args.out)
    print(f"saved {args.out}: {model.num_params():,} parameters, final loss {result.losses[-1]:.4f}, "
          f"validation exact match {result.best_metric:.1%} ({result.seconds:.0f} s)")


def cmd_tune(args):
    from ..assets import load_base_and_tokenizer
    from ..data import exact_match_accuracy
    from ..distributed import init_from_env
    from ..tasks import get_task
    from ..userdata import check_fits, read_jsonl, select_task, split_validation
    from .recipes import TUNE_DEFAULTS, task_data, tune_prompt

    if args.data is None:
        if args.task is None:
            raise ValueError("tune needs --task (a built-in task) or --data (a .jsonl file of your examples)")
        get_task(args.task)  # an unknown name lists the valid ones
    info = init_from_env()  # under torchrun: join the process group; else one process
    model, tok = load_base_and_tokenizer(args.base)
    if args.data is not None:
        records = read_jsonl(args.data)
        check_fits(records, tok, args.n_prompt, model.config.block_size, args.data)
        train_ex = select_task(records, args.task)
        if args.val_data is not None:
            val_records = read_jsonl(args.val_data)
            check_fits(val_records, tok, args.n_prompt, model.config.block_size, args.val_data)
            val_ex = select_task(val_records, train_ex[0].task)
        else:
            train_ex, val_ex = split_validation(train_ex, args.val_fraction, seed=args.seed)
        data, test_ex = (train_ex, val_ex), None
    else:
        data = task_data(args.task, seed=args.seed)
        test_ex = data[2]
    pt, result = tune_prompt(model, args.task, args.n_prompt, args.init, _config(args, TUNE_DEFAULTS), data=data,
                             tokenizer=tok, init_text=args.init_text, info=info,
                             checkpoint_path=args.checkpoint, resume=args.resume)
    if info.is_main:  # only rank 0 writes files and prints
        pt.save(args.out)
        if args.peft_out:
            hf_name = args.base[len("hf:"):] if (args.base or "").startswith("hf:") else None
            pt.save_peft(args.peft_out, base_model_name_or_path=hf_name)
        what = f"{len(data[0])} training / {len(data[1])} validation examples"
        if info.world_size > 1:
            what += f", {info.world_size} processes"
        line = f"saved {args.out} ({what}): best validation exact match {result.best_metric:.1%}"
        if test_ex is not None:
            line += f", test exact match {exact_match_accuracy(pt, test_ex, tok, device=info.device):.1%}"
        print(line)
    if info.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def cmd_eval(args):
    from ..assets import load_base
    from ..data import exact_match_accuracy
    from ..prompt import PromptTuning
    from ..tasks import make_split
    from ..tokenizer import ByteTokenizer

    model = load_base(args.base)
    module = PromptTuning.load(model, args.prompt) if args.prompt else model
    examples = make_split(args.task, args.split, args.n)
    acc = exact_match_accuracy(module, examples, ByteTokenizer(), instruction=args.instruction)
    print(f"{args.task} ({args.split}, n={len(examples)}): exact match {acc:.1%}")


def cmd_generate(args):
    import torch

    from ..assets import load_base_and_tokenizer
    from ..prompt import PromptTuning

    model, tok = load_base_and_tokenizer(args.base)
    module = PromptTuning.load(model, args.prompt) if args.prompt else model
    ids = tok.encode(args.text) + ([tok.sep_id] if args.task_format else [])
    idx = torch.tensor([ids])
    out = module.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)[0, len(ids):]
    new = out.tolist()
    if args.task_format and tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    print(tok.decode(new))


# The benchmark scripts live in the source checkout's benchmarks/ folder (they are not installed).
BENCHMARKS = {"memory": "bench_memory.py", "prompt-concat": "bench_prompt_concat.py",
              "train-step": "bench_train_step.py"}


def cmd_bench(args):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / BENCHMARKS[args.name]
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: the benchmarks ship with the source checkout, not the wheel")
    saved_argv = sys.argv
    sys.argv = [str(script), *args.script_args]  # the script parses its own arguments
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved_argv


def cmd_experiment(args):
    from .experiments import QUICK, SIZES, LesterSetup, command_line, pretrain_bases, run_lester

    if args.name == "lester-bases":
        pretrain_bases(args.out, args.sizes or SIZES, progress=not args.no_progress)
        return
    setup = QUICK if args.quick else LesterSetup()
    results = args.results or ("runs/lester-quick" if args.quick else "benchmarks/results")
    work = args.work or ("runs/lester-quick/work" if args.quick else "runs/lester")
    run_lester(setup, results, work, bases_dir=args.bases, command=command_line(), progress=not args.no_progress)


COMMANDS = {"demo": cmd_demo, "pretrain": cmd_pretrain, "tune": cmd_tune, "eval": cmd_eval,
            "generate": cmd_generate, "bench": cmd_bench, "experiment": cmd_experiment}

if __name__ == "__main__":
    sys.exit(main())
