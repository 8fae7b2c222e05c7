#!/usr/bin/env python
"""GPU benchmarks for sapod on random-weight models built from configs (no hub, no tokenizer):

1. generate tokens/s at several batch sizes in fp32 (TF32 on, as HFPolicy sets it), bf16 autocast
   over fp32 weights (what HFPolicy does), bf16 weights, and bf16 weights with a static KV cache
   compiled by transformers' generate (torch.compile, reduce-overhead);
2. one GRPO step (sapod.grpo's completion_logprobs + token_loss, Adam) in fp32 vs bf16 autocast:
   seconds and peak memory;
3. sapod's own node-round on a model folder of each shape: HFPolicy.generate for I=2 x G=4 plus one
   train_step on 16 completions, with COMPILE_GENERATION false and true (sapod's auto: true on CUDA);
4. several compiled GPT-2 policies in one process, as ``sapod experiment`` runs nodes: each call's
   seconds and the graphs compiled for all of them;
5. a coordinator and N workers as real ``python -m sapod`` processes sharing the GPU, seconds per
   round from the coordinator's round_complete events, beside the original RL Swarm's ~38 s.

Prints tables, then one JSON object as the last line (also to --json FILE).
--smoke runs tiny shapes on CPU so the script itself can be tested without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_gpu_lib import SHAPES, build, err, free, model_dir, peak_gib, say, shared_process, sync

ORIGINAL_S_PER_ROUND = 38.0  # the original RL Swarm's reported round time; not measured here
VARIANTS = ("fp32", "bf16_autocast", "bf16", "bf16_static_compile")
PARTS = ("generation", "grpo", "node_round", "shared_process", "swarm")
SIZES = {"batches": ("8,16,64", "2,4"), "prompt_len": (256, 32), "new_tokens": (256, 16), "grpo_batch": (16, 4),
         "rounds": (20, 2), "shared_rounds": (8, 2)}  # (full, --smoke)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--smoke", action="store_true", help="tiny shapes, runs on CPU (for tests)")
    add("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)} [all]")
    add("--models", default=",".join(SHAPES), help="comma-separated subset [both]")
    add("--variants", default=",".join(VARIANTS), help="generation variants [all]")
    add("--batches", default=None, help="generation batch sizes [8,16,64; smoke 2,4]")
    add("--prompt-len", type=int, default=None, help="prompt tokens [256; smoke 32]")
    add("--new-tokens", type=int, default=None, help="tokens decoded, eos ignored [256; smoke 16]")
    add("--repeats", type=int, default=2, help="timed runs after one warm-up [2]")
    add("--grpo-batch", type=int, default=None, help="sequences per GRPO step [16; smoke 4]")
    add("--micro-batch", type=int, default=8, help="GRPO micro-batch, HFPolicy's default [8]")
    add("--rounds", type=int, default=None, help="swarm rounds [20; smoke 2]")
    add("--workers", type=int, default=5, help="swarm workers [5]")
    add("--shared-nodes", type=int, default=4, help="compiled policies in one process (shared_process) [4]")
    add("--shared-rounds", type=int, default=None, help="rounds of the shared_process part [8; smoke 2]")
    add("--swarm-timeout", type=float, default=None, help="seconds before the swarm is killed")
    add("--keep", action="store_true", help="keep the swarm's temporary folder")
    add("--compile-generation", default="auto", choices=("auto", "true", "false"),
        help="the swarm's workers' COMPILE_GENERATION [auto, sapod's default: on with CUDA]")
    add("--json", dest="json_file", default=None, help="also write the JSON object here")
    a = p.parse_args(argv)
    for k, (full, smoke) in SIZES.items():  # defaults that depend on --smoke
        if getattr(a, k) is None:
            setattr(a, k, smoke if a.smoke else full)
    a.batches = [int(b) for b in a.batches.split(",")]
    a.swarm_timeout = a.swarm_timeout or (300 if a.smoke else 300 + 120 * a.rounds)
    a.parts, a.models, a.variants = (set(x.split(",")) for x in (a.parts, a.models, a.variants))
    for given, known in ((a.parts, PARTS), (a.models, SHAPES), (a.variants, VARIANTS)):
        if given - set(known):
            p.error(f"unknown {', '.join(sorted(given - set(known)))}; choose from {', '.join(known)}")
    return a


def generation(a, dev) -> dict:
    from transformers import CompileConfig

    out: dict = {}
    for name in [m for m in SHAPES if m in a.models]:
        model = build(name, a.smoke, dev).eval()
        res = out[name] = {}
        for variant in [v for v in VARIANTS if v in a.variants]:
            if variant == "bf16_static_compile" and dev.type != "cuda":
                res[variant] = {"skipped": "transformers compiles generate (CUDA graphs) on CUDA only"}
                continue
            model.to(torch.bfloat16 if variant in ("bf16", "bf16_static_compile") else torch.float32)
            amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if variant == "bf16_autocast"
                   else contextlib.nullcontext())
            kw = dict(do_sample=True, top_k=0, temperature=1.0, max_new_tokens=a.new_tokens,
                      min_new_tokens=a.new_tokens, pad_token_id=0, eos_token_id=1)  # min = max: eos never ends
            res[variant] = {}
            for b in a.batches:
                ids = torch.randint(2, model.config.vocab_size, (b, a.prompt_len), device=dev)
                row, failed = {}, {}
                for fg in ([True, False] if variant == "bf16_static_compile" else [None]):
                    if fg is not None:  # fullgraph first; on failure, let dynamo break the graph
                        kw.update(cache_implementation="static", compile_config=CompileConfig(fullgraph=fg))
                    try:
                        row = time_generate(model, ids, kw, amp, a.repeats, dev)
                        if fg is not None:
                            row.update(fullgraph=fg, compiled=hasattr(model, "_compiled_call"), **failed)
                        break
                    except Exception as exc:  # one failing variant must not end the benchmark
                        row = err(exc)
                        failed = {"fullgraph_error": row["error"]}
                        torch._dynamo.reset()
                        free(dev)
                res[variant][f"b{b}"] = row
                say(name, variant, f"b{b}", f"{row['tokens_per_s']:.0f} tok/s, warm-up {row['warmup_s']:.1f} s"
                    if "tokens_per_s" in row else row)
        del model
        torch._dynamo.reset()
        free(dev)
    return out


def time_generate(model, ids, kw, amp, repeats: int, dev) -> dict:
    mask, secs, new = torch.ones_like(ids), [], 0
    with torch.inference_mode(), amp:
        for _ in range(repeats + 1):  # run 0 is the warm-up (and compile)
            sync(dev)
            t0 = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **kw)
            sync(dev)
            secs.append(time.perf_counter() - t0)
            new = out.shape[1] - ids.shape[1]
    s = statistics.median(secs[1:])
    return {"tokens_per_s": ids.shape[0] * new / s, "seconds": s, "warmup_s": secs[0], "new_tokens_per_row": new}


def grpo(a, dev) -> dict:
    from sapod.grpo import completion_logprobs, token_loss

    out: dict = {}
    b, p, c = a.grpo_batch, a.prompt_len, a.new_tokens
    for name in [m for m in SHAPES if m in a.models]:
        out[name] = {}
        for prec in ("fp32", "bf16_autocast"):
            free(dev)  # peak memory per precision: weights, grads, Adam state and activations
            try:
                model = build(name, a.smoke, dev).train()
                opt = torch.optim.Adam(model.parameters(), lr=1e-6)
                ids = torch.randint(2, model.config.vocab_size, (b, p + c), device=dev)
                adv, mask = torch.randn(b, device=dev), torch.ones(b, c, device=dev)
                secs = []
                for _ in range(a.repeats + 1):  # the warm-up step also creates Adam's state
                    sync(dev)
                    t0 = time.perf_counter()
                    for s in range(0, b, a.micro_batch):  # as HFPolicy.train_step: summed micro-batch grads
                        m = slice(s, s + a.micro_batch)
                        inp = ids[m, :-1]  # the last column predicts nothing trained on
                        pos = torch.arange(inp.shape[1], device=dev).expand_as(inp)
                        with (torch.autocast(dev.type, dtype=torch.bfloat16) if prec != "fp32"
                              else contextlib.nullcontext()):
                            logits = model(input_ids=inp, attention_mask=torch.ones_like(inp), position_ids=pos,
                                           logits_to_keep=c).logits
                        logp = completion_logprobs(logits[:, -c:], ids[m, p:], mask[m])
                        loss, _ = token_loss(logp, logp.detach(), adv[m], mask[m], normalizer=b * c)
                        loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sync(dev)
                    secs.append(time.perf_counter() - t0)
                peak = peak_gib(dev)
                out[name][prec] = {"seconds": statistics.median(secs[1:]), "peak_mem_gib": peak, "tokens": b * (p + c)}
                say(name, "grpo step", prec, f"{out[name][prec]['seconds']:.3f} s",
                    "peak " + (f"{peak:.2f} GiB" if peak is not None else "-"))
            except Exception as exc:
                out[name][prec] = err(exc)
                say(name, "grpo step", prec, out[name][prec])
            model = opt = None
    free(dev)
    return out


def node_round(a, dev) -> dict:
    """sapod's own node-round on a model folder of each shape: HFPolicy.generate for I=2 questions
    x G=4 (the nine default tasks' prompts) plus one train_step on (I + J) x G = 16 completions, with
    COMPILE_GENERATION false (dynamic cache) and true (static cache; compiled on CUDA only). Each
    repeat draws new questions, so a compiled run also meets new prompt lengths (new buckets)."""
    from sapod.policy.hf import HFPolicy
    from sapod.tasks import make_task_source

    out: dict = {}
    source = make_task_source("")
    for name in [m for m in SHAPES if m in a.models]:
        tmp = Path(tempfile.mkdtemp(prefix="sapod-bench-"))
        res = out[name] = {}
        try:
            model_dir(a, tmp, name, source)
            for mode in ("compile_generation=false", "compile_generation=true"):
                free(dev)
                try:
                    policy = HFPolicy(str(tmp), system_prompt=source.system_prompt, max_new_tokens=a.new_tokens,
                                      learning_rate=1e-6, device=str(dev), compile_generation=mode.endswith("true"))
                    c = res[mode] = one_node_round(a, dev, policy, source, f"{name} {mode}")
                    say("node-round", name, mode, f"generate {c['generate_s']:.3f} s + train {c['train_s']:.3f} s "
                        f"= {c['node_round_s']:.3f} s", f"(first generate {c['first_generate_s']:.1f} s)")
                except Exception as exc:
                    res[mode] = err(exc)
                    say("node-round", name, mode, res[mode])
                policy = None
                free(dev)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def one_node_round(a, dev, policy, source, label: str) -> dict:
    from sapod.types import Group

    gen_s, train_s, tokens, stats = [], [], 0, {}
    for r in range(a.repeats + 1):  # round 0 warms up (and compiles)
        own, peers = source.sample(2, 100 + r), source.sample(2, 200 + r)
        sync(dev)
        t0 = time.perf_counter()
        gen = policy.generate(own, 4, seed=r)
        sync(dev)
        t1 = time.perf_counter()
        # random weights earn nothing: alternate rewards so every group trains
        groups = [Group(item=i, completions=c, rewards=[1.0, 0.0, 1.0, 0.0], source="bench")
                  for i, c in zip(own + peers, gen.completions * 2)]
        stats = policy.train_step(groups)
        sync(dev)
        gen_s.append(t1 - t0)
        train_s.append(time.perf_counter() - t1)
        tokens = gen.tokens
        say("node-round", label, f"round {r}: generate {gen_s[-1]:.3f} s, train {train_s[-1]:.3f} s")
    g, t = statistics.median(gen_s[1:]), statistics.median(train_s[1:])
    return {"generate_s": g, "train_s": t, "node_round_s": g + t, "first_generate_s": gen_s[0],
            "generate_each_s": gen_s, "tokens_generated": tokens,
            "tokens_trained": int(stats["tokens"]), "peak_mem_gib": peak_gib(dev)}


def swarm(a, dev) -> dict:
    from sapod import paths
    from sapod.config import OPTIONS
    from sapod.progress import read_jsonl

    tmp = Path(tempfile.mkdtemp(prefix="sapod-bench-"))
    model_path, shared, logs = tmp / "model", tmp / "shared", tmp / "logs"
    shared.mkdir()
    logs.mkdir()
    parameters = model_dir(a, model_path)
    env = {k: v for k, v in os.environ.items() if k not in {o.env for o in OPTIONS}}  # no stray settings
    env.update(GDRIVE_PATH=str(shared), EXPERIMENT_NAME="bench", MODEL_NAME=str(model_path),
               MAX_ROUNDS=str(a.rounds), MAX_NEW_TOKENS=str(a.new_tokens), NUM_TRAIN_SAMPLES="2",
               NUM_TRANSPLANT_TREES="2", NUM_GENERATIONS="4", CHECKPOINT_INTERVAL=str(a.rounds),
               CHECKPOINT_KEEP="1", LOG_LEVEL="warning", DEVICE=dev.type, HF_HUB_OFFLINE="1",
               COMPILE_GENERATION=a.compile_generation,
               TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if dev.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # several processes on a few cores: no thread oversubscription
    nodes = [("coordinator", "coordinator")] + [("worker", f"w{i + 1}") for i in range(a.workers)]
    t0, procs, codes = time.monotonic(), {}, {}
    try:
        for role, n in nodes:
            with open(logs / f"{n}.out", "wb") as out, open(logs / f"{n}.err", "wb") as errf:
                procs[n] = subprocess.Popen([sys.executable, "-m", "sapod", "--role", role, "--node-id", n],
                                            env=env, stdout=out, stderr=errf)
        progress, seen = paths.progress_file(paths.experiment_root(shared, "bench"), "coordinator"), 0
        while any(proc.poll() is None for proc in procs.values()) and time.monotonic() - t0 < a.swarm_timeout:
            time.sleep(1.0)
            done = [r for r in read_jsonl(progress) if r.get("event") == "round_complete"]
            for r in done[seen:]:  # one line per round, so a long run shows it is moving
                say("swarm", f"round {r.get('round')} complete in {float(r.get('seconds', 0)):.2f} s")
            seen = max(seen, len(done))
        codes = {n: "timeout" if (c := proc.poll()) is None else c for n, proc in procs.items()}
    finally:
        for proc in procs.values():  # only the processes this script started
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall = time.monotonic() - t0
    root = paths.experiment_root(shared, "bench")
    secs = [float(r["seconds"]) for r in read_jsonl(paths.progress_file(root, "coordinator"))
            if r.get("event") == "round_complete" and isinstance(r.get("seconds"), (int, float))]
    steady = secs[1:] or secs  # round 0 also waits for every worker to start and load its model
    rows = [r for _, n in nodes[1:] for r in read_jsonl(paths.metrics_file(root, n))]
    later = [r for r in rows if r.get("round", 0) > 0] or rows
    res = {"workers": a.workers, "rounds": a.rounds, "rounds_completed": len(secs), "exit_codes": codes,
           "wall_s": wall, "parameters": parameters, "compile_generation": a.compile_generation,
           "round_seconds": secs, "first_round_s": secs[0] if secs else None,
           "median_s": statistics.median(steady) if steady else None,
           "p95_s": statistics.quantiles(steady, n=20, method="inclusive")[18] if len(steady) > 1
           else (steady[0] if steady else None),
           "worker_phase_median_s": {k: statistics.median(float(r.get(k, 0.0)) for r in later)
                                     for k in ("t_generate", "t_gather", "t_train")} if later else {},
           # random weights earn reward 0, every group lacks signal and train_step returns early
           "worker_rounds_trained": sum(1 for r in rows if r.get("tokens_trained", 0) > 0),
           "worker_rounds": len(rows), "original_rl_swarm_s_per_round": ORIGINAL_S_PER_ROUND}
    res["speedup_vs_original"] = ORIGINAL_S_PER_ROUND / res["median_s"] if res["median_s"] else None
    say("swarm", f"{len(secs)}/{a.rounds} rounds", f"median {res['median_s'] or 0:.3f} s/round",
        f"exit codes {codes}")
    bad = [n for n, c in codes.items() if c != 0]
    if bad:
        res["stderr_tail"] = {n: (logs / f"{n}.err").read_text(errors="replace")[-1500:] for n in bad}
    if a.keep:
        res["folder"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def main(argv=None) -> int:
    a = parse_args(argv)
    import transformers

    if not torch.cuda.is_available() and not a.smoke:
        print("bench_gpu: no CUDA device; this benchmark needs a GPU (--smoke runs tiny shapes on CPU)",
              file=sys.stderr)
        return 2
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.smoke else "cpu")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as HFPolicy does
    transformers.utils.logging.disable_progress_bar()
    result = {"benchmark": "gpu", "smoke": a.smoke, "device": str(dev),
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "settings": {"batches": a.batches, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                           "repeats": a.repeats, "grpo_batch": a.grpo_batch, "micro_batch": a.micro_batch,
                           "rounds": a.rounds, "workers": a.workers, "tf32": dev.type == "cuda"}}
    for part, fn in (("generation", generation), ("grpo", grpo), ("node_round", node_round),
                     ("shared_process", shared_process), ("swarm", swarm)):
        if part in a.parts:
            try:
                result[part] = fn(a, dev)
            except Exception as exc:
                result[part] = err(exc)
            if a.json_file:  # after each part: a run cut short keeps the parts it finished
                Path(a.json_file).write_text(json.dumps(result) + "\n")
    estimate(result, dev)
    for part in PARTS:
        if part in result:
            report(part, result[part])
    line = json.dumps(result)
    if a.json_file:
        Path(a.json_file).write_text(line + "\n")
    print(line)
    return 0


def estimate(result: dict, dev) -> None:
    """When no worker trained (random weights), add part 2's step time to the round: a real-task estimate."""
    sw, step = result.get("swarm", {}), result.get("grpo", {}).get("gpt2-124m", {})
    # (I + J) x G = 16 sequences: the --grpo-batch default; HFPolicy autocasts to bf16 on CUDA only
    sec = step.get("bf16_autocast" if dev.type == "cuda" else "fp32", {}).get("seconds")
    if sw.get("median_s") and sw.get("worker_rounds_trained") == 0 and sec:
        sw["estimated_s_with_train_step"] = sw["median_s"] + sec
        sw["estimated_speedup_vs_original"] = ORIGINAL_S_PER_ROUND / sw["estimated_s_with_train_step"]


def report(part: str, res: dict) -> None:
    """The human table for one part; failures print their error."""
    print(f"\n== {part}")
    cell = lambda c, key, fmt: fmt.format(c[key]) if c.get(key) is not None else c.get("error", "-")[:70]  # noqa
    if "error" in res:
        print(f"  failed: {res['error']}")
    elif part == "generation":
        for model, variants in res.items():
            for variant, cells in variants.items():
                line = "  ".join(f"{b}: " + cell(c, "tokens_per_s", "{:9.0f} tok/s") for b, c in cells.items()
                                 if b != "skipped") or "skipped: " + cells["skipped"]
                print(f"  {model:<14}{variant:<21}{line}")
    elif part == "node_round":
        for model, modes in res.items():
            for mode, c in modes.items():
                if "error" in c:
                    print(f"  {model:<14}{mode:<26}{c['error'][:100]}")
                    continue
                times = "  ".join(f"{k} {c[k]:.3f} s" for k in ("generate_s", "train_s", "node_round_s"))
                print(f"  {model:<14}{mode:<26}{times}  (first generate {c['first_generate_s']:.1f} s)")
    elif part == "shared_process":
        print(f"  {res['nodes']} compiled GPT-2 policies in one process, {res['rounds']} rounds: generate median "
              f"{res['median_s']:.3f} s, max {res['max_s']:.1f} s; graphs compiled {res['graphs_compiled']} "
              f"(recompile limit {res['recompile_limit']}); all still static: {res['all_still_static']}")
    elif part == "grpo":
        for model, precs in res.items():
            for prec, c in precs.items():
                print(f"  {model:<14}{prec:<15}{cell(c, 'seconds', '{:.3f} s/step')}  "
                      f"peak {cell(c, 'peak_mem_gib', '{:.2f} GiB')}")
    else:
        f = lambda key: cell(res, key, "{:.2f}")  # noqa: E731
        print(f"  {res['workers']} workers + coordinator, {res['rounds_completed']}/{res['rounds']} rounds, "
              f"exit codes {res['exit_codes']}, trained in {res['worker_rounds_trained']}/{res['worker_rounds']}")
        print(f"  s/round median {f('median_s')}  p95 {f('p95_s')}  first {f('first_round_s')}  with a train "
              f"step ~{f('estimated_s_with_train_step')}  (original RL Swarm ~{ORIGINAL_S_PER_ROUND:.0f} s)")
        print("  worker phase medians: " + "  ".join(f"{k} {v:.3f}s" for k, v in res["worker_phase_median_s"].items()))


if __name__ == "__main__":
    sys.exit(main())
