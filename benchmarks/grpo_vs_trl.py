"""Our GRPO recipe vs TRL's GRPOTrainer (colocate, sleep mode on), stock and with our plugin, the same
work, one run, one GPU.

    python benchmarks/grpo_vs_trl.py --size qwen3-0.6b --steps 12 --out results/h100/grpo_vs_trl_qwen3-0.6b.json

Arms, each in its own process (one vLLM engine per process): ``ours`` (recipes/grpo.py with TRL's knobs),
``ours_tuned`` (the same work using the memory the sleeping engine gives back: bigger micro-batches, no
gradient checkpointing), ``trl`` (stock GRPOTrainer) and ``trl_plugin`` (the same trainer plus
``rollout_sleep.integrations.trl.patch``, verify off while timing). Peak GPU memory of every arm is
sampled device-wide by this parent process (every 20 ms, ``cudaMemGetInfo``), so all arms are measured alike.

Same work on both sides: a random-weight checkpoint of the shape (bf16 weights, no autocast), the synthetic
arithmetic prompts, 16 prompts x 8 generations per step, up to 128 completion tokens, temperature 1,
AdamW lr 1e-6 (fused on both sides), micro-batches of 32 completions (TRL: per-device batch 32 x 4
accumulation steps, one generation per optimizer step), gradient checkpointing, no KL (beta 0), vLLM at 30%
of the GPU, the loss corrected for the vLLM/trainer mismatch (TRL's default: sequence-level importance
ratio, above 3 masked; both sides). TRL recomputes the trainer's log-probs for that correction in an extra
forward pass; the recipe takes them from its training forward (one optimizer step per batch: the same values).
Each side runs in its own process (one vLLM engine per process). Steady state = steps after the first 2.
TRL's phases are timed by wrapping its vLLM calls (sync_weights, sleep, wake_up, generate, reset).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUNED = {"qwen3-0.6b": ("train.micro_batch=128", "train.gradient_checkpointing=false"),
         "qwen3-4b": ("train.micro_batch=32", "train.gradient_checkpointing=false"),
         "qwen3-8b": ("train.micro_batch=16", "train.gradient_checkpointing=false")}


class PeakMemory:
    """Device-wide peak of GPU memory in use while the block runs, above what was in use before it."""

    def __init__(self, period_s: float = 0.02):
        import threading

        import torch

        self.torch, self.period = torch, period_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self.stop.is_set():
            self.min_free = min(self.min_free, self.torch.cuda.mem_get_info()[0])
            time.sleep(self.period)

    def __enter__(self):
        self.base_free = self.min_free = self.torch.cuda.mem_get_info()[0]
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak_gib = (self.base_free - self.min_free) / 2**30
sys.path.insert(0, str(ROOT / "src"))

from rollout_sleep import versions  # noqa: E402
WARMUP = 2


def engine_settings(args: list[str]) -> dict:
    """The recipe's engine settings for ``--config FILE`` + overrides (as the run resolved them)."""
    from rollout_sleep.config import load_config

    cfg = load_config(args[0], args[1:]).engine
    return {k: getattr(cfg, k) for k in ("kv_cache", "kv_cache_bytes", "gpu_memory_utilization", "keep_trainer_cache")}


def run_ours(size: str, steps: int, workdir: Path, name: str = "ours", extra: tuple[str, ...] = ()) -> dict:
    out = workdir / name
    cmd = [sys.executable, str(ROOT / "recipes" / "grpo.py"), "--config", str(ROOT / "configs" / f"{size}.yaml"),
           f"output_dir={out}", f"train.steps={steps}", "wandb.mode=disabled", "resume=false", "overwrite=true",
           "engine.verify_every=0", "save_final=false", *extra]
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        return {"error": proc.stdout[-2000:] + proc.stderr[-4000:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[WARMUP:]
    phases = {k: statistics.median(r.get(f"{k}_s", 0.0) for r in steady)
              for k in ("generate", "sleep", "wake_weights", "pack", "load", "wake_kv_cache", "reset", "train")}
    return {"wall_s": time.perf_counter() - t0, "peak_gpu_used_gib": mem.peak_gib, "step_s": [r["step_s"] for r in rows],
            "median_step_s": statistics.median(r["step_s"] for r in steady),
            "tokens_per_step": statistics.median(r["generated_tokens"] for r in steady),
            "cache_released_steps": sum(r.get("cache_released", 0.0) for r in rows),
            "phases_median_s": phases, "engine_settings": engine_settings(cmd[3:]),
            "memory_taken_by_wake_gib": statistics.median([r["memory_taken_by_wake_gib"] for r in steady
                                                           if "memory_taken_by_wake_gib" in r] or [float("nan")]),
            "cycle_overhead_s": phases["sleep"] + phases["wake_weights"] + phases["pack"] + phases["load"]
            + phases["wake_kv_cache"] + phases["reset"]}


def run_trl(size: str, steps: int, workdir: Path, plugin: bool) -> None:
    """In a child process: TRL GRPOTrainer on the same work (``plugin``: with our patch); prints one RESULT line."""
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rollout_sleep.checkpoints import make_checkpoint
    from rollout_sleep.data import synthetic_arithmetic
    from rollout_sleep.rewards import arithmetic_exact, digits_format

    ckpt = make_checkpoint(workdir / "trl_model", size, seed=0, dtype="bfloat16")
    ds = synthetic_arithmetic(steps * 16 * 2, seed=0)

    def reward_digits(prompts, completions, **kw):
        return [digits_format(c, {}) for c in completions]

    def reward_exact(prompts, completions, answer, **kw):
        return [arithmetic_exact(c, {"answer": a}) for c, a in zip(completions, answer)]

    args = GRPOConfig(
        output_dir=str(workdir / "trl_out"), per_device_train_batch_size=32, gradient_accumulation_steps=4,
        num_generations=8, max_completion_length=128, learning_rate=1e-6, temperature=1.0, beta=0.0,
        num_iterations=1, gradient_checkpointing=True, bf16=False, model_init_kwargs={"dtype": torch.bfloat16},
        use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True, vllm_gpu_memory_utilization=0.3,
        vllm_max_model_length=1024, max_steps=steps, logging_steps=1, report_to="none", save_strategy="no",
        seed=0)
    timers: dict[str, float] = {}
    outer: list[str] = []  # the timed call in progress: a call inside it (sync_weights -> wake_up) is part of it

    def wrap(obj, name, key):
        fn = getattr(obj, name)

        def timed(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            label = f"{outer[0]}.{key}" if outer else key  # nested: recorded apart, not counted twice
            outer.append(key)
            try:
                return fn(*a, **k)
            finally:
                outer.pop()
                torch.cuda.synchronize()
                timers[label] = timers.get(label, 0.0) + time.perf_counter() - t
        setattr(obj, name, timed)

    rows: list[dict] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timers.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            rows.append({"step_s": time.perf_counter() - self.t0, **timers})

    tok = AutoTokenizer.from_pretrained(ckpt)
    t_init = time.perf_counter()
    trainer = GRPOTrainer(model=ckpt, reward_funcs=[reward_digits, reward_exact], args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[StepTimer()])
    init_s = time.perf_counter() - t_init
    if plugin:
        from rollout_sleep.integrations.trl import patch

        patch(trainer, verify_every=0)
    gen = trainer.vllm_generation
    wrap(gen, "sync_weights", "sync")  # includes its wake_up(["weights"]) and reset_prefix_cache()
    for name in ("sleep", "wake_up", "generate", "reset_prefix_cache"):
        wrap(gen.llm, name, name)
    trainer.train()
    settings = {k: str(getattr(args, k)) for k in ("optim", "loss_type", "vllm_importance_sampling_correction",
                                                   "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max")}
    print("RESULT " + json.dumps({"init_s": init_s, "rows": rows, "settings": settings}), flush=True)
    os._exit(0)


def summarize_trl(rows: list[dict], completion_tokens: float | None) -> dict:
    steady = rows[WARMUP:]
    keys = ("sync", "sleep", "wake_up", "generate", "reset_prefix_cache", "sync.wake_up", "sync.reset_prefix_cache")
    phases = {k: statistics.median(r.get(k, 0.0) for r in steady) for k in keys}
    return {"step_s": [r["step_s"] for r in rows], "median_step_s": statistics.median(r["step_s"] for r in steady),
            "phases_median_s": phases,
            # sync = wake_up(["weights"]) + per-parameter load_weights + reset_prefix_cache (its parts are
            # recorded as sync.*, and not counted again); wake_up = the KV-cache wake before generating
            "cycle_overhead_s": phases["sync"] + phases["sleep"] + phases["wake_up"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="qwen3-0.6b")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/rs-grpo-bench")
    ap.add_argument("--trl-child", choices=["stock", "plugin"])
    ap.add_argument("--arms", default="ours,ours_tuned,trl,trl_plugin",
                    help="comma-separated: ours, ours_tuned, trl, trl_plugin, and ours_dpK / ours_tuned_dpK (K engine "
                         "processes on the GPU)")
    args = ap.parse_args()
    work = Path(args.workdir) / args.size
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.trl_child:
        return run_trl(args.size, args.steps, work, args.trl_child == "plugin")
    import torch

    # an existing --out of the same size on the same card gains the arms run now (arms split over calls)
    prev = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    same = prev.get("size") == args.size and prev.get("device") == torch.cuda.get_device_name()
    result = prev if same else {}
    result.update({"size": args.size, "steps": args.steps, "device": torch.cuda.get_device_name(),
              "versions": versions("vllm", "torch", "trl"),
              "work": "16 prompts x 8 generations, <=128 tokens, bf16, fused AdamW 1e-6, grad ckpt, micro-batch 32, "
                      "sequence_mask sampling correction (cap 3)",
              "tuned_overrides": list(TUNED.get(args.size, ()))})
    arms = args.arms.split(",")
    for arm in arms:
        # ours_dpK / ours_tuned_dpK: the same with K engine processes on the GPU (engine.processes=K)
        base, _, dp = arm.partition("_dp")
        processes = (f"engine.processes={int(dp)}",) if dp else ()
        if base == "ours":
            result[arm] = run_ours(args.size, args.steps, work, arm, processes)
        elif base == "ours_tuned":
            result[arm] = run_ours(args.size, args.steps, work, arm, TUNED.get(args.size, ()) + processes)
        else:
            result[arm] = run_trl_child(args, "plugin" if arm == "trl_plugin" else "stock")
        r = result[arm]
        print(arm, "error" if "error" in r else f"{r['median_step_s']:.3f} s/step peak {r['peak_gpu_used_gib']:.1f} GiB "
              + json.dumps({k: round(v, 4) for k, v in r["phases_median_s"].items()}), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    ok = {a: r for a, r in result.items() if (a.startswith("ours") or a in ("trl", "trl_plugin"))
          and isinstance(r, dict) and "error" not in r}
    if "trl" in ok:
        t = ok["trl"]
        result["trl_step_s_over"] = {a: t["median_step_s"] / r["median_step_s"] for a, r in ok.items()}
        result["cycle_overhead_over_trl"] = {a: r["cycle_overhead_s"] / t["cycle_overhead_s"] for a, r in ok.items()}
        print("TRL step time / arm step time:", json.dumps(result["trl_step_s_over"]), flush=True)
        print("arm cycle overhead / TRL's:", json.dumps(result["cycle_overhead_over_trl"]), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


def run_trl_child(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--size", args.size, "--steps", str(args.steps), "--out", "-",
           "--workdir", args.workdir, "--trl-child", mode]
    with PeakMemory() as mem:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        return {"error": proc.stderr[-4000:]}
    trl = json.loads(line[-1][7:])
    return {"init_s": trl["init_s"], "peak_gpu_used_gib": mem.peak_gib, "settings": trl.get("settings"),
            **summarize_trl(trl["rows"], None)}


if __name__ == "__main__":
    main()
