"""``rollout-sleep soak``: many full cycles, checked every time, with memory tracked per cycle.

Each cycle: generate → sleep → one training step (the trainer's model moves) → wake + sync → reset →
``verify`` (the engine holds exactly the trainer's weights) → a stale-prefix probe (a fixed long prompt,
cached before the sync, must now give the new weights' greedy output, checked teacher-forced against the
trainer) → generate. The probe's tolerance is calibrated at the start on this model and dtype: its gap on
fresh KV (the engine-vs-trainer floor, x3) must sit below its gap on deliberately stale KV, or the soak
refuses to run (a probe that cannot fail proves nothing). Memory per cycle: free GPU memory on CUDA, process RSS on CPU. Fails at the first
mismatch, or when memory after warm-up moves by more than the allowed bound.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from rollout_sleep import versions


def summarize(rows: list[dict], warmup: int, kind: str) -> dict:
    """Memory growth and timing percentiles of a soak's rows.

    Memory is compared between cycles of the same kind (sleep cycles with sleep cycles, awake updates with
    awake updates): a sleep cycle hands PyTorch's cached blocks back before the wake, an awake update
    does not, so the two kinds sit at different, each constant, levels. Growth is the largest change,
    last cycle of a kind minus its first cycle after ``warmup`` (and since cycle 1).
    """
    sign = -1 if kind == "cuda_free" else 1  # less free GPU memory / more RSS = growth

    def growth(first_cycle: int) -> float:
        worst = 0.0
        for awake in (False, True):
            same = [r for r in rows[first_cycle:] if r["awake_update"] == awake]
            if same:
                worst = max(worst, (same[-1]["memory_gib"] - same[0]["memory_gib"]) * 1024 * sign)
        return worst

    secs = sorted(r["seconds"] for r in rows[warmup:]) or sorted(r["seconds"] for r in rows)
    asleep = [r["sleep_asleep_gib"] for r in rows if "sleep_asleep_gib" in r]
    return {"memory_growth_after_warmup_mib": growth(min(warmup, len(rows) - 1)),
            "memory_growth_since_cycle_1_mib": growth(0),
            "asleep_memory_range_mib": (max(asleep) - min(asleep)) * 1024 if asleep else None,
            "p50_s": statistics.median(secs), "p99_s": secs[min(len(secs) - 1, int(0.99 * len(secs)))]}


def run_soak(cycles: int = 50, *, size: str = "tiny", warmup: int = 10, max_growth_mib: float = 64.0,
             out: str | None = None, dtype: str | None = None, quiet: bool = False, awake_every: int = 4) -> dict:
    """Every ``awake_every``-th cycle updates the weights without sleeping (``load_weights`` on the awake
    engine): there vLLM does not drop its prefix cache by itself, so only the engine's reset keeps the
    probe from reading KV computed with the old weights. The checkpoint it builds in a temporary folder is
    deleted at the end, whatever the outcome."""
    if int(cycles) < 1:
        raise ValueError(f"cycles must be at least 1, got {cycles!r}: a soak of no cycles checks nothing")
    if warmup < 0 or awake_every < 0:
        raise ValueError(f"warmup and awake_every must be >= 0, got {warmup!r} and {awake_every!r}")
    work = Path(tempfile.mkdtemp(prefix="rollout-sleep-soak-"))
    try:
        return _soak(int(cycles), size=size, warmup=warmup, max_growth_mib=max_growth_mib, out=out, dtype=dtype,
                     quiet=quiet, awake_every=awake_every, work=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # GBs at 4B


def _soak(cycles: int, *, size: str, warmup: int, max_growth_mib: float, out: str | None, dtype: str | None,
          quiet: bool, awake_every: int, work: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from rollout_sleep.engine.memory import memory_gib
    from rollout_sleep.run.config import load_config
    from rollout_sleep.run.factory import build_engine
    from rollout_sleep.weights.checkpoints import make_checkpoint
    from rollout_sleep.weights.stream import WeightStream
    from rollout_sleep.weights.verify import verify

    cuda = torch.cuda.is_available()
    dtype = dtype or ("bfloat16" if cuda else "float32")
    ckpt = make_checkpoint(work / "model", size, seed=0, dtype=dtype)
    cfg = load_config(None, [f"model.dtype={dtype}", "engine.max_model_len=null", "engine.keep_trainer_cache=false",
                             "engine.gpu_memory_utilization=0.35"])
    engine = build_engine(cfg, ckpt)  # vLLM's own KV sizing
    device = "cuda" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).to(device)
    # Adam moves every weight by ~lr each step: well above bf16's resolution, so each sync changes the model
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stream = WeightStream(model, dtype=engine.dtype)
    probe = [[(13 * j) % 240 + 5 for j in range(160)]]  # 10 full KV blocks: the prefix cache keeps it
    gen = torch.Generator().manual_seed(0)

    def train_step():
        ids = torch.randint(1, 250, (4, 32), generator=gen).to(device)
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()

    def probe_gap() -> float:
        """Greedy probe through the engine (its prefix may come from the cache), scored by the trainer."""
        out = engine.generate(probe, max_tokens=4, temperature=0.0)[0]
        with torch.no_grad():
            seq = torch.tensor([probe[0] + out.token_ids], device=device)
            logits = model(seq).logits[0, len(probe[0]) - 1: -1].float()
            want = torch.log_softmax(logits, -1).gather(1, torch.tensor(out.token_ids, device=device)[:, None])
        return max(abs(a - b) for a, b in zip(out.logprobs, want[:, 0].tolist()))

    # Calibrate the probe on this model and dtype: its gap on fresh KV (the engine-vs-trainer numerical
    # floor) and on deliberately stale KV (an awake update without a reset, vLLM's own reset after it).
    engine.generate(probe, max_tokens=4, temperature=0.0)
    train_step()
    engine.load_weights(stream, reset_prefix_cache=False)  # new weights, prefix cache left stale on purpose
    stale_gap = probe_gap()
    engine.llm.reset_prefix_cache()  # vLLM's own reset: the calibration must not rely on the engine's under test
    fresh_gap = probe_gap()
    tol = max(1e-3 if dtype == "float32" else 1e-2, 3 * fresh_gap)
    if stale_gap <= tol:
        raise AssertionError(f"the stale-prefix probe cannot tell stale from fresh KV here: gap {stale_gap:.3g} "
                             f"stale vs {fresh_gap:.3g} fresh (tolerance {tol:.3g})")
    rows = []
    kind, _ = memory_gib()
    for i in range(cycles):
        t0 = time.perf_counter()
        engine.generate(probe, max_tokens=4, temperature=0.0)  # puts the probe's prefix in the cache
        awake = bool(awake_every) and (i + 1) % awake_every == 0
        s = None if awake else engine.sleep(level=2)
        train_step()
        w = engine.load_weights(stream) if awake else engine.wake_up(weights=stream)
        report = verify(engine, stream)
        if not report.ok:
            raise AssertionError(f"cycle {i + 1}: verify failed: {sorted(report.mismatched)[:5]}")
        gap = probe_gap()
        if gap > tol:  # KV of the cached prefix was computed with the old weights
            raise AssertionError(f"cycle {i + 1}: stale prefix: the probe's log-probs differ from the trainer's "
                                 f"by {gap:.3g} (tolerance {tol})")
        rows.append({"cycle": i + 1, "seconds": time.perf_counter() - t0, "awake_update": awake, "probe_gap": gap,
                     "sleep_s": s.seconds["sleep"] if s else 0.0,
                     **{f"{k}_s": v for k, v in w.seconds.items()}, "verify_s": report.seconds,
                     "memory_gib": memory_gib()[1],
                     **({f"sleep_{k}_gib": v for k, v in s.memory_gib.items()} if s else {})})
        if not quiet and (i + 1) % max(1, cycles // 10) == 0:
            print(f"cycle {i + 1}/{cycles}: {rows[-1]['seconds'] * 1e3:.1f} ms, {kind} {rows[-1]['memory_gib']:.3f} GiB",
                  flush=True)
    result = {"cycles": cycles, "size": size, "device": torch.cuda.get_device_name() if cuda else "cpu",
              "memory_kind": kind, "warmup_cycles": warmup, "max_growth_mib": max_growth_mib,
              "probe": {"stale_gap": stale_gap, "fresh_gap": fresh_gap, "tolerance": tol,
                        "max_gap": max(r["probe_gap"] for r in rows)},
              "verify_passed": len(rows), "versions": versions(), "rows": rows}
    result.update(summarize(rows, warmup, kind))
    growth_mib = result["memory_growth_after_warmup_mib"]
    if out:
        Path(out).write_text(json.dumps(result, indent=1))
    if growth_mib > max_growth_mib:
        raise AssertionError(f"memory grew {growth_mib:.1f} MiB after cycle {warmup} (bound {max_growth_mib} MiB)")
    if not quiet:
        print(f"{cycles} cycles, verify passed on every one; p50 {result['p50_s'] * 1e3:.1f} ms, "
              f"p99 {result['p99_s'] * 1e3:.1f} ms; {kind} growth after warm-up {growth_mib:.1f} MiB")
    return result
