"""Where does a LoRA engine break on this GPU? A step-by-step probe, each step a fact in the JSON.

    python benchmarks/lora_probe.py --out DIR --size qwen3-0.6b            # each runner in its own process
    python benchmarks/lora_probe.py --out /tmp/probe --size tiny --quick   # CPU: the same steps' code path

Per vLLM model runner (the default, and ``VLLM_USE_V2_MODEL_RUNNER=0``), in a fresh process:

1. ``plain``: a LoRA-enabled engine (one slot, dummy weights) generates with no adapter, and ``level0``:
   again after a level-0 sleep (the KV cache released) and wake;
2. ``disk``: the same engine generates through a PEFT adapter saved to disk (vLLM's public LoRA path);
3. ``sync``: :class:`AdapterSync` installs the trainer's in-memory adapter (base = views of vLLM's weights
   on CUDA) and the engine generates through it; then one slot copy (``push``) and a generate again.

The first failing step is recorded with its error; the steps after it are not run (an illegal memory access
leaves the CUDA context unusable). ``CUDA_LAUNCH_BLOCKING=1`` is set so the failing kernel is the one named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import Steps, child_result

RUNNERS = {"default": {}, "v1": {"VLLM_USE_V2_MODEL_RUNNER": "0"}}


def child(args) -> dict:
    import torch
    from peft import get_peft_model

    from rollout_sleep import AdapterSync, Engine, LoraSettings, make_checkpoint, trainer_from_engine
    from rollout_sleep.weights.checkpoints import make_config_dir
    from rollout_sleep.weights.checkpoints import random_model

    cuda = torch.cuda.is_available()
    work = Path(args.workdir)
    lora = LoraSettings(rank=16, alpha=32)
    dtype = "bfloat16" if cuda else "float32"
    path = make_config_dir(work / "model", args.size, dtype=dtype) if cuda else \
        make_checkpoint(work / "model", args.size, dtype=dtype)
    kw = dict(lora.engine_kwargs(), max_model_len=512, enforce_eager=True)
    if cuda:
        kw.update(load_format="dummy", gpu_memory_utilization=0.35)
    res: dict = {"steps": {}}
    engine = Engine(path, dtype=dtype, seed=0, **kw)
    prompts = [[(7 * i + j) % 200 + 1 for j in range(12)] for i in range(4)]
    sampling = dict(n=2, max_tokens=8 if args.quick else 32, temperature=1.0, ignore_eos=True)


    def tokens(comps) -> dict:
        return {"completions": len(comps), "tokens": sum(len(c.token_ids) for c in comps)}

    with Steps(res) as step:
        step("plain", lambda: tokens(engine.generate(prompts, **sampling)))

        def level0():  # the KV cache released and mapped back (the weights stay): no adapter involved yet
            engine.sleep(level=0)
            engine.wake_up()
            return tokens(engine.generate(prompts, **sampling))

        step("level0", level0)

        def disk():
            from vllm.lora.request import LoRARequest

            base = random_model(__import__("transformers").AutoConfig.from_pretrained(path), seed=1,
                                device="cuda" if cuda else "cpu", dtype=getattr(torch, dtype))
            peft = get_peft_model(base, lora.peft_config())
            with torch.no_grad():
                for n, p in peft.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.02)
            peft.save_pretrained(work / "adapter")
            del peft, base
            return tokens(engine.generate(prompts, lora_request=LoRARequest("disk", 1, str(work / "adapter")),
                                          **sampling))

        step("disk", disk)

        def sync():
            model = trainer_from_engine(engine, lora) if cuda else \
                get_peft_model(__import__("transformers").AutoModelForCausalLM.from_pretrained(path), lora.peft_config())
            adapter = AdapterSync(engine, model)
            res["install"] = adapter.push()
            out = tokens(engine.generate(prompts, lora_request=adapter.request, **sampling))
            res["slots"] = adapter.push()
            out["after_slot_copy"] = tokens(engine.generate(prompts, lora_request=adapter.request, **sampling))
            out["verified"] = adapter.verify().ok
            return out

        step("sync", sync)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="qwen3-0.6b")
    ap.add_argument("--runners", default="default,v1")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "rs-lora-probe"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args), default=str), flush=True)
        os._exit(0)
    from rollout_sleep import versions

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"size": args.size, "versions": versions(), "runners": {}}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # noqa: BLE001 - the device name is a label only
        result["device"] = "unknown"
    for name in args.runners.split(","):
        env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", **RUNNERS[name])
        cmd = [sys.executable, __file__, "--child", "--out", args.out, "--size", args.size, "--workdir", f"{args.workdir}/{name}"] + \
            (["--quick"] if args.quick else [])
        t0 = time.monotonic()
        r = child_result(cmd, timeout=args.timeout, env=env)
        r["env"], r["wall_s"] = RUNNERS[name], time.monotonic() - t0
        result["runners"][name] = r
        print(name, json.dumps({k: r.get(k) for k in ("steps", "error")}, default=str)[:1500], flush=True)
        (out / f"lora_probe_{args.size}.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
