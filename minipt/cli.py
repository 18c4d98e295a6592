"""The `minipt` command: demo | pretrain | tune | eval | generate. Every subcommand has --help."""
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
    from .demo import DEMO_TASK
    from .recipes import PRETRAIN_DEFAULTS, TUNE_DEFAULTS
    from .tasks import TASKS

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

    p = sub.add_parser("tune", help="tune a soft prompt for one task on a frozen base model")
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--base", help="base model file (default: the shipped tiny model)")
    p.add_argument("--n-prompt", type=int, default=20)
    p.add_argument("--init", choices=["uniform", "vocab", "text"], default="vocab")
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
    p.add_argument("--base", help="base model file (default: the shipped tiny model)")
    p.add_argument("--prompt", help="a soft prompt file from `minipt tune`")
    p.add_argument("--task-format", action="store_true", help="append <sep> and stop at <eos>, as the tasks do")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
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
    from .data import exact_match_accuracy
    from .demo import load_base
    from .recipes import TUNE_DEFAULTS, task_data, tune_prompt
    from .tokenizer import ByteTokenizer

    model = load_base(args.base)
    data = task_data(args.task, seed=args.seed)
    pt, result = tune_prompt(model, args.task, args.n_prompt, args.init, _config(args, TUNE_DEFAULTS), data=data,
                             init_text=args.init_text, checkpoint_path=args.checkpoint, resume=args.resume)
    pt.save(args.out)
    acc = exact_match_accuracy(pt, data[2], ByteTokenizer())
    print(f"saved {args.out}: test exact match {acc:.1%} (best validation {result.best_metric:.1%})")


def cmd_eval(args):
    from .data import exact_match_accuracy
    from .demo import load_base
    from .prompt import PromptTuning
    from .tasks import make_split
    from .tokenizer import ByteTokenizer

    model = load_base(args.base)
    module = PromptTuning.load(model, args.prompt) if args.prompt else model
    examples = make_split(args.task, args.split, args.n)
    acc = exact_match_accuracy(module, examples, ByteTokenizer(), instruction=args.instruction)
    print(f"{args.task} ({args.split}, n={len(examples)}): exact match {acc:.1%}")


def cmd_generate(args):
    import torch

    from .demo import load_base
    from .prompt import PromptTuning
    from .tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    model = load_base(args.base)
    module = PromptTuning.load(model, args.prompt) if args.prompt else model
    ids = tok.encode(args.text) + ([tok.sep_id] if args.task_format else [])
    idx = torch.tensor([ids])
    out = module.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k)[0, len(ids):]
    new = out.tolist()
    if args.task_format and tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    print(tok.decode(new))


COMMANDS = {"demo": cmd_demo, "pretrain": cmd_pretrain, "tune": cmd_tune, "eval": cmd_eval,
            "generate": cmd_generate}

if __name__ == "__main__":
    sys.exit(main())
