"""Serving many soft prompts: requests/s and generated tokens/s of a mixed workload, four ways.

Workload: 4 tasks (one soft prompt each, all n_prompt vectors), N requests in a shuffled mix of the tasks,
inputs of 8-64 random tokens, answers of 1-8 tokens (a per-request budget, greedy, no eos), random weights.

    alone         minipt, one request at a time (PromptTuning.generate): also the greedy reference
    peft-nocache  HF + PEFT, one batch per task (what PEFT can do), left-padded, generate(use_cache=False)
    peft-cache    the same with PEFT's cache (with peft 0.21 / transformers 5 its tokens disagree: see `agree`)
    mixed         minipt PromptBank, mixed batches, prefix_cache=False (the prompt positions run at prefill)
    mixed-prefix  minipt PromptBank, mixed batches with the prompt-prefix KV cache

`agree` is the fraction of generated tokens equal to the greedy reference. Each configuration serves the
whole workload once, after a warm-up on 8 requests; the two mixed ones --rounds times, in turn (the median).
The mixed ones share one PromptBank, whose prompt-prefix KV cache is computed once per prompt before timing
(a server computes it when it loads the prompts; one forward of the prompt positions each). The "tiny" model is
the tiny preset with block_size 256 (100 + 64 + 8 positions do not fit in 128); "gpt2" is GPT-2 small's shape.

    python benchmarks/bench_serve.py                 # both models, 20- and 100-vector prompts
    python benchmarks/bench_serve.py --smoke         # seconds: a pico model, 16 requests
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minipt.apps.benchio import device_name, write_preset_csv  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ["alone", "peft-nocache", "peft-cache", "mixed", "mixed-prefix"]
COLUMNS = [
    "preset",
    "n_prompt",
    "config",
    "requests",
    "new_tokens",
    "seconds",
    "requests_per_s",
    "tokens_per_s",
    "agree",
    "device",
    "threads",
    "date",
]
MODELS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, vocab_size=260, block_size=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024),
    "pico": dict(n_layer=1, n_head=2, n_embd=32, vocab_size=260, block_size=256),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["tiny", "gpt2"], choices=sorted(MODELS))
    p.add_argument("--n-prompts", nargs="+", type=int, default=[20, 100])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--gpt2-requests", type=int, default=64, help="requests for the gpt2 model (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of the two mixed configurations, taken in turn; the median counts (default 3)",
    )
    p.add_argument("--no-peft", action="store_true")
    p.add_argument("--smoke", action="store_true", help="a pico model, 16 requests: runs in seconds")
    p.add_argument("--out", help="CSV path (default benchmarks/results/serve-cpu.csv; --smoke: no file)")
    p.add_argument("--plot", help="PNG path (default next to the CSV)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--parse-only",
        action="store_true",
        help="check the arguments as a real run would, then exit (no device, no files)",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.presets, args.requests, args.n_prompts, args.max_batch, args.rounds = ["pico"], 16, [20], 8, 1
    return args


def workload(cfg, n_prompt, n_requests, device="cpu", seed=0):
    import torch

    from minipt import GPT, GPTConfig, PromptTuning

    torch.manual_seed(seed)
    model = GPT(GPTConfig(**cfg)).to(device).eval()
    g = torch.Generator().manual_seed(seed + 1)
    prompts = {
        f"task{k}": PromptTuning.from_tensor(
            model, torch.rand(n_prompt, cfg["n_embd"], generator=g) - 0.5, backend="reference"
        )
        for k in range(4)
    }
    requests, budgets = [], []
    for _ in range(n_requests):
        L = int(torch.randint(8, 65, (1,), generator=g))
        requests.append(
            (
                f"task{int(torch.randint(4, (1,), generator=g))}",
                torch.randint(cfg["vocab_size"], (L,), generator=g).tolist(),
            )
        )
        budgets.append(int(torch.randint(1, 9, (1,), generator=g)))
    return model, prompts, requests, budgets


def run_alone(model, prompts, requests, budgets):
    import torch

    device = model.transformer.wte.weight.device
    return [
        prompts[n].generate(torch.tensor([ids], device=device), b, temperature=0)[0, len(ids) :].tolist()
        for (n, ids), b in zip(requests, budgets)
    ]


def run_bank(bank, requests, budgets, prefix_cache):
    return bank.generate(requests, budgets, prefix_cache=prefix_cache)


def peft_models(model, prompts):
    import warnings

    from peft import PromptTuningConfig, TaskType, get_peft_model

    from minipt.hf import to_hf

    warnings.filterwarnings("ignore")
    out = {}
    for name, pt in prompts.items():
        peft = get_peft_model(
            to_hf(model), PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=pt.n_prompt)
        ).eval()
        with __import__("torch").no_grad():
            peft.prompt_encoder["default"].embedding.weight.copy_(pt.prompt)
        out[name] = peft
    return out


def run_peft(peft, requests, budgets, use_cache, max_batch):
    """One batch (of at most max_batch) per task, left-padded: what HF generate needs for batched decoding."""
    import torch

    answers = [None] * len(requests)
    for name, m in peft.items():
        rows = [i for i, (n, _) in enumerate(requests) if n == name]
        for s in range(0, len(rows), max_batch):
            chunk = rows[s : s + max_batch]
            T = max(len(requests[i][1]) for i in chunk)
            ids = torch.zeros(len(chunk), T, dtype=torch.long)
            mask = torch.zeros(len(chunk), T, dtype=torch.long)
            for r, i in enumerate(chunk):
                seq = requests[i][1]
                ids[r, T - len(seq) :], mask[r, T - len(seq) :] = torch.tensor(seq), 1
            new = max(budgets[i] for i in chunk)
            device = next(m.parameters()).device
            ids, mask = ids.to(device), mask.to(device)
            with torch.no_grad():
                out = m.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    use_cache=use_cache,
                    pad_token_id=0,
                )
            for r, i in enumerate(chunk):
                answers[i] = out[r, -new:].tolist()[: budgets[i]]
    return answers


def agreement(answers, reference) -> float:
    same = sum(a == b for x, y in zip(answers, reference) for a, b in zip(x, y))
    return same / sum(len(y) for y in reference)


def measure(preset, n_prompt, n_requests, args):
    import torch

    from minipt import PromptBank

    model, prompts, requests, budgets = workload(MODELS[preset], n_prompt, n_requests, args.device)
    # One bank serves every round, as a server would: its prompt-prefix KV cache is computed once per prompt, in
    # the warm-up below, and reused by every request after it.
    bank = PromptBank(model, prompts, backend="reference", max_batch=args.max_batch)
    runs = {
        "alone": lambda: run_alone(model, prompts, requests, budgets),
        "mixed": lambda: run_bank(bank, requests, budgets, False),
        "mixed-prefix": lambda: run_bank(bank, requests, budgets, True),
    }
    if not args.no_peft:
        peft = peft_models(model, prompts)
        runs["peft-nocache"] = lambda: run_peft(peft, requests, budgets, False, args.max_batch)
        runs["peft-cache"] = lambda: run_peft(peft, requests, budgets, True, args.max_batch)
    results, reference, failed = {}, None, {}
    for config in [c for c in CONFIGS if c in runs]:
        warm = (requests[:8], budgets[:8])
        _ = {
            "alone": lambda: run_alone(model, prompts, *warm),
            "mixed": lambda: run_bank(bank, *warm, False),
            "mixed-prefix": lambda: [bank.prefix_kv(name) for name in bank.names()],
        }.get(config, lambda: None)()
        t0 = time.perf_counter()
        try:
            answers = runs[config]()
        except Exception as e:  # PEFT's cached generate raises IndexError with long prompts: record it, go on
            print(f"  {preset} n_prompt={n_prompt} {config}: failed ({type(e).__name__}: {e})", flush=True)
            failed[config] = f"{type(e).__name__}"
            continue
        results[config] = (time.perf_counter() - t0, answers)
        if config == "alone":
            reference = answers
        print(f"  {preset} n_prompt={n_prompt} {config}: {results[config][0]:.1f} s", flush=True)
    # The two mixed configurations are compared with each other: more rounds, taken in turn, so that a change in
    # the machine's load hits both; the median of each counts.
    times = {c: [results[c][0]] for c in ("mixed", "mixed-prefix")}
    for _ in range(args.rounds - 1):
        for config in times:
            t0 = time.perf_counter()
            runs[config]()
            times[config].append(time.perf_counter() - t0)
    for config, ts in times.items():
        results[config] = (statistics.median(ts), results[config][1])
        print(
            f"  {preset} n_prompt={n_prompt} {config}: median of {len(ts)} rounds {results[config][0]:.1f} s "
            f"({', '.join(f'{t:.1f}' for t in ts)})",
            flush=True,
        )
    del torch
    return results, reference, sum(budgets), failed


def main(argv=None):
    import torch

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.parse_only:
        print(
            f"parse-only: presets {args.presets}, n_prompts {args.n_prompts}, {args.requests} requests, "
            f"device {args.device}"
        )
        return {}
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU visible to torch")
    torch.set_num_threads(args.threads)
    command = "python benchmarks/bench_serve.py " + " ".join(argv)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        load = open("/proc/loadavg").read().split()[0]
    except OSError:
        load = "?"
    print(f"{command}\n{device_name(args.device)}, {args.threads} threads, load average {load} at start")
    all_rows, ratios = {}, []
    for preset in args.presets:
        rows = []
        for n_p in args.n_prompts:
            n_req = args.gpt2_requests if preset == "gpt2" else args.requests
            results, reference, n_tokens, failed = measure(preset, n_p, n_req, args)
            for config, error in failed.items():
                rows.append(
                    dict(
                        preset=preset,
                        n_prompt=n_p,
                        config=config,
                        requests=n_req,
                        new_tokens=n_tokens,
                        seconds="",
                        requests_per_s="",
                        tokens_per_s="",
                        agree=f"failed: {error}",
                        device=device_name(args.device),
                        threads=args.threads,
                        date=date,
                    )
                )
            for config, (sec, answers) in results.items():
                rows.append(
                    dict(
                        preset=preset,
                        n_prompt=n_p,
                        config=config,
                        requests=n_req,
                        new_tokens=n_tokens,
                        seconds=f"{sec:.3f}",
                        requests_per_s=f"{n_req / sec:.2f}",
                        tokens_per_s=f"{n_tokens / sec:.1f}",
                        agree=f"{agreement(answers, reference):.3f}",
                        device=device_name(args.device),
                        threads=args.threads,
                        date=date,
                    )
                )
            rps = {c: n_req / s for c, (s, _) in results.items()}
            peft_best = max((rps[c] for c in ("peft-nocache", "peft-cache") if c in rps), default=None)
            ratios.append(
                (
                    preset,
                    n_p,
                    rps["mixed-prefix"] / peft_best if peft_best else None,
                    rps["mixed-prefix"] / rps["mixed"],
                )
            )
        all_rows[preset] = rows
    print(f"\n{'preset':7} {'n_p':>4} {'config':13} {'req/s':>8} {'tok/s':>8} {'agree':>6}")
    for rows in all_rows.values():
        for r in rows:
            print(
                f"{r['preset']:7} {r['n_prompt']:>4} {r['config']:13} {r['requests_per_s']:>8} "
                f"{r['tokens_per_s']:>8} {r['agree']:>6}"
            )
    for preset, n_p, vs_peft, vs_mixed in ratios:
        print(
            f"{preset} n_prompt={n_p}: mixed-prefix / best PEFT = "
            f"{'-' if vs_peft is None else f'{vs_peft:.2f}x'} (goal 3x at 100), "
            f"mixed-prefix / mixed = {vs_mixed:.2f}x (goal 1.5x)"
        )
    if args.smoke and not args.out:
        return all_rows
    out = Path(args.out) if args.out else RESULTS / f"serve-{args.device}.csv"
    for preset, rows in all_rows.items():
        write_preset_csv(
            out,
            preset,
            rows,
            COLUMNS,
            f"{command}  (load average {load} at start)",
            "bench_serve.py: a mixed workload of 4 soft prompts, greedy, random weights, fp32",
        )
    plot(all_rows, Path(args.plot) if args.plot else out.with_suffix(".png"))
    print(f"written to {out}")
    return all_rows


def plot(all_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, n) for p, rows in all_rows.items() for n in sorted({r["n_prompt"] for r in rows})]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (preset, n_p) in zip(axes[0], panels):
        rows = [r for r in all_rows[preset] if r["n_prompt"] == n_p]
        rows = [r for r in rows if r["requests_per_s"]]  # failed runs have no bar
        ax.bar([r["config"] for r in rows], [float(r["requests_per_s"]) for r in rows], color="tab:blue")
        ax.set_title(f"{preset}, {n_p}-vector prompts")
        ax.set_ylabel("requests / s")
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
