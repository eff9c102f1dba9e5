"""Can the trainer train vLLM's own weight memory on this GPU? One copy of the weights, step by step, each step a
fact in the JSON.

    python benchmarks/one_copy_probe.py --out DIR --size qwen3-0.6b          # CUDA graphs (vLLM's default)
    python benchmarks/one_copy_probe.py --out DIR --size qwen3-0.6b --eager

In a child process: an engine on dummy weights generates; sleeps at level 0 (the KV cache only) and wakes;
a trainable model is built on views of its weights (the bytes it allocates are recorded) and the one-copy
invariant is checked; ``--steps`` policy-gradient steps update the weights in place (torchao's AdamW with
bf16 stochastic rounding when importable, else PyTorch's AdamW; the share of weights each step changes is
recorded) with the engine asleep at level 0; after waking, the engine's teacher-forced log-probs are compared
with the trainer's, and with a fresh engine started from the trainer's saved weights in another process.
A failing step ends the probe with its error; what ran before stays in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common import PeakMemory, Steps, child_result, device_name, gib, versions, write_json


def optimizer_for(params, lr: float):
    """The recipe's ``adamw`` with bf16 stochastic rounding (torchao's ``_AdamW``) where torchao is installed, else
    PyTorch's AdamW (its name, the optimizer)."""
    from rollout_sleep.run.optim import build_optimizer, missing_package

    rounding = missing_package("adamw", stochastic_rounding=True) is None
    name = "torchao._AdamW(bf16_stochastic_round=True)" if rounding else "torch.optim.AdamW"
    return name, build_optimizer("adamw", params, lr=lr, weight_decay=0.0, stochastic_rounding=rounding)


def fresh_scores(args) -> dict:
    """In this (fresh) process: an engine from the saved weights scores the probe's sequences."""
    from rollout_sleep import Engine

    seqs = json.loads(Path(args.seqs).read_text())
    engine = Engine(args.fresh, dtype="bfloat16", seed=0, max_model_len=512, enforce_eager=True,
                    gpu_memory_utilization=0.3)
    return {"scores": engine.score(seqs)}


def child(args) -> dict:
    import torch
    from transformers import AutoConfig

    from rollout_sleep import Engine
    from rollout_sleep.weights.checkpoints import make_checkpoint, make_config_dir
    from rollout_sleep.weights.views import coverage_problems, model_on_views, model_spans, span

    cuda = torch.cuda.is_available()
    work = Path(args.workdir)
    dtype = torch.bfloat16
    path = make_config_dir(work / "model", args.size, dtype="bfloat16") if cuda else \
        make_checkpoint(work / "model", args.size, dtype="bfloat16")
    res: dict = {"steps": {}, "eager": args.eager}
    free0 = torch.cuda.mem_get_info()[0] if cuda else None
    kw = dict(max_model_len=512, enforce_eager=args.eager)
    if cuda:
        kw.update(load_format="dummy", gpu_memory_utilization=0.3)
    engine = Engine(path, dtype="bfloat16", seed=0, **kw)
    res["engine_start_s"] = engine.startup_seconds
    if cuda:
        res["engine_took_gib"] = gib(free0 - torch.cuda.mem_get_info()[0])
    prompts = [[(7 * i + j) % 200 + 1 for j in range(24)] for i in range(8)]
    sampling = dict(n=4, max_tokens=32, temperature=1.0, ignore_eos=True)

    with Steps(res) as step:
        comps = []

        def plain():
            comps[:] = engine.generate(prompts, **sampling)
            return {"tokens": sum(len(c.token_ids) for c in comps)}

        step("plain", plain)

        def level0():
            s = engine.sleep(level=0)
            w = engine.wake_up()
            out = engine.generate(prompts, **sampling)
            return {"sleep": s.seconds, "wake": w.seconds, "memory_gib": {**s.memory_gib, **w.memory_gib},
                    "tokens": sum(len(c.token_ids) for c in out)}

        step("level0", level0)
        state = {}

        def build():
            if cuda:
                why = engine.loader.why_not_direct()
                if why is not None:
                    raise RuntimeError(f"no exact views: {why}")
                targets = engine.loader.direct_targets()
                engine_spans = engine.run_on_model(lambda m: {n: span(p) for n, p in m.named_parameters()})
                filled = engine.loader.filled_bytes()
            else:  # CPU: vLLM repacks its linears; the code path runs on a checkpoint's own tensors instead
                from transformers import AutoModelForCausalLM

                own = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
                targets = {n: p.data for n, p in own.named_parameters()}
                engine_spans = {n: span(t) for n, t in targets.items()}
                filled = {n: e - s for n, (s, e) in engine_spans.items()}
            before = torch.cuda.memory_allocated() if cuda else 0
            model = model_on_views(AutoConfig.from_pretrained(path), targets, dtype, trainable=True)
            if args.checkpointing:
                model.gradient_checkpointing_enable()
            state["model"] = model
            t0 = time.perf_counter()
            problems = coverage_problems(engine_spans, model_spans(model), filled)
            check_s = time.perf_counter() - t0
            n = sum(p.numel() for p in model.parameters())
            return {"trainer_allocated_bytes": (torch.cuda.memory_allocated() - before) if cuda else None,
                    "parameters": n, "weight_gib": gib(n * 2), "invariant_problems": problems[:8],
                    "invariant_check_s": check_s}

        step("build", build)
        model = state["model"]
        seqs = [c.prompt_token_ids + c.token_ids for c in comps]
        dev = "cuda" if cuda else "cpu"

        def logprobs(m, batch):
            ids = torch.tensor(batch, device=dev)
            logits = m(ids).logits[:, :-1].float()
            return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)

        with torch.no_grad():
            model.eval()
            before_lp = logprobs(model, seqs[:8]).cpu()
            model.train()
        name, opt = optimizer_for([p for p in model.parameters() if p.requires_grad], args.lr)
        res["optimizer"] = name
        probe_w = model.model.layers[0].mlp.down_proj.weight
        updated = []

        def train():
            timings = []
            with PeakMemory() as mem:
                for k in range(args.steps):
                    s = engine.sleep(level=0)
                    snap = probe_w.detach().clone()
                    t0 = time.perf_counter()
                    adv = torch.randn(len(seqs), 1, device=dev)
                    for i in range(0, len(seqs), 8):
                        lp = logprobs(model, seqs[i:i + 8])
                        (-(adv[i:i + 8] * lp).mean() / (len(seqs) // 8)).backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    if cuda:
                        torch.cuda.synchronize()
                    train_s = time.perf_counter() - t0
                    updated.append(float((probe_w.detach() != snap).float().mean()))
                    w = engine.wake_up()
                    timings.append({"sleep_s": s.seconds, "wake_s": w.seconds, "train_s": train_s})
            return {"timings": timings, "updated_fraction": updated, "peak_gib": mem.peak_gib,
                    "peak_above_base_gib": mem.peak_above_base_gib}

        step("train", train)

        def compare():
            with torch.no_grad():
                model.eval()
                trainer_lp = logprobs(model, seqs[:8]).cpu()
            engine_lp = torch.tensor(engine.score(seqs[:8]))
            out = {"engine_vs_trainer_max": float((engine_lp - trainer_lp).abs().max()),
                   "engine_vs_trainer_mean": float((engine_lp - trainer_lp).abs().mean()),
                   "trainer_moved_mean": float((trainer_lp - before_lp).abs().mean())}
            saved = work / "saved"
            model.save_pretrained(saved)
            for f in Path(path).iterdir():  # the tokenizer beside the weights
                if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
                    (saved / f.name).write_bytes(f.read_bytes())
            (work / "seqs.json").write_text(json.dumps(seqs[:8]))
            got = child_result([sys.executable, __file__, "--fresh", str(saved), "--seqs", str(work / "seqs.json"),
                                "--out", args.out], timeout=300)
            if "scores" not in got:
                out["fresh_error"] = f"{got.get('error')}: {got.get('output_tail', '')[-3000:]}"
                return out
            fresh = torch.tensor(got["scores"])
            out["engine_vs_fresh_max"] = float((engine_lp - fresh).abs().max())
            out["engine_vs_fresh_mean"] = float((engine_lp - fresh).abs().mean())
            out["trainer_vs_fresh_mean"] = float((trainer_lp - fresh).abs().mean())
            return out

        step("compare", compare)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", default="qwen3-0.6b")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--timeout", type=float, default=420)
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "rs-one-copy-probe"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fresh", help=argparse.SUPPRESS)
    ap.add_argument("--seqs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fresh:
        print("RESULT " + json.dumps(fresh_scores(args)), flush=True)
        os._exit(0)
    if args.child:
        print("RESULT " + json.dumps(child(args), default=str), flush=True)
        os._exit(0)
    result = {"size": args.size, "device": device_name(), "versions": versions("vllm", "torch", "transformers",
                                                                               "torchao")}
    cmd = [sys.executable, __file__, "--child", "--out", args.out, "--size", args.size, "--workdir", args.workdir,
           "--steps", str(args.steps), "--lr", str(args.lr)] + (["--eager"] if args.eager else []) + \
        (["--checkpointing"] if args.checkpointing else [])
    t0 = time.monotonic()
    result.update(child_result(cmd, timeout=args.timeout))
    result["wall_s"] = time.monotonic() - t0
    tag = "eager" if args.eager else "graphs"
    write_json(Path(args.out) / f"one_copy_probe_{args.size}_{tag}.json", result)
    print(json.dumps({k: result.get(k) for k in ("steps", "error")}, default=str)[:3000], flush=True)


if __name__ == "__main__":
    main()
