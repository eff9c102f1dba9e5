"""Are differences between two engines' outputs from their weights or from the run? Scores the same
token sequences (teacher-forced log-probs) with engines started in separate processes:
fresh from a checkpoint (twice), and started from another checkpoint then synced to the first one.

    python benchmarks/compare_engines.py --target DIR --start DIR --sequences FILE.json --out OUT.json
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import write_json



def child(start: str, target: str | None, sequences: str, util: float) -> None:
    import torch
    from safetensors.torch import load_file

    from rollout_sleep.engine.engine import Engine

    kw = {"gpu_memory_utilization": util} if torch.cuda.is_available() else {}
    eng = Engine(start, dtype="bfloat16" if torch.cuda.is_available() else "float32", seed=0,
                 max_model_len=1024, **kw)
    if target:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        weights = {}
        for f in sorted(Path(target).glob("*.safetensors")):
            weights.update(load_file(str(f), device=dev))
        eng.sleep(level=2)
        eng.wake_up(weights=weights)
    eng.reset_prefix_cache()
    seqs = json.loads(Path(sequences).read_text())
    print("SCORES " + json.dumps(eng.score(seqs)), flush=True)
    os._exit(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--start", required=True)
    ap.add_argument("--sequences", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--util", type=float, default=0.4)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], args.child[1] or None, args.sequences, args.util)
    if not Path(args.sequences).exists():
        import random

        rng = random.Random(0)
        Path(args.sequences).write_text(json.dumps([[rng.randint(10, 250) for _ in range(56)] for _ in range(8)]))
    runs = {"fresh_1": (args.target, ""), "fresh_2": (args.target, ""), "synced": (args.start, args.target)}
    scores = {}
    for name, (start, target) in runs.items():
        p = subprocess.run([sys.executable, __file__, "--target", args.target, "--start", args.start,
                            "--sequences", args.sequences, "--out", args.out, "--util", str(args.util),
                            "--child", start, target], capture_output=True, text=True, timeout=900)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("SCORES ")]
        if not line:
            print(p.stderr[-3000:])
            raise SystemExit(f"{name} failed")
        scores[name] = json.loads(line[-1][7:])

    def diff(a, b):
        d = [abs(x - y) for u, v in zip(scores[a], scores[b]) for x, y in zip(u, v)]
        return {"max": max(d), "mean": sum(d) / len(d)}

    out = {"fresh_1_vs_fresh_2": diff("fresh_1", "fresh_2"), "fresh_1_vs_synced": diff("fresh_1", "synced"),
           "fresh_2_vs_synced": diff("fresh_2", "synced")}
    print(json.dumps(out, indent=1))
    write_json(args.out, out)


if __name__ == "__main__":
    main()
