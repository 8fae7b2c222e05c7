#!/usr/bin/env python
"""Batched vs sequential generation: sapod's one generate call against the original RL Swarm way.

(a) batched: ``HFPolicy.generate`` — ONE ``model.generate`` call for all I prompts x G completions.
(b) sequential: for each prompt, G generate calls of one completion each (batch 1), the way the
    original RL Swarm sampled; same model, tokenizer, prompt format and sampling settings.

Both ways count generated tokens identically (up to and including the first eos), and the
comparison is made in tokens/s because sampled completions stop at different lengths.
Each repeat runs both ways back to back, alternating which goes first, so both share the
machine's noise; the ratio reported is the median of the per-repeat ratios.

Prints a table, then one JSON object as the last line (also written to --json FILE).
Usage: python scripts/bench_generation.py [--model sapod:tiny|DIR] [--items 2] [--generations 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sapod:tiny", help="sapod:tiny or a local model folder [sapod:tiny]")
    p.add_argument("--cache-dir", default=os.environ.get("SAPOD_CACHE") or str(Path.home() / ".cache" / "sapod"),
                   help="where sapod:tiny is built/cached [SAPOD_CACHE or ~/.cache/sapod]")
    p.add_argument("--items", type=int, default=2, help="I: prompts [2]")
    p.add_argument("--generations", type=int, default=4, help="G: completions per prompt [4]")
    p.add_argument("--max-new-tokens", type=int, default=128, help="[128]")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up of each way [3]")
    p.add_argument("--temperature", type=float, default=1.0, help="[1.0]")
    p.add_argument("--tasks", default="", help="task spec as TASKS takes it; empty = the nine default tasks")
    p.add_argument("--seed", type=int, default=0, help="base seed; repeat r uses seed+r for both ways [0]")
    p.add_argument("--device", default=None, help="torch device [cuda if available, else cpu]")
    p.add_argument("--json", dest="json_file", default=None, help="also write the JSON object to this file")
    args = p.parse_args(argv)
    if min(args.items, args.generations, args.max_new_tokens, args.repeats) < 1:
        p.error("--items, --generations, --max-new-tokens and --repeats must be at least 1")
    return args


def load(args: argparse.Namespace):
    from sapod.policy.hf import HFPolicy
    from sapod.tasks import make_task_source

    path = args.model
    if args.model == "sapod:tiny":
        from sapod.policy.tiny import ensure_tiny

        t0 = time.monotonic()
        path = str(ensure_tiny(Path(args.cache_dir)))
        if time.monotonic() - t0 > 2:
            print(f"built sapod:tiny in {time.monotonic() - t0:.0f}s at {path}", file=sys.stderr)
    source = make_task_source(args.tasks)
    policy = HFPolicy(path, system_prompt=source.system_prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, device=args.device, name=args.model)
    return policy, source.sample(args.items, args.seed)


def batched(policy, items, g: int, seed: int) -> tuple[int, float, int]:
    """(tokens, seconds, calls) for sapod's way."""
    sync(policy)
    t0 = time.perf_counter()
    gen = policy.generate(items, g, seed)
    sync(policy)
    return gen.tokens, time.perf_counter() - t0, 1


def sequential(policy, items, g: int, seed: int) -> tuple[int, float, int]:
    """(tokens, seconds, calls) for the original way: G batch-1 calls per prompt, same sampling."""
    import torch

    from sapod.prompts import format_prompt

    tok, model = policy.tokenizer, policy.model
    tokens, calls = 0, 0
    sync(policy)
    t0 = time.perf_counter()  # like HFPolicy.generate, the clock includes tokenizing and decoding
    with torch.inference_mode(), policy._autocast():
        torch.manual_seed(seed)
        if policy.device.type == "cuda":
            torch.cuda.manual_seed_all(seed)
        for it in items:
            # tokenized as HFPolicy.generate does: same special tokens, same prompt truncation
            enc = tok([format_prompt(tok, it.question, policy.system_prompt)], return_tensors="pt",
                      **policy._prompt_kwargs()).to(policy.device)
            for _ in range(g):
                out = model.generate(**enc, do_sample=True, temperature=policy.temperature, top_p=policy.top_p,
                                     top_k=0, repetition_penalty=1.0, max_new_tokens=policy.max_new_tokens,
                                     num_return_sequences=1, pad_token_id=tok.pad_token_id,
                                     eos_token_id=policy._eos_ids)
                new = out[:, enc["input_ids"].shape[1]:]
                tok.batch_decode(new, skip_special_tokens=True)
                # HFPolicy's own counter: up to and including the first eos, like the batched way
                tokens += int(policy._lengths(new).sum())
                calls += 1
    sync(policy)
    return tokens, time.perf_counter() - t0, calls


def sync(policy) -> None:
    if policy.device.type == "cuda":
        import torch

        torch.cuda.synchronize(policy.device)


def summarize(runs: list[tuple[int, float, int]]) -> dict:
    tps = [t / s for t, s, _ in runs]
    return {
        "tokens_per_s": statistics.median(tps),
        "seconds": statistics.median(s for _, s, _ in runs),  # for all I x G completions
        "seconds_per_call": statistics.median(s / c for _, s, c in runs),
        "calls": runs[0][2],
        "tokens": statistics.median(t for t, _, _ in runs),
        "runs": [{"tokens": t, "seconds": s, "calls": c, "tokens_per_s": t / s} for t, s, c in runs],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()  # a loading bar in a benchmark's output is noise
    policy, items = load(args)
    g = args.generations
    ways = {"batched": batched, "sequential": sequential}
    for fn in ways.values():  # warm-up: first-call allocations, kernel selection, lazy imports
        fn(policy, items, g, args.seed)
    runs: dict[str, list] = {name: [] for name in ways}
    for r in range(args.repeats):
        # alternate the order so neither way always runs on a cooler (or hotter) machine
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in order:
            runs[name].append(ways[name](policy, items, g, args.seed + r))
    ratios = [(ta / sa) / (tb / sb) for (ta, sa, _), (tb, sb, _) in zip(runs["batched"], runs["sequential"])]
    result = {
        "benchmark": "generation",
        "settings": {
            "model": args.model, "items": args.items, "generations": g, "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats, "temperature": args.temperature, "seed": args.seed,
            "tasks": args.tasks or "default", "device": str(policy.device), "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in policy.model.parameters()),
            "torch": torch.__version__, "transformers": transformers.__version__,
        },
        "batched": summarize(runs["batched"]),
        "sequential": summarize(runs["sequential"]),
        "ratio": statistics.median(ratios),  # batched tokens/s over sequential tokens/s
        "ratios": ratios,
    }
    s = result["settings"]
    print(f"generation: {s['model']} ({s['parameters'] / 1e6:.2f}M params) on {s['device']} "
          f"({s['threads']} threads), I={args.items} G={g} max_new_tokens={args.max_new_tokens}, "
          f"{args.repeats} repeats after 1 warm-up, medians")
    print(f"{'way':<12}{'calls':>7}{'tokens':>9}{'seconds':>10}{'s/call':>10}{'tokens/s':>11}")
    for name in ways:
        w = result[name]
        print(f"{name:<12}{w['calls']:>7}{w['tokens']:>9.0f}{w['seconds']:>10.3f}{w['seconds_per_call']:>10.4f}"
              f"{w['tokens_per_s']:>11.1f}")
    print(f"ratio batched/sequential tokens/s: {result['ratio']:.2f}x "
          f"(per repeat: {', '.join(f'{x:.2f}' for x in ratios)})")
    line = json.dumps(result)
    if args.json_file:
        Path(args.json_file).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
