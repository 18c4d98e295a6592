"""Memory of one training step: full fine-tuning, naive prompt tuning, and minipt's prompt tuning.

    python benchmarks/bench_memory.py --preset gpt2 --steps 3          # CPU, B=4, T=256, n_prompt=20, fp32
    python benchmarks/bench_memory.py --preset tiny --device cuda

Rows (random weights, fp32, every input position supervised: the worst case for the head):
    full fine-tuning       every weight trains, AdamW over all of them; input of T tokens
    naive prompt tuning    every weight still requires grad, the optimizer holds only the prompt (the common
                           mistake): autograd keeps what the weight gradients need and computes them all
    minipt prompt tuning   PromptTuning as shipped: a frozen model, the fused frozen head; n_prompt + T positions
    ..., recompute         the same with PromptTuning(recompute=True): each frozen block is run again in
                           backward, so only the block inputs are kept
    minipt P-tuning v2     PrefixTuning: n_prompt trainable key/value positions at every layer (minipt.prefix)

Columns: trainable parameters (what the optimizer updates), gradient bytes (every .grad after backward),
optimizer-state bytes, bytes saved for backward (`minipt.saved_tensors.saved_tensor_report`, parameters not
counted), peak memory of a training step, ms per step (median after the first step), each also as a ratio
to full fine-tuning. Peak memory: on CPU, the process's peak RSS above its RSS before the model was built;
on CUDA, torch.cuda.max_memory_allocated above what was allocated before. Each row runs in a fresh
subprocess so that peaks do not mix. Peak RSS also counts memory the allocator has freed but kept: at the gpt2
shape, `--steps 3 --worker "minipt prompt tuning"` gave 1,255 to 1,344 MB over six runs of three versions of the
code whose peaks of live tensors were within 32 MiB of each other, so on CPU a difference under about 100 MB
between two runs says nothing; the profiler's memory timeline (torch.profiler, profile_memory=True) gives the
peak of live tensors exactly. The table is printed and written to
benchmarks/results/memory-<device>.csv (rows of other presets in that file are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from minipt.apps.benchio import write_preset_csv

CONFIGS = (
    "full fine-tuning",
    "naive prompt tuning",
    "minipt prompt tuning",
    "minipt prompt tuning, recompute",
    "minipt P-tuning v2 (deep prefix)",
)
COLUMNS = ("trainable_params", "gradient_bytes", "optimizer_state_bytes", "saved_bytes", "peak_bytes", "ms_per_step")
RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt2", help="a GPTConfig preset: tiny | gpt2 | ...")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256, help="input tokens per example (the prompt comes on top)")
    ap.add_argument("--n-prompt", type=int, default=20)
    ap.add_argument("--steps", type=int, default=3, help="training steps per row; the first one is not timed")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--out", default=None, help="CSV path (default benchmarks/results/memory-<device>.csv)")
    ap.add_argument(
        "--parse-only",
        action="store_true",
        help="check the arguments as a real run would, then exit (no device, no files)",
    )
    ap.add_argument("--worker", default=None, choices=CONFIGS, help=argparse.SUPPRESS)  # one row, in a subprocess
    return ap.parse_args(argv)


# ---- one row, measured in its own process -----------------------------------------------------------------


def current_memory(device) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:  # resident pages (Linux)
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(device) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak RSS, in KiB on Linux
    return kib * 1024


def build(config: str, cfg, args):
    """The module to train and the parameters its optimizer updates, for one row of the table."""
    import torch

    from minipt import GPT, PromptTuning

    with torch.device(args.device):  # built where it runs: initialising gpt2's 124M weights on a CPU first is slow
        model = GPT(cfg)
    if config == "full fine-tuning":
        return model.train(), list(model.parameters())
    if config == "minipt P-tuning v2 (deep prefix)":
        from minipt import PrefixTuning

        module = PrefixTuning(model, n_prefix=args.n_prompt, init="normal")  # n_layer * 2 * n_prefix * D numbers
        return module.train(), [module.prefix]
    module = PromptTuning(
        model,
        n_prompt=args.n_prompt,
        init="uniform",
        frozen_head=config.startswith("minipt"),
        recompute=config.endswith("recompute"),
    )
    if config == "naive prompt tuning":
        for p in model.parameters():
            p.requires_grad_(True)  # every weight requires grad; the optimizer still gets only the prompt
    return module.train(), [module.prompt]


def train_steps(module, optimizer, idx, targets, steps: int, device: str) -> list[float]:
    """Seconds per training step."""
    import torch

    times = []
    for _ in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = module.loss(idx, targets)
        loss.backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def measure(config: str, args) -> dict:
    import gc

    import torch

    from minipt import GPTConfig
    from minipt.saved_tensors import saved_tensor_report

    torch.manual_seed(0)
    device, B, T = args.device, args.batch_size, args.seq_len
    base = GPTConfig.preset(args.preset)
    # the prompt needs n_prompt more positions; raise block_size where the preset is shorter (random weights)
    cfg = GPTConfig.preset(args.preset, block_size=max(base.block_size, args.n_prompt + T))
    idx = torch.randint(cfg.vocab_size, (B, T), device=device)  # (B, T)
    targets = torch.randint(cfg.vocab_size, (B, T), device=device)  # every position supervised

    # Warm up on a toy model of the same kind: the first step pages in library code and sets up thread
    # pools (about 100 MiB of RSS on CPU), which is not memory of this training step.
    toy = GPTConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=cfg.vocab_size, block_size=args.n_prompt + 8)
    module, params = build(config, toy, args)
    train_steps(module, torch.optim.AdamW(params), idx[:, :8], targets[:, :8], 1, device)
    del module, params
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before = current_memory(device)

    module, params = build(config, cfg, args)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = train_steps(module, optimizer, idx, targets, args.steps, device)
    peak = peak_memory(device) - before  # read before anything else runs

    def storage_bytes(tensors) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    optimizer.zero_grad(set_to_none=True)
    saved = saved_tensor_report(lambda: module.loss(idx, targets))
    return dict(
        trainable_params=sum(p.numel() for p in params),
        gradient_bytes=storage_bytes(grads),
        optimizer_state_bytes=storage_bytes(state),
        saved_bytes=saved.activation_bytes,
        peak_bytes=peak,
        ms_per_step=1000 * statistics.median(times[1:] or times),
    )


# ---- the table --------------------------------------------------------------------------------------------


def run_row(config: str, argv: list[str]) -> dict:
    """One configuration in a fresh Python process: its peak memory is its own."""
    cmd = [sys.executable, __file__, *argv, "--worker", config]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{config} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def fmt(column: str, value: float) -> str:
    if column.endswith("bytes"):
        return f"{value / 2**20:,.1f} MiB"
    if column == "ms_per_step":
        return f"{value:,.0f} ms"
    return f"{value:,.0f}"


def print_table(rows: dict[str, dict]) -> None:
    full = rows["full fine-tuning"]
    headers = (
        "",
        "trainable",
        "gradients",
        "optimizer state",
        "saved for backward",
        "peak step memory",
        "time per step",
    )
    lines = [headers]
    for config, row in rows.items():
        cells = [config]
        for c in COLUMNS:
            ratio = row[c] / full[c] if full[c] else float("nan")
            cells.append(f"{fmt(c, row[c])} ({ratio:.3g}x)")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    for line in lines:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))))


def write_csv(path: Path, preset: str, rows: dict[str, dict], command: str) -> None:
    """Rows of this preset replace any earlier ones; other presets' rows and commands are kept."""
    import torch

    full = rows["full fine-tuning"]
    new_rows = [
        dict(
            preset=preset,
            config=config,
            **{c: f"{row[c]:.1f}" if c == "ms_per_step" else str(int(row[c])) for c in COLUMNS},
            **{f"{c}_ratio": f"{row[c] / full[c]:.4f}" if full[c] else "" for c in COLUMNS},
        )
        for config, row in rows.items()
    ]
    write_preset_csv(
        path,
        preset,
        new_rows,
        ["preset", "config", *COLUMNS, *(f"{c}_ratio" for c in COLUMNS)],
        f"{command}  (torch {torch.__version__}, {torch.get_num_threads()} threads)",
        "bench_memory.py: one training step, random weights, fp32, every input position supervised",
    )


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.parse_only:
        from minipt import GPTConfig

        GPTConfig.preset(args.preset)  # an unknown preset is an error here too
        print(
            f"parse-only: preset {args.preset}, device {args.device}, B={args.batch_size}, T={args.seq_len}, "
            f"n_prompt={args.n_prompt}, {args.steps} steps"
        )
        return
    if args.worker is not None:
        print(json.dumps(measure(args.worker, args)))
        return
    command = "python benchmarks/bench_memory.py " + " ".join(argv)
    print(
        f"{command}\npreset {args.preset}, B={args.batch_size}, T={args.seq_len}, n_prompt={args.n_prompt}, "
        f"{args.steps} steps, fp32, {args.device}"
    )
    rows = {config: run_row(config, argv) for config in CONFIGS}
    print_table(rows)
    naive, full = rows["naive prompt tuning"], rows["full fine-tuning"]
    for name in ("minipt prompt tuning", "minipt prompt tuning, recompute"):
        ours = rows[name]
        print(
            f"{name}: saved for backward / naive {ours['saved_bytes'] / naive['saved_bytes']:.3f}, "
            f"peak step memory / full fine-tuning {ours['peak_bytes'] / full['peak_bytes']:.3f}, "
            f"step time / without recompute "
            f"{ours['ms_per_step'] / rows['minipt prompt tuning']['ms_per_step']:.3f}"
        )
    out = Path(args.out) if args.out else RESULTS / f"memory-{args.device}.csv"
    write_csv(out, args.preset, rows, command)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
