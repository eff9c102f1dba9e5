"""Does ``keep_trainer_cache`` keep PyTorch's cache (the trainer's working set) through vLLM's sleep and wake?

For each case (keep on / off) a fresh process builds an engine, leaves ``--cache-gib`` of freed blocks in
PyTorch's cache (what a training step leaves behind), then sleeps (level 2) and wakes with the checkpoint,
recording ``torch.cuda.memory_reserved()`` and ``memory_allocated()`` around each call and what the engine's reports say
(``trainer_cache_kept``, ``cache_released``). The claim holds when, with keep on, reserved memory is still
there after the sleep and after the wake (unless the wake's own release was needed: ``cache_released``).

    python benchmarks/keep_cache_check.py --out DIR [--size qwen3-0.6b] [--cache-gib 4] [--quick]

``--quick`` runs the tiny model (the CPU path records that no CUDA is present and exits cleanly).
Writes DIR/keep_cache_check.json (partial results as each case ends).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

from common import GIB, device_name, gib, versions, write_json


def run_case(keep: bool, size: str, cache_gib: float) -> dict:
    import torch

    from rollout_sleep.weights.checkpoints import make_checkpoint
    from rollout_sleep.engine.engine import Engine

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device: keep_trainer_cache only acts on CUDA"}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(Path(tmp) / "model", size, seed=0, dtype="bfloat16")
        engine = Engine(ckpt, dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=True,
                        keep_trainer_cache=keep)
        block = torch.empty(int(cache_gib * GIB), dtype=torch.uint8, device="cuda")
        del block  # freed, still reserved: PyTorch's cache
        def cached() -> dict:
            return {"reserved_gib": gib(torch.cuda.memory_reserved()),
                    "allocated_gib": gib(torch.cuda.memory_allocated()),
                    "cached_free_gib": gib(torch.cuda.memory_reserved() - torch.cuda.memory_allocated())}

        out = {"keep_trainer_cache": keep, "memory": {"before_sleep": cached()}}
        s = engine.sleep(level=2)
        out["memory"]["after_sleep"] = cached()
        w = engine.wake_up(reload_checkpoint=True)
        out["memory"]["after_wake"] = cached()
        out["sleep_report"] = s.as_dict()
        out["wake_report"] = w.as_dict()
        out["claim_holds"] = (not keep) or (
            s.trainer_cache_kept is True and (w.cache_released or w.trainer_cache_kept is True)
            and out["memory"]["after_sleep"]["cached_free_gib"] >= 0.95 * out["memory"]["before_sleep"]["cached_free_gib"])
        engine.generate([[1, 2, 3]], max_tokens=4)
        return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="qwen3-0.6b")
    ap.add_argument("--cache-gib", type=float, default=4.0)
    ap.add_argument("--quick", action="store_true", help="tiny model, 0.5 GiB of cache")
    ap.add_argument("--case", choices=["keep", "nokeep"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.size, args.cache_gib = "tiny", 0.5
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.case:  # child: one engine per process (vLLM's sleep allocator allows one)
        try:
            result = run_case(args.case == "keep", args.size, args.cache_gib)
        except Exception:
            result = {"error": traceback.format_exc()[-4000:]}
        write_json(out / f"case_{args.case}.json", result)
        sys.stdout.flush()
        os._exit(0)
    results = {"size": args.size, "cache_gib": args.cache_gib, "versions": versions(), "cases": {},
               "device": device_name()}
    for case in ("keep", "nokeep"):
        cmd = [sys.executable, __file__, "--out", str(out), "--size", args.size, "--cache-gib", str(args.cache_gib),
               "--case", case]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
            f = out / f"case_{case}.json"
            results["cases"][case] = json.loads(f.read_text()) if f.exists() else {
                "error": f"exit {proc.returncode}", "log": (proc.stdout + proc.stderr)[-4000:]}
        except Exception:
            results["cases"][case] = {"error": traceback.format_exc()[-4000:]}
        write_json(out / "keep_cache_check.json", results)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("claim_holds", "memory", "skipped", "error")}
                      for k, v in results["cases"].items()}, indent=1))


if __name__ == "__main__":
    main()
