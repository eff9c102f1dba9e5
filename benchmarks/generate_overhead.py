"""Where a rollout's generate time goes: vLLM in this process vs in its own engine process.

    python benchmarks/generate_overhead.py --size qwen3-4b --out results/h100/generate_overhead_qwen3-4b.json

One process per mode (one vLLM engine per process): ``inproc`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, how
the engine runs so that weights can be pushed in memory), ``inproc_sync`` (the same with vLLM's
``async_scheduling`` off: what its scheduling overlap gives) and ``mp`` (vLLM's default: the engine core in its
own process, overlapping its scheduling with this process's output handling). Each records the
``async_scheduling`` the engine resolved. The recipe's rollout work:
16 prompts x 8 completions, 128 tokens, temperature 1, sampled-token log-probs, no detokenization.
Warm-up, then ``--repeats`` timed calls, median. ``inproc`` also times ``Engine.generate`` (our wrapper:
Completion objects and one batched decode) and writes the top functions of a cProfile of one call.
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

from common import device_name, versions, write_json


def child(size: str, mode: str, workdir: Path, repeats: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if mode == "mp" else "0"
    extra = {"async_scheduling": False} if mode == "inproc_sync" else {}
    import cProfile
    import io
    import pstats

    import torch
    from vllm import LLM, SamplingParams

    from rollout_sleep.weights.checkpoints import make_checkpoint
    from rollout_sleep.grpo.data import synthetic_arithmetic
    from rollout_sleep.engine.completion import fast_output_kwargs
    from rollout_sleep.engine.engine import Engine

    path = workdir / "model"
    if not (path / "config.json").exists():
        make_checkpoint(path, size, seed=0, dtype="bfloat16")
    t0 = time.perf_counter()
    llm = LLM(model=str(path), dtype="bfloat16", seed=0, max_model_len=1024, gpu_memory_utilization=0.3,
              enable_sleep_mode=True, **extra)
    init_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    prompts = [{"prompt_token_ids": tok(r["prompt"]).input_ids} for r in synthetic_arithmetic(16, seed=0)]
    params = SamplingParams(**fast_output_kwargs(dict(n=8, max_tokens=128, temperature=1.0, logprobs=0)))

    def run():
        torch.cuda.synchronize()
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t, sum(len(c.token_ids) for o in outs for c in o.outputs)

    run()
    raw = [run() for _ in range(repeats)]
    res = {"mode": mode, "init_s": init_s, "generate_s": [r[0] for r in raw],
           "async_scheduling": getattr(getattr(getattr(llm.llm_engine, "vllm_config", None), "scheduler_config", None),
                                       "async_scheduling", "unknown"),
           "median_generate_s": statistics.median(r[0] for r in raw), "tokens": raw[0][1]}
    if mode == "inproc":
        eng = Engine.attach(llm, str(path))
        times = []
        for _ in range(repeats):
            torch.cuda.synchronize()
            t = time.perf_counter()
            eng.generate([p["prompt_token_ids"] for p in prompts], n=8, max_tokens=128, temperature=1.0)
            times.append(time.perf_counter() - t)
        res["engine_generate_s"] = times
        res["median_engine_generate_s"] = statistics.median(times)
        prof = cProfile.Profile()
        prof.enable()
        llm.generate(prompts, params, use_tqdm=False)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
        res["profile_tottime_top30"] = buf.getvalue()[-12000:]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="qwen3-4b")
    ap.add_argument("--modes", default="inproc,mp")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--workdir", default="/tmp/rs-generate-overhead")
    ap.add_argument("--child", choices=["inproc", "inproc_sync", "mp"])
    ap.add_argument("--out")
    args = ap.parse_args()
    work = Path(args.workdir) / args.size
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        print("RESULT " + json.dumps(child(args.size, args.child, work, args.repeats)), flush=True)
        os._exit(0)
    result = {"size": args.size, "device": device_name(), "versions": versions("vllm", "torch"),
              "work": "16 prompts x 8 completions, 128 tokens, temperature 1, log-probs, no detokenization",
              "modes": {}}
    for mode in args.modes.split(","):
        proc = subprocess.run([sys.executable, __file__, "--size", args.size, "--child", mode, "--workdir",
                               args.workdir, "--repeats", str(args.repeats)], capture_output=True, text=True,
                              timeout=900)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        result["modes"][mode] = json.loads(line[-1][7:]) if line else {"error": proc.stderr[-4000:]}
        r = result["modes"][mode]
        print(mode, {k: v for k, v in r.items() if k.startswith("median") or k in ("init_s", "error")}, flush=True)
        if args.out:
            write_json(args.out, result)


if __name__ == "__main__":
    main()
