"""Rollouts at the GPU's speed: one engine vs ``k`` engine processes on one GPU, and the packed IPC sync.

    python benchmarks/fast_rollouts.py --out results/h100/fast_rollouts --size qwen3-0.6b --engines 0,1,2,4
    python benchmarks/fast_rollouts.py --out results/h100/fast_rollouts --size qwen3-4b --engines 1,2,3 \
        --async-scheduling
    python benchmarks/fast_rollouts.py --out /tmp/fr --size tiny --engines 0,1,2 --quick      # CPU smoke path

Each configuration runs in its own subprocess, bounded in time (``--config-timeout``, and the whole call by
``--budget``); a failing one is recorded with the tail of its output and the rest continue; the JSON
(``DIR/fast_rollouts_<size>.json``) is rewritten after every configuration. Per configuration:

1. an :class:`EnginePool` of ``k`` engine processes (k=1 included), the first engine started alone (it
   fills vLLM's compile cache), the others at once; start seconds. ``k=0`` is the baseline: one engine in
   the benchmark's own process (today's layout; the sync still goes through the packed buffer);
2. the rollout work of the GRPO benchmarks: 16 prompts x 8 completions x 128 tokens, temperature 1,
   sampled-token log-probs, no detokenization; 1 warm-up + ``--repeats`` timed calls (median), each
   engine's own seconds, the tokens generated;
3. a trainer model (random weights, another seed than the engines' checkpoint), built first on the same
   GPU, and the floor (one device-to-device copy of every weight byte, before the engines start);
   ``--cycles`` level-2 cycles: sleep → wake with the
   trainer's weights (pack into one buffer, one IPC handle, every engine loads from views of it) →
   :func:`verify` on every engine; then the same sync while awake (``load_weights``), ``--repeats`` times,
   and again after ``pool.adopt(trainer)`` (the trainer's parameters live in the shared buffer: nothing is
   packed, the engines copy from the trainer's own memory); per-engine phase seconds; the first generate
   after each wake;
4. device-wide peak GPU memory (``mem_get_info`` polled every 20 ms in this configuration's process).

``--async-scheduling`` adds k=1 runs with vLLM's ``async_scheduling`` forced on and off (if the installed
vLLM has the option; 0.26 turns it on by itself where it applies). On CPU (``--size tiny``) the pool runs
engine processes too; in-memory weights for them are refused (CUDA IPC needs CUDA): the refusal is recorded,
the sync goes through the checkpoint directory (the disk route).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

from common import PeakMemory, d2d_floor, device_name, run_bounded, versions, write_json


def emit(res: dict) -> None:
    """What this configuration measured so far (the parent keeps the last, should it be stopped)."""
    print("PARTIAL " + json.dumps(res, default=str), flush=True)


def step(what: str) -> None:
    """Where this configuration is (the output tail of a configuration that timed out ends with it)."""
    print(f"STEP {time.strftime('%H:%M:%S')} {what}", flush=True)


def child(args: argparse.Namespace, engines: int, extra: dict, res: dict) -> dict:
    """One configuration; fills ``res`` as it goes (what was measured before a failure is kept)."""
    import torch
    from transformers import AutoConfig

    from rollout_sleep.weights.checkpoints import random_model
    from rollout_sleep.grpo.data import synthetic_arithmetic
    from rollout_sleep.engine.memory import kv_cache_bytes_for
    from rollout_sleep.pool.packing import IPCUnavailableError
    from rollout_sleep.pool.pool import EnginePool
    from rollout_sleep.weights.verify import verify

    cuda = torch.cuda.is_available()
    path = str(Path(args.workdir) / args.size / "model")
    n_prompts, n, max_tokens = (4, 2, 16) if args.quick else (16, 8, 128)
    dtype = "bfloat16" if cuda else "float32"
    seqs = -(-n_prompts * n // max(engines, 1))
    kv = kv_cache_bytes_for(path, tokens=seqs * (64 + max_tokens) * 2, dtype=dtype) if cuda else 256 << 20
    res.update({"engines": engines, "extra": extra, "kv_cache_bytes_per_engine": kv,
                "work": f"{n_prompts} prompts x {n} completions x {max_tokens} tokens, temperature 1, log-probs"})
    with PeakMemory() as peak:
        # the trainer first (as in RL), and the floor while nothing else holds the GPU
        config = AutoConfig.from_pretrained(path)
        trainer = random_model(config, seed=1, device="cuda" if cuda else "cpu", dtype=getattr(torch, dtype))
        nbytes = sum(p.numel() * p.element_size() for p in trainer.parameters())
        res["weight_bytes"] = nbytes
        if cuda:
            res["d2d_floor_s"] = statistics.median(d2d_floor(nbytes))
        step(f"trainer built; starting {engines or 'in-process'} engine(s)")
        t0 = time.perf_counter()
        if engines == 0:  # today's layout: one engine in this (the trainer's) process
            from rollout_sleep.engine.engine import Engine

            share = {"gpu_memory_utilization": 0.9 * torch.cuda.mem_get_info()[0] / torch.cuda.mem_get_info()[1]} \
                if cuda else {}  # vLLM checks that this much is free at start (the trainer holds some)
            pool = EnginePool.of([Engine(path, dtype=dtype, max_model_len=1024, kv_cache_bytes=kv, **share, **extra)])
        else:
            pool = EnginePool(path, engines=engines, dtype=dtype, max_model_len=1024, kv_cache_bytes=kv,
                              start_timeout_s=args.command_timeout * 2, command_timeout_s=args.command_timeout,
                              **extra)
        res["start_s"] = time.perf_counter() - t0
        step(f"engines started in {res['start_s']:.1f} s")
        emit(res)
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path)
            prompts = [tok(r["prompt"]).input_ids for r in synthetic_arithmetic(n_prompts, seed=0)]
            sampling = dict(n=n, max_tokens=max_tokens, temperature=1.0)

            def rollout() -> tuple[float, int, list[float]]:
                t = time.perf_counter()
                outs = pool.generate(prompts, **sampling)
                dt = time.perf_counter() - t
                order = [c.prompt_index for c in outs]
                assert order == sorted(order) and len(outs) == n_prompts * n, "completions out of prompt order"
                return dt, sum(len(c.token_ids) for c in outs), list(pool.last_generate_seconds)

            step("warm-up generate")
            rollout()
            step("timed generates")
            runs = [rollout() for _ in range(args.repeats)]
            res["generate_s"] = [r[0] for r in runs]
            res["median_generate_s"] = statistics.median(res["generate_s"])
            res["engine_generate_s"] = [r[2] for r in runs]
            res["tokens"] = runs[0][1]
            res["tokens_per_s"] = res["tokens"] / res["median_generate_s"]

            emit(res)
            cycles, loads = [], []
            res["cycles"] = cycles
            for c in range(args.cycles):
                with torch.no_grad():  # a stand-in for a training step: every weight changes
                    for p in trainer.parameters():
                        p.mul_(1.0 + 2.0 ** -6 * (1 if c % 2 else -1))
                step(f"cycle {c}: sleep, wake with the trainer's weights, generate, verify")
                s = pool.sleep(level=2)
                try:
                    w = pool.wake_up(weights=trainer)
                except IPCUnavailableError as err:
                    res["ipc_refused"] = str(err)
                    w = pool.wake_up(weights=path)  # the disk route (engines reload the checkpoint)
                    res["sync_route"] = "checkpoint directory"
                else:
                    res["sync_route"] = "packed buffer" + (", one CUDA IPC handle" if engines else ", in-process")
                t = time.perf_counter()
                pool.generate(prompts, **sampling)
                first = time.perf_counter() - t
                entry = {"sleep": s.as_dict(), "wake": w.as_dict(), "first_generate_s": first}
                if res["sync_route"].startswith("packed"):
                    v = verify(pool, trainer)
                    entry["verify"] = {"ok": v.ok, "compared": v.compared, "seconds": v.seconds,
                                       "per_engine_ok": [e.ok for e in v.engines],
                                       "per_engine_compared": [e.compared for e in v.engines],
                                       "mismatched": dict(list(v.mismatched.items())[:5])}
                cycles.append(entry)
                emit(res)
            if res["sync_route"].startswith("packed"):
                step("awake syncs")
                for _ in range(args.repeats + 1):
                    loads.append(pool.load_weights(trainer).as_dict())
                loads = loads[1:]
                res["awake_sync"] = loads
                res["median_awake_sync_total_s"] = statistics.median(r["wall_s"] for r in loads)
                res["median_awake_sync_pack_s"] = statistics.median(r["pack_s"] for r in loads)
                res["median_awake_sync_load_s"] = statistics.median(r["load_s"] for r in loads)
                if cuda:
                    res["sync_over_floor"] = res["median_awake_sync_total_s"] / res["d2d_floor_s"]
                    res["sync_over_floor_per_copy"] = res["median_awake_sync_total_s"] / (
                        res["d2d_floor_s"] * (max(engines, 1) + 1))  # the pack + one copy per engine
                v = verify(pool, trainer)
                res["verify_after_awake_syncs"] = {"ok": v.ok, "per_engine_ok": [e.ok for e in v.engines]}
                emit(res)
                # the trainer's parameters moved into the shared buffer: a sync is the engines' copies alone
                step("adopted syncs")
                res["adopted_params"] = len(pool.adopt(trainer))
                adopted = []
                for _ in range(args.repeats + 1):
                    with torch.no_grad():
                        for p in trainer.parameters():
                            p.mul_(1.0 + 2.0 ** -6)
                    adopted.append(pool.load_weights(trainer).as_dict())
                res["awake_sync_adopted"] = adopted[1:]
                res["median_awake_sync_adopted_s"] = statistics.median(r["wall_s"] for r in adopted[1:])
                if cuda:
                    res["adopted_sync_over_floor"] = res["median_awake_sync_adopted_s"] / res["d2d_floor_s"]
                v = verify(pool, trainer)
                res["verify_after_adopted_syncs"] = {"ok": v.ok, "per_engine_ok": [e.ok for e in v.engines]}
            res["median_cycle_overhead_per_engine_s"] = [
                statistics.median(sum(cy[kind][f"engine{j}_{ph}_s"] for kind, ph in
                                      (("sleep", "sleep"), ("wake", "wake_weights"), ("wake", "load"),
                                       ("wake", "wake_kv_cache"), ("wake", "reset"))
                                      if f"engine{j}_{ph}_s" in cy[kind]) for cy in cycles)
                for j in range(max(engines, 1))]
            res["median_cycle_wall_s"] = statistics.median(cy["sleep"]["wall_s"] + cy["wake"]["wall_s"]
                                                           for cy in cycles)
            # the engines' own view of async scheduling (None: this vLLM has no such option)
            res["async_scheduling"] = [(getattr(m, "info", None) or m.commands.info()).get("async_scheduling")
                                       for m in pool.members]
        finally:
            if engines == 0:
                pool.members[0].close()
            pool.close()
    res["device_peak_used_gib"] = peak.peak_gib if cuda else None
    return res


def configs(args: argparse.Namespace) -> list[tuple[str, int, dict]]:
    out = []
    for k in [int(x) for x in args.engines.split(",") if x]:
        out.append(("in-process" if k == 0 else f"engines={k}", k, {"enforce_eager": True} if args.eager else {}))
    if args.async_scheduling:
        from vllm import EngineArgs
        import dataclasses

        if "async_scheduling" in {f.name for f in dataclasses.fields(EngineArgs)}:
            for on in (True, False):
                out.append((f"engines=1,async_scheduling={on}", 1, {"async_scheduling": on}))
        else:
            out.append(("async_scheduling", 0, {"skip": "this vLLM has no async_scheduling option"}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for fast_rollouts_<size>.json")
    ap.add_argument("--size", default="qwen3-0.6b", help="tiny (CPU), qwen3-0.6b, qwen3-4b, qwen3-8b")
    ap.add_argument("--engines", default="0,1,2,4",
                    help="comma-separated engine-process counts; 0: one engine in the benchmark's own process "
                         "(today's layout, the baseline)")
    ap.add_argument("--async-scheduling", action="store_true", help="also k=1 with async_scheduling on and off")
    ap.add_argument("--eager", action="store_true", help="enforce_eager=True (no CUDA graphs)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="4 prompts x 2 x 16 tokens (the CPU smoke path)")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for the whole call")
    ap.add_argument("--config-timeout", type=float, default=300.0, help="seconds for one configuration")
    ap.add_argument("--command-timeout", type=float, default=None,
                    help="seconds one engine-process command may take before the pool names it and its phase "
                         "(default: a third of --config-timeout; engines get twice that to start)")
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "rs-fast-rollouts"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.command_timeout is None:
        args.command_timeout = args.config_timeout / 3
    if args.child:
        import faulthandler
        import logging
        import signal

        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks before a kill
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logging.getLogger("rollout_sleep").setLevel(logging.INFO)
        spec = json.loads(args.child)
        res: dict = {}
        try:
            child(args, spec["engines"], spec["extra"], res)
        except BaseException as err:  # what was measured before stays in res
            res.update({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-6000:]})
        print("RESULT " + json.dumps(res, default=str), flush=True)
        os._exit(0)

    t_start = time.monotonic()
    import torch

    from rollout_sleep.weights.checkpoints import make_checkpoint

    path = Path(args.workdir) / args.size / "model"
    if not (path / "config.json").exists():
        make_checkpoint(path, args.size, seed=0, dtype="bfloat16" if torch.cuda.is_available() else "float32")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / f"fast_rollouts_{args.size}.json"
    result = {"size": args.size, "device": device_name(), "cpu_count": os.cpu_count(),
              "versions": versions("vllm", "torch", "transformers"), "argv": sys.argv[1:], "configs": {}}
    for name, k, extra in configs(args):
        if "skip" in extra:
            result["configs"][name] = {"skipped": extra["skip"]}
            continue
        left = args.budget - (time.monotonic() - t_start)
        if left < 30:
            result["configs"][name] = {"skipped": f"budget of {args.budget:.0f} s spent"}
            continue
        timeout = min(args.config_timeout, left)
        cmd = [sys.executable, __file__, "--out", args.out, "--size", args.size, "--repeats", str(args.repeats),
               "--cycles", str(args.cycles), "--workdir", args.workdir,
               "--command-timeout", str(min(args.command_timeout, timeout / 3)), "--child", json.dumps(
                   {"engines": k, "extra": extra})] + (["--quick"] if args.quick else [])
        t0 = time.monotonic()
        code, stdout, stderr, stacks = run_bounded(cmd, timeout, stacks=True)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        partial = [ln for ln in stdout.splitlines() if ln.startswith("PARTIAL ")]
        r = json.loads(lines[-1][7:]) if lines else json.loads(partial[-1][8:]) if partial else {}
        if not lines:
            r["error"] = f"timed out after {timeout:.0f} s" if code == "timeout" else f"exit code {code}, no result"
        if "error" in r:
            clean = "\n".join(ln for ln in stdout.splitlines() if not ln.startswith(("PARTIAL ", "RESULT ")))
            before = stderr[:len(stderr) - len(stacks)] if stacks else stderr
            r["output_tail"] = clean[-3000:] + "\n" + before[-8000:]
            r["steps"] = [ln for ln in stdout.splitlines() if ln.startswith("STEP ")]
        if stacks:
            r["stacks_at_timeout"] = stacks[-30000:]
        r["wall_s"] = time.monotonic() - t0
        result["configs"][name] = r
        summary = {key: r.get(key) for key in ("median_generate_s", "tokens", "start_s", "median_awake_sync_total_s",
                                                 "median_awake_sync_adopted_s", "d2d_floor_s", "sync_over_floor",
                                                 "adopted_sync_over_floor", "device_peak_used_gib", "error")
                   if r.get(key) is not None}
        print(name, json.dumps(summary, default=str), flush=True)
        write_json(out_file, result)
    write_json(out_file, result)
    print("wrote", out_file)


if __name__ == "__main__":
    main()
