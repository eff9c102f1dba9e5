"""Where a GRPO step's sleep and wake time goes, and what PyTorch's cache churn costs the trainer.

    python benchmarks/sleep_anatomy.py --size qwen3-4b --steps 7 --out results/h100/sleep_anatomy_qwen3-4b.json

Runs ``recipes/grpo.py`` (one process per variant: one vLLM engine per process), optionally with timers
around the calls vLLM's sleep and wake make (``gc.collect``, ``torch.cuda.empty_cache``, the allocator's
per-allocation unmap / map). Variants (engine settings):

- ``gpu_share``: KV cache from vLLM's share of the GPU, vLLM's sleep empties PyTorch's cache (vLLM's way);
- ``gpu_share_keep_cache``: the trainer's cached blocks kept through the sleep, vLLM at 20% of the GPU;
- ``expandable``: ``gpu_share`` with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``;
- ``step``: KV cache sized to one step's sequences, cache emptied at sleep;
- ``step_keep_cache``: both (the recipe's default).

Device-wide peak GPU memory of each variant is sampled by this parent process.
``--no-timers`` leaves vLLM's calls unwrapped (the timers synchronize the device at each of ~190 calls).

Steady state = the steps after the first 2; medians per phase and per timer.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, PeakMemory, device_name, versions, write_json

WARMUP = 2
VARIANTS = {  # engine settings spelled out, whatever the config's defaults
    "gpu_share": ({}, ("engine.kv_cache=gpu_share", "engine.keep_trainer_cache=false")),
    "gpu_share_keep_cache": ({}, ("engine.kv_cache=gpu_share", "engine.keep_trainer_cache=true",
                                  "engine.gpu_memory_utilization=0.2")),
    "expandable": ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
                   ("engine.kv_cache=gpu_share", "engine.keep_trainer_cache=false")),
    "step": ({}, ("engine.kv_cache=step", "engine.keep_trainer_cache=false")),
    "step_keep_cache": ({}, ("engine.kv_cache=step", "engine.keep_trainer_cache=true")),
}


def child(args) -> None:
    """Run the recipe in this process with timers installed; write per-step timer sums to ``args.timers``."""
    import importlib.util

    import torch


    current: dict[str, float] = {}
    steps: list[dict[str, float]] = []

    def timed(name, fn):
        def wrapper(*a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                current[name] = current.get(name, 0.0) + time.perf_counter() - t0
                current[name + "_calls"] = current.get(name + "_calls", 0) + 1
        return wrapper

    if args.timers_on:
        gc.collect = timed("gc_collect", gc.collect)
        torch.cuda.empty_cache = timed("empty_cache", torch.cuda.empty_cache)
    if args.timers_on and torch.cuda.is_available():
        from vllm.device_allocator import cumem

        cumem.unmap_and_release = timed("unmap_and_release", cumem.unmap_and_release)
        cumem.create_and_map = timed("create_and_map", cumem.create_and_map)

    spec = importlib.util.spec_from_file_location("grpo_recipe", ROOT / "recipes" / "grpo.py")
    recipe_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe_mod)
    from rollout_sleep.run.config import load_config

    recipe = recipe_mod.GRPORecipe(load_config(str(ROOT / "configs" / f"{args.size}.yaml"), args.overrides))
    recipe.setup()
    end_step = recipe.manager.end_step

    def end_step_with_timers():
        steps.append(dict(current))
        current.clear()
        return end_step()

    recipe.manager.end_step = end_step_with_timers
    current.clear()
    recipe.train()
    Path(args.timers).write_text(json.dumps(steps))
    os._exit(0)


def summarize(rows: list[dict]) -> dict:
    keys = sorted({k for r in rows[WARMUP:] for k in r if isinstance(r[k], (int, float))})
    return {k: statistics.median(r.get(k, 0.0) for r in rows[WARMUP:]) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="qwen3-4b")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--timers")
    ap.add_argument("--no-timers", dest="timers_on", action="store_false")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.child:
        return child(args)
    result = {"size": args.size, "steps": args.steps, "warmup_steps": WARMUP, "device": device_name(),
              "versions": versions("vllm", "torch", "transformers"), "overrides": args.overrides,
              "timers": args.timers_on, "variants": {}}
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "sleep_anatomy"
    shared_model: list[str] = []  # the first variant builds the checkpoint, the others load it
    for name in args.variants.split(","):
        env_extra, extra = VARIANTS[name]
        out = work / name
        timers = work / f"{name}_timers.json"
        cmd = [sys.executable, __file__, "--child", "--size", args.size, "--timers", str(timers), "--out", args.out,
               *([] if args.timers_on else ["--no-timers"]),
               f"output_dir={out}", f"train.steps={args.steps}", "wandb.mode=disabled", "resume=false", "overwrite=true",
               "engine.verify_every=0", "save_final=false", *shared_model, *args.overrides, *extra]
        t0 = time.perf_counter()
        with PeakMemory(period_s=0.02) as mem:
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env_extra}, timeout=900)
        if proc.returncode != 0:
            result["variants"][name] = {"error": proc.stderr[-3000:]}
            print(name, "failed:", proc.stderr[-3000:], flush=True)
            continue
        if not shared_model and (out / "model" / "config.json").exists():
            shared_model.append(f"model.path={out / 'model'}")
        metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        timer_rows = json.loads(timers.read_text())
        result["variants"][name] = {
            "wall_s": time.perf_counter() - t0, "env": env_extra, "overrides": list(extra),
            "peak_gpu_used_gib": mem.peak_above_base_gib,
            "phases_median": summarize([{k: v for k, v in m.items() if k.endswith("_s") or k == "cache_released"}
                                        for m in metrics]),
            "timers_median": summarize(timer_rows), "steps": metrics, "timers": timer_rows}
        print(name, json.dumps(result["variants"][name]["phases_median"]),
              json.dumps(result["variants"][name]["timers_median"]), flush=True)
        write_json(args.out, result)


if __name__ == "__main__":
    main()
