"""One tensor-parallel engine across the ranks of a torchrun job (vLLM's external_launcher), colocated with
each rank's trainer copy: level-2 cycles with per-GPU free memory, verify on every rank, and the tokens
compared with a TP=1 engine holding the same weights (started afterwards, in its own process).

    torchrun --nproc_per_node 2 benchmarks/tp_cycle.py --size qwen3-4b --out results/h100x2/tp2_qwen3-4b.json

Needs one GPU per rank. On CPU (gloo) the same flow runs in tests/engine/test_tensor_parallel.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import gib, write_json

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

PROMPTS = [[(7 * i + 3 * j) % 250 + 1 for j in range(16)] for i in range(8)]


def tp1_tokens(path: str, out: str) -> None:
    """Child process: a TP=1 engine from the trainer's saved weights; writes its greedy tokens."""
    from rollout_sleep.engine.engine import Engine

    eng = Engine(path, dtype="bfloat16", seed=0, gpu_memory_utilization=0.4)
    toks = [c.token_ids for c in eng.generate(PROMPTS, max_tokens=32, min_tokens=32, temperature=0.0)]
    Path(out).write_text(json.dumps(toks))
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="qwen3-4b")
    ap.add_argument("--cycles", type=int, default=5)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/rs-tp-cycle")
    ap.add_argument("--tp1-child", nargs=2)
    args = ap.parse_args()
    if args.tp1_child:
        return tp1_tokens(*args.tp1_child)

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from rollout_sleep.weights.checkpoints import make_checkpoint
    from rollout_sleep.engine.engine import Engine
    from rollout_sleep.weights.stream import WeightStream
    from rollout_sleep.weights.verify import verify

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    work = Path(args.workdir)
    if rank == 0:
        for seed in (0, 1):
            make_checkpoint(work / f"seed{seed}", args.size, seed=seed, dtype="bfloat16")
    dist.barrier()
    free0 = gib(torch.cuda.mem_get_info()[0])
    engine = Engine(str(work / "seed0"), dtype="bfloat16", seed=0, tensor_parallel_size=world,
                    gpu_memory_utilization=0.4)
    model = AutoModelForCausalLM.from_pretrained(work / "seed1", dtype=torch.bfloat16).cuda()  # the trainer
    stream = WeightStream(model, dtype=engine.dtype)
    rows = []
    for _ in range(args.cycles + 1):  # the first is a warm-up
        s = engine.sleep(level=2)
        w = engine.wake_up(weights=stream)
        v = verify(engine, stream)
        rows.append({**s.as_dict("sleep_"), **w.as_dict("wake_"), "verify_ok": v.ok, "verify_s": v.seconds,
                     "verify_compared": v.compared})
    engine.reset_prefix_cache()
    tokens = [c.token_ids for c in engine.generate(PROMPTS, max_tokens=32, min_tokens=32, temperature=0.0)]
    per_rank = {"rank": rank, "device": torch.cuda.get_device_name(), "free_before_engine_gib": free0,
                "rows": rows, "verify_all_ok": all(r["verify_ok"] for r in rows),
                "medians_s": {k: statistics.median(r[k] for r in rows[1:]) for k in rows[0] if k.endswith("_s")}}
    gathered = [None] * world
    dist.all_gather_object(gathered, per_rank)
    if rank == 0:
        result = {"size": args.size, "tensor_parallel_size": world, "ranks": gathered, "tp_tokens": tokens,
                  "tp1_note": "TP=1 engine in a child process on GPU 0, from the trainer's checkpoint (seed1)"}
        write_json(args.out, result)
    dist.barrier()
    if rank == 0:  # a second engine in this process is not possible: the TP=1 one runs in a child
        proc = subprocess.run([sys.executable, __file__, "--out", args.out, "--tp1-child", str(work / "seed1"),
                               str(work / "tp1_tokens.json")], capture_output=True, text=True, timeout=900)
        data = json.loads(Path(args.out).read_text())
        if (work / "tp1_tokens.json").exists():
            tp1 = json.loads((work / "tp1_tokens.json").read_text())
            data["tp1_tokens"] = tp1
            data["prompts_identical"] = sum(a == b for a, b in zip(tokens, tp1))
        else:
            data["tp1_error"] = proc.stderr[-3000:]
        write_json(args.out, data)
        print(json.dumps({k: v for k, v in data.items() if k not in ("ranks", "tp_tokens", "tp1_tokens")}), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
