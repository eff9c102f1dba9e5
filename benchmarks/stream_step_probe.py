"""The optimizer step's GPU memory, measured without vLLM: what torchao's step holds per element of the tensor it
steps (the memory plan's ``optimizer_step_bytes``), and the streamed step's peak (``train.offload_optimizer=stream``,
smallest tensor first) against the plan's tensor-by-tensor walk, with the state's copies overlapping the step (the
default) and serially, and the time each takes (``overlap_gain``: the speedup, the serial step's copies and compute,
the largest of the three that overlap can reach).

    python benchmarks/stream_step_probe.py --out results/h100/one_copy/stream_step_probe.json

Tensors of the Qwen3-14B shape's largest kinds (the 151,936 x 5,120 embedding and head, MLP and attention weights,
norms), bf16 with random gradients; torchao's AdamW4bit / AdamW8bit with bf16 stochastic rounding. Each figure is
the allocator's peak above what is allocated when the step begins, on the step after the first (the first builds
the state and compiles). Needs CUDA and torchao; writes the JSON after each part.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rollout_sleep.run.memory_plan import per_tensor_step_peak  # noqa: E402
from rollout_sleep.run.per_tensor import PerTensorOptimizer  # noqa: E402
from rollout_sleep.run.optim import build_optimizer, optimizer_step_bytes  # noqa: E402

GIB = 2**30
EMBED = (151936, 5120)
SHAPES = [EMBED, EMBED, (17408, 5120), (5120, 17408), (5120, 5120), (1024, 5120), (5120,)]
DEVICE = "cuda"


def _params(shapes) -> list[torch.nn.Parameter]:
    out = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, device=DEVICE, dtype=torch.bfloat16) * 0.02)
        p.grad = torch.randn_like(p) * 1e-3
        out.append(p)
    return out


def _peak_step(opt, params, grads) -> tuple[int, float]:
    """(allocator peak above the step's start, seconds) of one step with ``grads`` given back."""
    for p, g in zip(params, grads):
        p.grad = g.clone()
    if DEVICE != "cuda":  # the CPU check of the code path: no allocator figures
        t0 = time.perf_counter()
        opt.step()
        return 0, time.perf_counter() - t0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    opt.step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start, time.perf_counter() - t0


def step_bytes_per_element(kind: str) -> dict:
    """One embedding-sized tensor, its state on the GPU: the step's buffers per element."""
    (p,) = _params([EMBED])
    grad = p.grad.clone()
    opt = build_optimizer(kind, [p], lr=1e-6, weight_decay=0.0, stochastic_rounding=True)
    _peak_step(opt, [p], [grad])  # the state is built, the step compiled
    peak, seconds = _peak_step(opt, [p], [grad])
    del opt, p, grad
    return {"numel": EMBED[0] * EMBED[1], "measured_bytes_per_element": peak / (EMBED[0] * EMBED[1]),
            "plan_bytes_per_element": optimizer_step_bytes(kind, [EMBED[0] * EMBED[1]], True) / (EMBED[0] * EMBED[1]),
            "step_s": seconds}


def streamed(kind: str, overlap: bool = True, repeat: int = 3) -> dict:
    """The shapes above streamed, smallest first: the peak above the gradients' and weights' bytes, against the
    plan's walk (gradients still held + the state on the device + that tensor's step buffers, at its largest), and
    the step's time, the median of ``repeat`` steps after the first. ``overlap``: the copies on their own streams,
    overlapping the step (the default); else on the compute stream, in order with it (the serial step)."""
    params = _params(SHAPES)
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    opt = PerTensorOptimizer(build_optimizer(kind, params, lr=1e-6, weight_decay=0.0, stochastic_rounding=True),
                             state_in="host", overlap=overlap)
    _peak_step(opt, params, grads)
    opt.pop_timings()  # the first step's (it built the state and compiled): not the measured ones'
    runs = [_peak_step(opt, params, grads) for _ in range(repeat)]
    numels = [p.numel() for p in params]
    plan = sum(per_tensor_step_peak(kind, numels, 2, stochastic_rounding=True, state_in="host", overlap=overlap))
    grads_bytes = sum(numels) * 2  # given back before the step: counted in both
    # per step: the seconds summed over the measured steps, divided; the GiB moved is a per-step figure already
    timings = {k: v if k.endswith("_gib") else v / repeat for k, v in opt.pop_timings().items()}
    return {"shapes": SHAPES, "overlap": overlap, "measured_peak_gib": (max(r[0] for r in runs) + grads_bytes) / GIB,
            "plan_peak_gib": plan / GIB, "all_gradients_gib": grads_bytes / GIB,
            "state_on_device_gib": opt.step_state_bytes / GIB, "step_s": statistics.median(r[1] for r in runs),
            "steps_s": [r[1] for r in runs], **timings}


def overlap_gain(result: dict) -> dict:
    """The overlapped streamed step against the serial one (both parts above): the wall time each, the speedup,
    the serial step's copies (nothing hidden there) and what is left of its time for the compute, and the lower
    bound overlap can reach (the largest of compute, copies in, copies back)."""
    on, off = result.get("streamed_adamw4bit", {}), result.get("streamed_adamw4bit_serial", {})
    if "step_s" not in on or "step_s" not in off:
        return {"error": "a streamed part did not run"}
    out = {"overlapped_step_s": on["step_s"], "serial_step_s": off["step_s"],
           "speedup": off["step_s"] / on["step_s"] if on["step_s"] else None,
           "peak_gib_overlapped_minus_serial": on["measured_peak_gib"] - off["measured_peak_gib"],
           "plan_gib_overlapped_minus_serial": on["plan_peak_gib"] - off["plan_peak_gib"]}
    if "optimizer_reload_s" in off:  # CUDA: the copies' own times (events on their streams)
        compute = off["step_s"] - off["optimizer_reload_s"] - off["optimizer_offload_s"]
        out.update(serial_copies_s=off["optimizer_reload_s"] + off["optimizer_offload_s"], serial_compute_s=compute,
                   bound_s=max(compute, on["optimizer_reload_s"], on["optimizer_offload_s"]),
                   overlapped_copy_wait_s=on["optimizer_copy_wait_s"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true", help="CPU, shapes divided by 64: the code path only")
    args = ap.parse_args()
    import torchao

    global DEVICE, EMBED, SHAPES
    if args.quick:
        DEVICE = "cpu"
        EMBED = (EMBED[0] // 64, EMBED[1] // 64)
        SHAPES = [tuple(d // 64 for d in s) for s in SHAPES]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "torchao": torchao.__version__}
    for part, fn in [("step_bytes_adamw4bit", lambda: step_bytes_per_element("adamw4bit")),
                     ("step_bytes_adamw8bit", lambda: step_bytes_per_element("adamw8bit")),
                     ("streamed_adamw4bit", lambda: streamed("adamw4bit")),
                     ("streamed_adamw4bit_serial", lambda: streamed("adamw4bit", overlap=False)),
                     ("overlap_gain", lambda: overlap_gain(result))]:
        try:
            result[part] = fn()
        except Exception as err:  # noqa: BLE001  (recorded; the other parts still run)
            result[part] = {"error": f"{type(err).__name__}: {err}"}
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        out.write_text(json.dumps(result, indent=1))
        print(part, json.dumps(result[part]), flush=True)


if __name__ == "__main__":
    main()
