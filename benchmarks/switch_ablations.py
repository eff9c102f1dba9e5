"""The sleep-mode article's two ablations with ``benchmarks/switch_bench.py``, beside its A100 figures.

    python benchmarks/switch_ablations.py --out results/h100/switch_bench/ablations
    python benchmarks/switch_ablations.py --out /tmp/abl --quick      # CPU: tiny models, FP8 refused

On the H100 (one device call, ~8 min: two checkpoints ~0.7 min, then per arm two server starts: ~3 min
each for the first two arms, which compile their graphs, ~2 min for the last):

    timeout -k 30 560 python benchmarks/switch_ablations.py --out $OUT --arm-timeout 230

A later call can add a missing arm (``--arms fp8_warmup``) to an ``ablations.json`` copied back into ``--out``.

Arms (the article's: sleep level 1, 5 switches, A = the smaller model), each a ``switch-bench`` run in
its own process with two freshly started servers: ``bf16_warmup`` (a one-token request to each server
right after it starts), ``fp8_warmup`` (``--quantization fp8``: vLLM's online FP8 of the bf16
checkpoints), ``bf16_no_warmup``. The checkpoints, server logs and each arm's own output stay under ``--workdir``;
``--out`` gets three files, rewritten as each arm finishes: ``ablations.json`` (every arm's figures and
raw switch-bench result, and the article's figures), ``ablations.md`` (the side-by-side tables) and
``ablations.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import switch_bench as sb
from common import run_bounded, write_json

# in this order: the bf16 no-warm-up arm last, its models' compiled graphs then cached by the first arm
ARMS = {"bf16_warmup": ("on", "none"), "fp8_warmup": ("on", "fp8"), "bf16_no_warmup": ("off", "none")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs=2, default=["qwen3-0.6b", "qwen3-4b"])
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--switches", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--arm-timeout", type=int, default=400)
    ap.add_argument("--workdir", default="/tmp/rs-switch-ablations")
    ap.add_argument("--quick", action="store_true", help="tiny models, 1 switch (the CPU check)")
    args = ap.parse_args()
    if args.quick:
        args.models, args.switches, args.max_tokens = ["tiny", "tiny"], 2, 8
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir)
    models = sb.prepare_models(args.models, work)  # built once, shared by the arms
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # drawn on the GPU: give the cached blocks back before the servers start
    path = out / "ablations.json"
    prev = json.loads(path.read_text()) if path.exists() else {}
    result = prev if prev.get("models") == models else {"models": models}
    result["model_shapes"] = args.models
    result.update({"article": sb.ARTICLE_A100, "switches": args.switches, "max_tokens": args.max_tokens})
    result.setdefault("arms", {})
    for arm in args.arms.split(","):
        warmup, quant = ARMS[arm]
        arm_out = work / arm
        cmd = [sys.executable, str(Path(__file__).with_name("switch_bench.py")), "--models", *models,
               "--modes", "level1",
               "--switches", str(args.switches), "--max-tokens", str(args.max_tokens), "--warmup", warmup,
               "--quantization", quant, "--out", str(arm_out)]
        t0 = time.perf_counter()
        rc, _, err, _ = run_bounded(cmd, args.arm_timeout, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
        entry: dict = {"command": cmd[1:], "wall_s": time.perf_counter() - t0}
        raw = arm_out / "switch_bench.json"
        if rc == 0 and raw.exists():
            run = json.loads(raw.read_text())
            entry.update({"device": run["device"], "versions": run["versions"], "startup_s": run["startup_s"],
                          "warmup_s": run["warmup_s"], "raw": run})
            try:
                entry["figures"] = sb.ablation_figures(run)
            except Exception as e:  # the raw JSON stays; the figures can be recomputed from it
                entry["error"], entry["refused"] = f"figures: {type(e).__name__}: {e}", False
        else:
            entry["error"] = f"exit {rc}: {err[-3000:]}"
            entry["refused"] = "is not available here" in err
        result["arms"][arm] = entry
        table = write_tables(result, out)
        print(arm, json.dumps(entry.get("figures")) if "figures" in entry else
              ("refused: " if entry["refused"] else "ERROR: ") + entry["error"][-500:], flush=True)
    print(table, flush=True)


def write_tables(result: dict, out: Path) -> str:
    """ablations.md and .png from the arms done so far, and ablations.json (with the chart's status)."""
    figures = {a: e["figures"] for a, e in result["arms"].items() if "figures" in e}
    table = sb.ablation_markdown(figures)
    (out / "ablations.md").write_text(table + "\n")
    device = next((e["device"] for e in result["arms"].values() if "device" in e), "ours")
    result["chart"] = sb.ablation_chart(figures, out / "ablations.png", device)
    write_json(out / "ablations.json", result)
    return table


if __name__ == "__main__":
    main()
