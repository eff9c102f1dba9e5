"""The optimizer step alone on a size's whole parameter set: where torchao's per-tensor step spends its time.

    PYTHONPATH=src python benchmarks/optimizer_step.py --size qwen3-8b --out optimizer_step_qwen3-8b.json
    PYTHONPATH=src python benchmarks/optimizer_step.py --size tiny --out /tmp/opt.json     # CPU: the code path

torchao's AdamW8bit (bf16 stochastic rounding, as ``train.optimizer=adamw8bit train.stochastic_rounding=true``
builds it) steps one tensor at a time through ``torch.compile(single_param_adam, ...)(...)``: a new compile
wrapper at every call, whose graphs are cached but whose wrapper is built each time on the CPU. Arms, each on
the same bf16 parameters and random gradients (``--steps`` timed steps after 2 warm-up ones, CUDA synchronized,
median): ``torchao`` (torchao's AdamW8bit as it is), ``torchao_wrapper_once`` (the same function, its compile
wrapper built once and reused: what the per-call wrapper costs), ``fused`` (what ``build_optimizer`` builds: the
same optimizer stepped by one Triton kernel per tensor, ``run.fused_adamw8bit``), ``per_tensor``
(``run.per_tensor.PerTensorOptimizer`` over it, state on the device: the lean arm's step), ``torch_fused`` (PyTorch's fused AdamW with float32 state, where it fits). The
floor: a device-to-device copy of the bytes the 8-bit step must move (parameters, gradients and both moments
read, parameters and moments written: ~10 bytes per parameter, a copy of 5), timed on 1 GiB and scaled. The JSON also has the step's
CPU time (the host's clock around an unsynchronized step, the GPU queue drained before).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time

import torch

from rollout_sleep.run.optim import _second_moments_without_zero, build_optimizer
from rollout_sleep.run.per_tensor import PerTensorOptimizer
from rollout_sleep.weights.checkpoints import SHAPES

from common import d2d_floor, device_name, gib, versions, write_json


def shapes(size: str) -> list[tuple[int, ...]]:
    """The parameter shapes of a dense Qwen3 of ``size`` (an untied head where the shape has one)."""
    s = SHAPES[size]
    h, inter = s.hidden_size, s.intermediate_size
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    vocab = s.vocab_size or 1024
    layer = [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter), (h,), (h,), (s.head_dim,),
             (s.head_dim,)]
    out = [(vocab, h)] + layer * s.num_hidden_layers + [(h,)]
    return out if s.tie_word_embeddings else out + [(vocab, h)]


@contextlib.contextmanager
def wrapper_built_once():
    """``torch.compile(fn, **kw)`` returning one wrapper per ``(fn, kw)``: the graphs are the same, only the
    wrapper's construction is skipped (measured here, not a library path)."""
    real, made = torch.compile, {}

    def once(fn=None, **kw):
        key = (fn, tuple(sorted(kw.items())))
        if key not in made:
            made[key] = real(fn, **kw)
        return made[key]

    torch.compile = once
    try:
        yield
    finally:
        torch.compile = real


def timed(step, n: int, cuda: bool) -> dict:
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warm, times, cpu = [], [], []
    for i in range(2 + n):
        sync()
        t0 = time.perf_counter()
        step()
        t_cpu = time.perf_counter() - t0
        sync()
        (warm if i < 2 else times).append(time.perf_counter() - t0)
        if i >= 2:
            cpu.append(t_cpu)
    return {"median_s": statistics.median(times), "times_s": times, "warmup_s": warm,
            "cpu_median_s": statistics.median(cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="qwen3-8b", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--arms", default="torchao,torchao_wrapper_once,fused,per_tensor,torch_fused")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=dev, dtype=torch.bfloat16, generator=gen) * 0.02)
              for s in shapes(args.size)]
    grads = [torch.randn(p.shape, device=dev, dtype=torch.bfloat16, generator=gen) * 1e-3 for p in params]
    numel = sum(p.numel() for p in params)
    result = {"size": args.size, "device": device_name(), "versions": versions("torch", "torchao"),
              "tensors": len(params), "params": numel, "arms": {}}

    def arm(name, make, context=contextlib.nullcontext):
        try:
            opt = make()

            def step():
                for p, g in zip(params, grads):
                    p.grad = g
                with context():
                    opt.step()
            result["arms"][name] = timed(step, args.steps, cuda)
            if cuda:
                result["arms"][name]["peak_allocated_gib"] = gib(torch.cuda.max_memory_allocated())
        except Exception as e:  # recorded, the other arms go on
            result["arms"][name] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            opt = None
            for p in params:
                p.grad = None
            gc.collect()  # the optimizer's wrapped step refers back to it: freed by the cycle collector only
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        write_json(args.out, result)

    def ao():
        import torchao.optim

        opt = torchao.optim.AdamW8bit(params, lr=1e-6, weight_decay=0.0, bf16_stochastic_round=True)
        _second_moments_without_zero(opt)  # the same optimizer as ours but for the step's code
        return opt

    def ours():
        return build_optimizer("adamw8bit", params, lr=1e-6, weight_decay=0.0, stochastic_rounding=True)

    arms = args.arms.split(",")
    if "torchao" in arms:
        arm("torchao", ao)
    if "torchao_wrapper_once" in arms:
        arm("torchao_wrapper_once", ao, wrapper_built_once)
    if "fused" in arms:
        arm("fused", ours)
    if "per_tensor" in arms:
        arm("per_tensor", lambda: PerTensorOptimizer(ours()))
    if "torch_fused" in arms and (not cuda or torch.cuda.mem_get_info()[0] > 10 * numel):
        arm("torch_fused", lambda: build_optimizer("adamw", params, lr=1e-6, weight_decay=0.0, fused=True))
    if cuda:  # last, with the arms' memory given back: a 1 GiB copy, scaled to the step's bytes
        floor = d2d_floor(1 << 30)
        scale = 5 * numel / (1 << 30)
        result["floor"] = {"bytes": 5 * numel, "median_s": statistics.median(floor) * scale,
                           "copy_1gib_times_s": floor, "how": "one 1 GiB device copy, times bytes / 1 GiB"}
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
