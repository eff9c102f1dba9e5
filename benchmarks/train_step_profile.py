"""Where the time of one GRPO training step goes (``GRPOLoss.step`` as ``recipes/grpo.py`` calls it), without vLLM.

    PYTHONPATH=src python benchmarks/train_step_profile.py --out results/h100/train_step_profile_qwen3-8b.json

The recipe's train phase on the Qwen3-8B shape (random bf16 weights built on the GPU, ``random_model``), gradient
checkpointing, accelerate (one process, ``mixed_precision=no``), torchao's AdamW8bit with bf16 stochastic rounding
(``train.optimizer=adamw8bit train.stochastic_rounding=true``, lr 1e-6) under the non-finite guard (handed the
clip's norm, as in the recipe), clipping to 1.0; 16 prompts x 8 completions, prompts of 4 random tokens,
completions of 128, random rewards, micro-batches of 32.
Parts, the JSON rewritten after each: ``timed`` (2 warm-up steps, then ``--steps`` steps, CUDA synchronized,
median); ``phases`` (one step whose parts are synchronize-bracketed through the step's own hooks: batch prep,
forward + log-probs, loss, backward with recompute, clipping, guard, optimizer step, zero_grad, tail);
``profile`` (torch.profiler over one step: the top ops by CUDA and by CPU time, GPU busy vs wall); ``ablations``
(attention implementations, micro-batch sizes, no checkpointing, the update check's armed step, the optimizer
step alone on a few decoder layers: torchao AdamW8bit / _AdamW with rounding vs PyTorch's fused AdamW, and
AdamW8bit's step with ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: torchao compiles one call per
parameter, each paying dynamo's guard evaluation on the CPU, which the stance cuts to the guards that tell the cached
graphs apart; last, ``compile_regions``: the same step with the decoder layers compiled in place as
``train.compile=true`` does, its warm-up steps covering the compile).
Expect ~5-8 min on one H100 (torchao compiles its step at the first one; the layers' compile) and a peak near 60 GiB.
``--quick``: the tiny shape on the CPU, 1 step per part (no CUDA activity): proves the code path.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import statistics
import time
from collections import defaultdict

import torch

from rollout_sleep.engine.completion import Completion
from rollout_sleep.grpo import loss as grpo
from rollout_sleep.run.nonfinite import check_finite, guard_optimizer
from rollout_sleep.run.optim import build_optimizer
from rollout_sleep.run.update_check import UpdateCheck
from rollout_sleep.weights.checkpoints import SHAPES, qwen3_config, random_model

from common import gib, versions, write_json

PROMPTS, GROUP, PROMPT_LEN, COMPLETION_LEN, LR = 16, 8, 4, 128, 1e-6


class Phases:
    """Wall clock between marks (synchronized when ``sync``), each part also a ``record_function`` range for the
    profiler; installed into the step through its hooks (``backward``, ``clip_grad_norm``, optimizer hooks)."""

    def __init__(self, sync: bool, cuda: bool):
        self.sync, self.cuda, self.t, self.last, self.range = sync, cuda, defaultdict(float), None, None

    def mark(self, part: str | None, opens: str | None = None) -> None:
        """The time since the previous mark goes to ``part``; a profiler range named ``opens`` starts."""
        if self.range is not None:
            self.range.__exit__(None, None, None)
            self.range = None
        if self.sync and self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if part is not None and self.last is not None:
            self.t[part] += now - self.last
        self.last = now
        if opens:
            self.range = torch.profiler.record_function(f"step.{opens}")
            self.range.__enter__()

    @contextlib.contextmanager
    def installed(self, acc, optimizer):
        """The step's hooks timed: ``loss.step`` keywords to pass, undone afterwards."""
        inner, original_lp, zero = getattr(optimizer, "optimizer", optimizer), grpo.completion_logprobs, \
            optimizer.zero_grad

        def logprobs(*a, **k):
            self.mark("prep_and_between_micro_batches", opens="forward_logprobs")
            out = original_lp(*a, **k)
            self.mark("forward_logprobs", opens="loss")
            return out

        def backward(loss):
            self.mark("loss", opens="backward")
            acc.backward(loss)
            self.mark("backward_with_recompute")

        def clip(params, max_norm):
            self.mark("prep_and_between_micro_batches", opens="clip_grad_norm")
            norm = acc.clip_grad_norm_(params, max_norm)
            self.mark("clip_grad_norm")
            return norm

        def zero_grad(*a, **k):
            self.mark("after_optimizer_step", opens="zero_grad")
            zero(*a, **k)
            self.mark("zero_grad")

        # pre-hooks run in registration order: the first goes before the guard (registered at build)
        first = inner.register_step_pre_hook(lambda *_: self.mark("accelerate_step_wrapper", opens="guard"))
        inner._optimizer_step_pre_hooks.move_to_end(first.id, last=False)
        handles = [first, inner.register_step_pre_hook(lambda *_: self.mark("nonfinite_guard", opens="optimizer_step")),
                   inner.register_step_post_hook(lambda *_: self.mark("optimizer_step"))]
        grpo.completion_logprobs, optimizer.zero_grad = logprobs, zero_grad
        try:
            self.mark(None, opens="prep")
            yield {"backward": backward, "clip_grad_norm": clip}
            self.mark("tail_stats_sync")
        finally:
            grpo.completion_logprobs, optimizer.zero_grad = original_lp, zero
            for h in handles:
                h.remove()


def build(args, cuda: bool):
    """The recipe's trainer: random weights on the device, checkpointing, accelerate, the optimizer, the guard."""
    from accelerate import Accelerator

    dev = "cuda" if cuda else "cpu"
    acc = Accelerator(mixed_precision="no", cpu=not cuda)
    model = random_model(qwen3_config(args.size), device=dev, dtype=torch.bfloat16, seed=0)
    model.gradient_checkpointing_enable()
    opt = build_optimizer("adamw8bit", [p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0,
                          fused=cuda or None, model=model, stochastic_rounding=True)
    model, opt = acc.prepare(model, opt)
    opt.guard = guard_optimizer(opt, model)  # one_step hands it the clip's norm, as the recipe does
    return acc, model, opt


def rollout(vocab: int):
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(PROMPTS)]
    comps = [Completion(i // GROUP, prompts[i // GROUP], torch.randint(10, vocab, (COMPLETION_LEN,), generator=g)
                        .tolist(), (-torch.rand(COMPLETION_LEN, generator=g)).tolist(), "", "length")
             for i in range(PROMPTS * GROUP)]
    return prompts, comps, torch.rand(PROMPTS * GROUP, generator=g)


def one_step(loss, acc, model, opt, batch, **hooks) -> dict:
    """What the recipe runs for a step's training (its ``loss.step`` call and the finite check after it)."""
    kw = {"backward": acc.backward, **hooks,
          "clip_grad_norm": opt.guard.clipping(hooks.get("clip_grad_norm", acc.clip_grad_norm_))}
    stats = loss.step(model, opt, *batch, autocast=acc.autocast, no_sync=lambda: acc.no_sync(model), **kw)
    check_finite("loss and grad_norm", torch.tensor([stats["loss"], stats["grad_norm"]]))
    return stats


def timed(fn, warmup: int, steps: int, cuda: bool) -> dict:
    """``fn`` run ``warmup`` + ``steps`` times, each CUDA synchronized; the median of the last ``steps``."""
    times, sync = [], torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    out = {"median_s": statistics.median(times[warmup:]), "times_s": times[warmup:], "warmup_s": times[:warmup]}
    return {**out, "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None}


def op_rows(prof, key: str, top: int) -> list[dict]:
    def dev(e, name):
        return getattr(e, f"{name}device_time_total", None) or getattr(e, f"{name}cuda_time_total", 0) or 0

    rows = [{"name": e.key, "count": e.count, "cuda_time_total_ms": dev(e, "") / 1e3,
             "self_cuda_time_total_ms": dev(e, "self_") / 1e3, "cpu_time_total_ms": e.cpu_time_total / 1e3,
             "self_cpu_time_total_ms": e.self_cpu_time_total / 1e3} for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[key])[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="qwen3-8b", choices=sorted(SHAPES))
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shape on the CPU, one step per part")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.quick
    if args.quick:
        args.size, args.steps = "tiny", 1
    warmup, short = (0, 1) if args.quick else (2, 3)
    result = {"size": args.size, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "versions": versions("torch", "transformers", "torchao", "accelerate"),
              "shape": {"prompts": PROMPTS, "group": GROUP, "prompt_len": PROMPT_LEN, "completion_len": COMPLETION_LEN,
                        "micro_batch": args.micro_batch, "lr": LR, "optimizer": "torchao AdamW8bit, bf16 stochastic "
                        "rounding", "gradient_checkpointing": True, "quick": args.quick}}
    save = lambda: write_json(args.out, result)  # noqa: E731
    t0 = time.perf_counter()
    acc, model, opt = build(args, cuda)
    result["build_s"] = time.perf_counter() - t0
    result["params"] = sum(p.numel() for p in model.parameters())
    result["attn_implementation"] = model.config._attn_implementation
    batch = rollout(model.config.vocab_size)
    loss = grpo.GRPOLoss(group_size=GROUP, micro_batch=args.micro_batch, max_completion_length=COMPLETION_LEN)
    step = lambda lo=loss: one_step(lo, acc, model, opt, batch)  # noqa: E731
    result["timed"] = timed(step, warmup, args.steps, cuda)
    print(f"timed: {result['timed']['median_s']:.3f} s/step median", flush=True)
    save()

    phases = Phases(sync=True, cuda=cuda)
    with phases.installed(acc, opt) as hooks:
        one_step(loss, acc, model, opt, batch, **hooks)
    result["phases_s"] = dict(phases.t, total=sum(phases.t.values()))
    print("phases:", {k: round(v, 4) for k, v in result["phases_s"].items()}, flush=True)
    save()

    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ranges = Phases(sync=False, cuda=cuda)  # unsynchronized: only the record_function ranges matter here
    with profile(activities=activities) as prof, ranges.installed(acc, opt) as hooks:
        w0 = time.perf_counter()
        one_step(loss, acc, model, opt, batch, **hooks)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - w0
    events = prof.key_averages()
    busy = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events) / 1e6
    result["profile"] = {"wall_s": wall, "gpu_busy_s": busy if cuda else None,
                         "gpu_idle_fraction": 1 - busy / wall if cuda else None,
                         "top_by_cuda": op_rows(prof, "cuda_time_total_ms", 40),
                         "top_by_cpu": op_rows(prof, "cpu_time_total_ms", 40),
                         "step_ranges": [r for r in op_rows(prof, "cpu_time_total_ms", 10**6)
                                         if r["name"].startswith("step.")]}
    print(f"profile: wall {wall:.3f} s, GPU busy {busy:.3f} s", flush=True)
    save()

    result["ablations"] = ab = {}

    def ablate(name, fn, n=short, w=1):
        try:
            ab[name] = timed(fn, 0 if args.quick else w, n, cuda)
        except torch.OutOfMemoryError as e:
            ab[name] = {"error": f"out of memory: {str(e)[:200]}"}
        if cuda:
            torch.cuda.empty_cache()
        print(f"ablation {name}: {ab[name].get('median_s', ab[name].get('error'))}", flush=True)
        save()

    def skip_guards(o, opt_step):
        """The optimizer step (warmed up: its graphs compiled) under the stance that skips guard evaluation
        (recorded as unavailable where this torch's ``set_stance`` lacks it)."""
        import inspect

        name = "optimizer_only_adamw8bit_sr_skip_guard_eval"
        if "skip_guard_eval_unsafe" not in inspect.signature(torch.compiler.set_stance).parameters:
            ab[name] = {"error": f"torch {torch.__version__}: set_stance has no skip_guard_eval_unsafe"}
            return

        def stepped():  # unsafe in general (a changed input would reuse a wrong graph): measured here only
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                opt_step()
        ablate(name, stepped, n=args.steps, w=0)  # warmed up by the ablation before (same shapes)

    base_attn = model.config._attn_implementation
    for impl in ("sdpa", "flash_attention_2"):
        if impl == base_attn or (impl == "flash_attention_2" and (not cuda or importlib.util.find_spec("flash_attn")
                                                                   is None)):
            continue
        model.set_attn_implementation(impl)
        ablate(f"attn_{impl}", step)
    model.set_attn_implementation(base_attn)
    check = UpdateCheck(opt, every=1)
    ablate("update_check_armed", lambda: (check.arm(1), step(), check.result(1, 1.0, warn=False)))
    check.remove()
    for mb in (16, 64, 128):
        if mb != args.micro_batch:
            ablate(f"micro_batch_{mb}", lambda mb=mb: step(grpo.GRPOLoss(
                group_size=GROUP, micro_batch=mb, max_completion_length=COMPLETION_LEN)))

    # the optimizer step alone over the first decoder layers (full AdamW state for all 8B would not fit)
    layers = 1 if args.quick else 4
    params = [p for layer in model.model.layers[:layers] for p in layer.parameters()]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    result["optimizer_subset"] = {"layers": layers, "params": sum(p.numel() for p in params)}
    for kind, rounding in (("adamw8bit", True), ("adamw", True), ("adamw", False)):
        o = build_optimizer(kind, params, lr=LR, weight_decay=0.0, fused=cuda or None, stochastic_rounding=rounding)

        def opt_step(o=o):
            for p, g in zip(params, grads):
                p.grad = g
            o.step()
        ablate(f"optimizer_only_{kind}{'_sr' if rounding else '_torch_fused'}", opt_step, n=args.steps, w=2)
        if kind == "adamw8bit":
            skip_guards(o, opt_step)
        del o
    for p in params:
        p.grad = None
    grads.clear()
    model.gradient_checkpointing_disable()
    ablate("no_checkpointing_micro_batch_16", lambda: step(grpo.GRPOLoss(
        group_size=GROUP, micro_batch=16, max_completion_length=COMPLETION_LEN)))
    model.gradient_checkpointing_enable()
    # last: the compile stays on the model (train.compile's in-place regional compilation)
    from rollout_sleep.run.compiled import compile_model

    result["compile_regions"] = compile_model(acc.unwrap_model(model))
    ablate("compile_regions", step, n=args.steps, w=2)
    result["total_s"] = time.perf_counter() - t0
    print(f"wrote {save()}")


if __name__ == "__main__":
    main()
