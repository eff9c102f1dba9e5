"""What handing PyTorch's cached blocks back to the driver costs (``torch.cuda.empty_cache``), measured without
vLLM: the trainer's freed gradients of a model shape, with and without expandable segments, and what allocating
them again costs afterwards. The one-copy cycle returns this cache before each wake
(``engine.keep_trainer_cache=false``); this says whether its time goes with the bytes or with the number of
segments the allocator maps.

    python benchmarks/cache_release_probe.py --size qwen3-8b --out results/h100/one_copy/cache_release_probe.json

Each mode runs in its own process (the allocator's settings are read once). Median of ``--repeats`` after one
warm-up; the GPU is synchronized before each timer starts and stops.
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

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, head_dim, vocab, tied
    "qwen3-0.6b": (1024, 3072, 28, 16, 8, 128, 151936, True),
    "qwen3-4b": (2560, 9728, 36, 32, 8, 128, 151936, True),
    "qwen3-8b": (4096, 12288, 36, 32, 8, 128, 151936, False),
    "qwen3-14b": (5120, 17408, 40, 40, 8, 128, 151936, False),
}
MODES = {"plain": "expandable_segments:False", "expandable": "expandable_segments:True"}


def grad_shapes(size: str) -> list[tuple[int, ...]]:
    """The trainer's gradient tensors of a Qwen3 shape (q/k/v and gate/up apart, as the one-copy trainer has them)."""
    h, inter, layers, heads, kv, hd, vocab, tied = SHAPES[size]
    per_layer = [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd), (inter, h), (inter, h), (h, inter),
                 (h,), (h,), (hd,), (hd,)]
    return [(vocab, h)] + per_layer * layers + [(h,)] + ([] if tied else [(vocab, h)])


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def run_mode(size: str, repeats: int, flat: bool) -> dict:
    """In this process (its allocator settings come from the environment): allocate the gradients, free them,
    time the release, then time allocating them again into the emptied cache and into a full one."""
    shapes = grad_shapes(size)
    numel = sum(torch.Size(s).numel() for s in shapes)
    release, alloc_cold, alloc_warm, segments = [], [], [], []
    for i in range(repeats + 1):
        if flat:
            grads = [torch.empty(numel, dtype=torch.bfloat16, device="cuda")]
        else:
            grads = [torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in shapes]
        segments.append(len(torch.cuda.memory_snapshot()))
        del grads
        t_release = _timed(torch.cuda.empty_cache)
        box = []
        t_cold = _timed(lambda: box.extend(torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in shapes))
        box.clear()
        t_warm = _timed(lambda: box.extend(torch.empty(s, dtype=torch.bfloat16, device="cuda") for s in shapes))
        box.clear()
        torch.cuda.empty_cache()
        if i:  # the first is the warm-up
            release.append(t_release)
            alloc_cold.append(t_cold)
            alloc_warm.append(t_warm)
    return {"tensors": len(shapes), "gib": numel * 2 / 2**30, "segments_mapped": segments[1:],
            "release_s": release, "release_median_ms": 1e3 * statistics.median(release),
            "alloc_after_release_s": alloc_cold, "alloc_after_release_median_ms": 1e3 * statistics.median(alloc_cold),
            "alloc_from_cache_median_ms": 1e3 * statistics.median(alloc_warm)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="qwen3-8b", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="cache_release_probe.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, flat = args.child.split(":")
        print(json.dumps(run_mode(args.size, args.repeats, flat == "flat")))
        return
    result = {"size": args.size, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "driver_free_gib": torch.cuda.mem_get_info()[0] / 2**30, "modes": {}}
    for mode, conf in MODES.items():
        for layout in ("per_tensor", "flat"):
            env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=conf, PYTORCH_ALLOC_CONF=conf)
            out = subprocess.run([sys.executable, __file__, "--size", args.size, "--repeats", str(args.repeats),
                                  "--child", f"{mode}:{'flat' if layout == 'flat' else 'each'}"],
                                 env=env, capture_output=True, text=True)
            key = f"{mode}_{layout}"
            result["modes"][key] = (json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0
                                    else {"error": out.stderr[-2000:]})
            print(key, {k: v for k, v in result["modes"][key].items() if "median" in k or k == "error"}, flush=True)
            Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
