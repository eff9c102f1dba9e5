"""Our GRPO recipe vs TRL's GRPOTrainer (colocate, sleep mode on), the same work, one run, one GPU.

    python benchmarks/grpo_vs_trl.py --size qwen3-0.6b --steps 12 --out results/h100/grpo_vs_trl_qwen3-0.6b.json

Same work on both sides: a random-weight checkpoint of the shape (bf16 weights, no autocast), the synthetic
arithmetic prompts, 16 prompts x 8 generations per step, up to 128 completion tokens, temperature 1,
AdamW lr 1e-6, micro-batches of 32 completions (TRL: per-device batch 32 x 4 accumulation steps, one
generation per optimizer step), gradient checkpointing, no KL (beta 0), vLLM at 30% of the GPU.
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
sys.path.insert(0, str(ROOT / "src"))
WARMUP = 2


def run_ours(size: str, steps: int, workdir: Path, name: str = "ours", extra: tuple[str, ...] = ()) -> dict:
    out = workdir / name
    cmd = [sys.executable, str(ROOT / "recipes" / "grpo.py"), "--config", str(ROOT / "configs" / f"{size}.yaml"),
           f"output_dir={out}", f"train.steps={steps}", "wandb.mode=disabled", "resume=false",
           "engine.verify_every=0", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[WARMUP:]
    phases = {k: statistics.median(r.get(f"{k}_s", 0.0) for r in steady)
              for k in ("generate", "sleep", "wake_weights", "load", "wake_kv_cache", "reset", "train")}
    return {"wall_s": time.perf_counter() - t0, "step_s": [r["step_s"] for r in rows],
            "median_step_s": statistics.median(r["step_s"] for r in steady),
            "tokens_per_step": statistics.median(r["generated_tokens"] for r in steady),
            "phases_median_s": phases,
            "cycle_overhead_s": phases["sleep"] + phases["wake_weights"] + phases["load"] + phases["wake_kv_cache"]
            + phases["reset"]}


def run_trl(size: str, steps: int, workdir: Path) -> None:
    """In a child process: TRL GRPOTrainer on the same work; prints one RESULT line."""
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

    def wrap(obj, name, key):
        fn = getattr(obj, name)

        def timed(*a, **k):
            torch.cuda.synchronize()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                torch.cuda.synchronize()
                timers[key] = timers.get(key, 0.0) + time.perf_counter() - t
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
    gen = trainer.vllm_generation
    wrap(gen, "sync_weights", "sync")  # includes its wake_up(["weights"]) and reset_prefix_cache()
    for name in ("sleep", "wake_up", "generate", "reset_prefix_cache"):
        wrap(gen.llm, name, name)
    trainer.train()
    print("RESULT " + json.dumps({"init_s": init_s, "rows": rows}), flush=True)
    os._exit(0)


def summarize_trl(rows: list[dict], completion_tokens: float | None) -> dict:
    steady = rows[WARMUP:]
    keys = ("sync", "sleep", "wake_up", "generate", "reset_prefix_cache")
    phases = {k: statistics.median(r.get(k, 0.0) for r in steady) for k in keys}
    return {"step_s": [r["step_s"] for r in rows], "median_step_s": statistics.median(r["step_s"] for r in steady),
            "phases_median_s": phases,
            # sync_weights wraps one wake_up(["weights"]); wake_up counts both wake_ups
            "cycle_overhead_s": phases["sync"] + phases["sleep"] + phases["wake_up"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="qwen3-0.6b")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/rs-grpo-bench")
    ap.add_argument("--trl-child", action="store_true")
    args = ap.parse_args()
    work = Path(args.workdir) / args.size
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.trl_child:
        return run_trl(args.size, args.steps, work)
    import torch

    result = {"size": args.size, "steps": args.steps, "device": torch.cuda.get_device_name(),
              "work": "16 prompts x 8 generations, <=128 tokens, bf16, AdamW 1e-6, grad ckpt, micro-batch 32"}
    result["ours"] = run_ours(args.size, args.steps, work)
    print("ours:", json.dumps(result["ours"]["phases_median_s"]), result["ours"]["median_step_s"], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    # The same work using the memory the sleeping engine gives back: all 128 completions in one
    # micro-batch, no gradient checkpointing (same gradients, same optimizer step).
    result["ours_tuned"] = run_ours(args.size, args.steps, work, "ours_tuned",
                                    ("train.micro_batch=128", "train.gradient_checkpointing=false"))
    print("ours tuned:", json.dumps(result["ours_tuned"]["phases_median_s"]), result["ours_tuned"]["median_step_s"],
          flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    proc = subprocess.run([sys.executable, __file__, "--size", args.size, "--steps", str(args.steps), "--out", "-",
                           "--workdir", args.workdir, "--trl-child"], capture_output=True, text=True, timeout=1200)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        result["trl_error"] = proc.stderr[-4000:]
        print(proc.stderr[-4000:])
    else:
        trl = json.loads(line[-1][7:])
        result["trl"] = {"init_s": trl["init_s"], **summarize_trl(trl["rows"], None)}
        o, t = result["ours"], result["trl"]
        result["speedup_step_time"] = t["median_step_s"] / o["median_step_s"]
        result["speedup_step_time_tuned"] = t["median_step_s"] / result["ours_tuned"]["median_step_s"]
        result["overhead_ratio_ours_over_trl"] = o["cycle_overhead_s"] / t["cycle_overhead_s"]
        print(f"TRL: {t['median_step_s']:.3f} s/step, ours {o['median_step_s']:.3f} s/step "
              f"-> {result['speedup_step_time']:.2f}x (tuned {result['speedup_step_time_tuned']:.2f}x); cycle overhead ours {o['cycle_overhead_s'] * 1e3:.1f} ms "
              f"vs TRL {t['cycle_overhead_s'] * 1e3:.1f} ms", flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
