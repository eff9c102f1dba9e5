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
    make = command("make-checkpoint", "write a random-weight Qwen3 checkpoint")
    make.add_argument("path")
    make.add_argument("--size", default="tiny")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", default="bfloat16")
    make.add_argument("--untied", action="store_true", help="untie the embedding and the LM head")
    args = parser.parse_args(argv)
    from rollout_sleep.log import configure

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
    if args.command == "make-checkpoint":
        from rollout_sleep.weights.checkpoints import make_checkpoint

        print(make_checkpoint(args.path, args.size, seed=args.seed, dtype=args.dtype,
                              tie_word_embeddings=False if args.untied else None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
