"""``rollout-sleep``: command-line entry points (argument parsing only)."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rollout-sleep", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true",
                        help="show every library's logs and warnings (vLLM's included) and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:  # every subcommand takes --verbose
        return sub.add_parser(name, help=help, parents=[common])

    demo = command("demo", "GRPO on the embedded tiny model (CPU, ~1 minute)")
    demo.add_argument("--steps", type=int, default=12)
    demo.add_argument("--seed", type=int, default=0)
    soak = command("soak", "N checked cycles (verify + stale-prefix probe), memory per cycle")
    soak.add_argument("--cycles", type=int, default=50)
    soak.add_argument("--size", default="tiny")
    soak.add_argument("--warmup", type=int, default=10)
    soak.add_argument("--max-growth-mib", type=float, default=64.0)
    soak.add_argument("--out", help="write the per-cycle JSON here")
    sw = command("switch-bench", "two vllm serve models switched A<->B: level 1, level 2, cold restart")
    sw.add_argument("--models", nargs=2, default=["tiny", "tiny"],
                    help="checkpoint directories, or model-factory shapes (tiny, qwen3-0.6b, ...) built under --out")
    sw.add_argument("--switches", type=int, default=5)
    sw.add_argument("--modes", default="level1,level2,cold")
    sw.add_argument("--max-tokens", type=int, default=32)
    sw.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    sw.add_argument("--warmup", choices=["on", "off"], default="off",
                    help="on: a one-token request to each server right after it starts (before its first sleep)")
    sw.add_argument("--quantization", choices=["none", "fp8"], default="none",
                    help="fp8: serve both models with vLLM's online FP8 (CUDA; refused where vLLM has no FP8)")
    sw.add_argument("--out", default="runs/switch-bench")
    make = command("make-checkpoint", "write a random-weight Qwen3 checkpoint")
    make.add_argument("path")
    make.add_argument("--size", default="tiny")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", default="bfloat16")
    make.add_argument("--untied", action="store_true", help="untie the embedding and the LM head")
    args = parser.parse_args(argv)
    from .log import configure

    configure(args.verbose)  # before vLLM / torch are imported: they read their switches then
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.command == "demo":
        from .demo import run_demo

        run_demo(steps=args.steps, seed=args.seed, verbose=args.verbose)
        sys.stdout.flush()
        os._exit(0)  # vLLM's teardown is slow and noisy; everything is written by now
    if args.command == "soak":
        from .soak import run_soak

        code = 0
        try:
            run_soak(args.cycles, size=args.size, warmup=args.warmup, max_growth_mib=args.max_growth_mib,
                     out=args.out)
        except AssertionError as err:
            print(f"soak failed: {err}", file=sys.stderr)
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if args.command == "switch-bench":
        from .fp8 import check_quantization
        from .switch_bench import prepare_models, run_switch_bench
        from .server import sleep_mode_available

        kw = {"gpu_memory_utilization": args.gpu_memory_utilization} if sleep_mode_available() else {}
        try:
            check_quantization(None if args.quantization == "none" else args.quantization)
        except ValueError as err:  # e.g. FP8 on vLLM's CPU build: said plainly, before anything starts
            print(f"switch-bench: {err}", file=sys.stderr)
            return 2
        run_switch_bench(prepare_models(args.models, args.out), args.out, switches=args.switches,
                         modes=args.modes.split(","), max_tokens=args.max_tokens, server_kwargs=kw,
                         warmup=args.warmup == "on",
                         quantization=None if args.quantization == "none" else args.quantization)
        return 0
    if args.command == "make-checkpoint":
        from .checkpoints import make_checkpoint

        print(make_checkpoint(args.path, args.size, seed=args.seed, dtype=args.dtype,
                              tie_word_embeddings=False if args.untied else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
