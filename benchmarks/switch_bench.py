"""Two ``vllm serve`` models, one awake at a time, switched A→B→A→B… (the published sleep-mode benchmark).

    python benchmarks/switch_bench.py --models qwen3-0.6b qwen3-4b --switches 5 --out runs/switch-bench
    python benchmarks/switch_bench.py --switches 1 --max-tokens 8 --out /tmp/sw     # CPU: two tiny models

Modes (the published sleep-mode benchmark's):
- ``level1``: sleep the current server at level 1, wake the other (weights come back from host memory;
  no reload, no reset needed);
- ``level2``: sleep at level 2, wake the other in the memory-safe order: weights → reload from its
  checkpoint path → KV cache → reset the prefix cache;
- ``cold``: no sleep: stop the current server, start the other from scratch.
Each switch is followed by one inference with a fresh prompt (its time is reported on its own) and a
second one (the steady inference time). The two sleep modes share the two servers (started once, their
start-up timed apart); ``cold`` then starts from the server left awake. Writes ``switch_bench.json``,
``switch_bench.png`` and prints a table.

The published benchmark's two ablations (its Level-1 figures, :data:`ARTICLE_A100`): ``warmup=True``
sends each server a one-token request right after it starts (timed as part of its initial load), before
its first sleep; ``quantization="fp8"`` serves both models with vLLM's online FP8 (refused before anything
starts where vLLM has no FP8 kernels). :func:`ablation_report` puts the arms beside the article's figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from rollout_sleep.engine.memory import sleep_mode_available
from rollout_sleep.serve.remote import RemoteEngine
from rollout_sleep.serve.server import ServerProcess

from common import device_name, gpu_used_mib, versions, write_json

MODES = ("level1", "level2", "cold")

# The published ablations ("Zero-Reload Model Switching with vLLM Sleep Mode", vLLM blog, 2025-10-26): A100,
# TP=1, vLLM 0.11.0, sleep level 1, Qwen3-0.6B (A) <-> Phi-3-vision-128k-instruct (B), 5 switches. "total"
# is the article's workload total (its initial load is most of it); wake / inference are averages.
ARTICLE_A100 = {
    "source": "https://blog.vllm.ai/2025/10/26/sleep-mode.html",
    "setup": "A100, vLLM 0.11.0, sleep level 1, Qwen3-0.6B <-> Phi-3-vision-128k-instruct, 5 switches",
    "warmup": {"on": {"initial_load_s": 108.7, "warmup_s": 8.4, "first_inference_s": [0.45, 0.93],
                      "later_inference_s": 0.43, "total_s": 119.5},
               "off": {"initial_load_s": 101.1, "warmup_s": 0.0, "first_inference_s": [2.59, 6.61],
                       "later_inference_s": 0.41, "total_s": 119.0}},
    "quantization": {"bf16": {"initial_load_s": 90.5, "wake_s": [0.27, 0.90], "inference_s": [0.41, 0.81],
                              "total_s": 108.2},
                     "fp8": {"initial_load_s": 96.9, "wake_s": [0.18, 0.78], "inference_s": [0.44, 0.57],
                             "total_s": 113.6}},
}


QUANTIZATIONS = (None, "fp8")  # vLLM's own --quantization for `vllm serve` (the article's FP8 ablation)


def check_quantization(quantization: str | None) -> None:
    """Refuse a ``--quantization`` the servers cannot run, before anything is written or started (vLLM's CPU
    build accepts ``fp8`` and then fails deep in its loader: its FP8 quant kernels are stubs)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}; use None (the checkpoint's dtype) or 'fp8' "
                         "(vLLM's online FP8 of a bf16/fp16 checkpoint)")
    if quantization is None:
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        problem = "vLLM's CPU build has no FP8 weight kernels (its scaled_fp8_quant ops are stubs)"
    elif not current_platform.is_cuda():
        problem = f"this benchmark serves FP8 on CUDA only (this vLLM runs on {current_platform.device_type})"
    else:
        return
    raise ValueError(f"quantization='fp8' is not available here: {problem}. Run it on a CUDA GPU, or leave "
                     "--quantization at none")


def prepare_models(models: list[str], out_dir: str | Path) -> list[str]:
    """Checkpoint directories as given; a model-factory shape name becomes a random-weight checkpoint
    under ``out_dir/models`` (seed = its position; the tiny shape untied: on CPU a path reload of a tied
    model keeps a stale LM head)."""
    from rollout_sleep.weights.checkpoints import SHAPES, make_checkpoint

    paths = []
    for i, m in enumerate(models):
        if Path(m).is_dir() or m not in SHAPES:
            paths.append(m)
            continue
        dest = Path(out_dir) / "models" / f"{m}-seed{i}"
        if not (dest / "config.json").exists():
            make_checkpoint(dest, m, seed=i, tie_word_embeddings=False if m == "tiny" else None,
                            dtype="float32" if m == "tiny" else "bfloat16")
            _release_gpu_cache()  # drawn on the GPU: its cached blocks would shrink what the servers see
        paths.append(str(dest))
    return paths


def _release_gpu_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _infer(engine: RemoteEngine, i: int, max_tokens: int, prompt: str = "Switch {i}: what is {i} plus {j}? Answer:"
           ) -> float:
    t0 = time.perf_counter()
    engine.generate([prompt.format(i=i, j=7 * i + 3)], max_tokens=max_tokens, temperature=0.0)
    return time.perf_counter() - t0


def _after_switch(engine: RemoteEngine, s: int, max_tokens: int) -> dict:
    """The first inference after a switch, then a second one with another fresh prompt (steady state)."""
    return {"first_inference_s": _infer(engine, s, max_tokens),
            "second_inference_s": _infer(engine, s, max_tokens, "Then {j} minus {i} is? Answer:")}


def run_switch_bench(models: list[str], out_dir: str | Path, *, switches: int = 5, modes=MODES,
                     max_tokens: int = 32, server_kwargs: dict | None = None, warmup: bool = False,
                     quantization: str | None = None) -> dict:
    """Run the A↔B workload for each mode; returns (and writes) the results. ``warmup``: a one-token request
    to each server right after it starts; ``quantization``: ``"fp8"`` serves both with vLLM's online FP8."""
    check_quantization(quantization)  # before anything is written or started
    if len(models) != 2:
        raise ValueError(f"switch-bench needs exactly two models, got {len(models)}")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(server_kwargs or {})
    if quantization:
        kw["extra_args"] = [*kw.get("extra_args", ()), "--quantization", quantization]
    result: dict = {"models": models, "switches": switches, "max_tokens": max_tokens, "modes": {},
                    "warmup": warmup, "quantization": quantization, "versions": versions(), "device": device_name()}
    servers = [ServerProcess(m, log_path=out / f"server_{i}.log", **kw) for i, m in enumerate(models)]
    try:
        sleep_modes = [m for m in modes if m != "cold"]
        current = 0
        if sleep_modes:
            engines = []
            for i, srv in enumerate(servers):  # start A, put it to sleep, start B: one awake at a time
                srv.start()
                engines.append(RemoteEngine(srv.client(), models[i]))
                result.setdefault("startup_s", []).append(srv.started_s)
                warm = _infer(engines[i], -1, 1) if warmup else 0.0  # compiles what the first request needs
                result.setdefault("warmup_s", []).append(warm)
                result.setdefault("initial_load_s", []).append(srv.started_s + warm)
                if i == 0:
                    engines[0].sleep(level=1)
            current = 1
            for mode in sleep_modes:
                level = int(mode[-1])
                other = engines[1 - current]
                if other.sleep_level != level:  # an untimed switch leaves the sleeper at this mode's level
                    engines[current].sleep(level=level)  # (never two awake: they need not fit together)
                    other.wake_up(reload_checkpoint=other.sleep_level == 2)
                    current = 1 - current
                rows = []
                for s in range(switches):
                    nxt = 1 - current
                    t0 = time.perf_counter()
                    slept = engines[current].sleep(level=level)
                    woke = engines[nxt].wake_up(reload_checkpoint=engines[nxt].sleep_level == 2)
                    switch_s = time.perf_counter() - t0
                    rows.append({"switch": s + 1, "to": models[nxt], "switch_s": switch_s,
                                 "wake_s": sum(woke.seconds.values()),
                                 "phases_s": {**slept.seconds, **woke.seconds}, "gpu_used_mib": gpu_used_mib(),
                                 **_after_switch(engines[nxt], s, max_tokens)})
                    current = nxt
                result["modes"][mode] = _summarize(rows)
                write_json(out / "switch_bench.json", result)
                print(f"{mode}: median switch {result['modes'][mode]['median_switch_s']:.3f} s", flush=True)
            servers[1 - current].stop()  # cold starts from the server left awake
        if "cold" in modes:
            if servers[current].proc is None:
                servers[current].start()
            rows = []
            for s in range(switches):
                nxt = 1 - current
                t0 = time.perf_counter()
                servers[current].stop()
                servers[nxt].start()
                switch_s = time.perf_counter() - t0
                engine = RemoteEngine(servers[nxt].client(), models[nxt])
                rows.append({"switch": s + 1, "to": models[nxt], "switch_s": switch_s,
                             "phases_s": {"stop_and_start": switch_s}, "gpu_used_mib": gpu_used_mib(),
                             **_after_switch(engine, s, max_tokens)})
                current = nxt
            result["modes"]["cold"] = _summarize(rows)
            print(f"cold: median switch {result['modes']['cold']['median_switch_s']:.3f} s", flush=True)
    finally:
        for srv in servers:
            srv.stop()
    modes_done = result["modes"]
    if "cold" in modes_done and "level2" in modes_done:
        result["level2_speedup_vs_cold"] = modes_done["cold"]["median_switch_s"] / modes_done["level2"]["median_switch_s"]
    write_json(out / "switch_bench.json", result)
    table = markdown_table(result)
    (out / "switch_bench.md").write_text(table + "\n")
    print(table, flush=True)
    _chart(result, out / "switch_bench.png")
    return result


def _summarize(rows: list[dict]) -> dict:
    per_model = {}
    for m in dict.fromkeys(r["to"] for r in rows):
        mine = [r for r in rows if r["to"] == m]
        per_model[m] = {k: statistics.median(r[k] for r in mine)
                        for k in ("switch_s", "wake_s", "first_inference_s", "second_inference_s") if k in mine[0]}
    return {"rows": rows, "total_s": sum(r["switch_s"] + r["first_inference_s"] for r in rows),
            "median_switch_s": statistics.median(r["switch_s"] for r in rows),
            "median_first_inference_s": statistics.median(r["first_inference_s"] for r in rows),
            "median_second_inference_s": statistics.median(r["second_inference_s"] for r in rows),
            "per_model_median": per_model}


def markdown_table(result: dict) -> str:
    names = {m: Path(m).name for m in result["models"]}
    lines = ["| mode | total (switch + inference) s | median switch s | median switch to "
             + " / ".join(names.values()) + " s | median first inference s |", "| --- | --- | --- | --- | --- |"]
    for mode, r in result["modes"].items():
        per = [statistics.median([x["switch_s"] for x in r["rows"] if x["to"] == m] or [float("nan")])
               for m in result["models"]]
        lines.append(f"| {mode} | {r['total_s']:.2f} | {r['median_switch_s']:.3f} | "
                     + " / ".join(f"{v:.3f}" for v in per) + f" | {r['median_first_inference_s']:.3f} |")
    return "\n".join(lines)


def _chart(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for mode, r in result["modes"].items():
        xs = [row["switch"] for row in r["rows"]]
        axes[0].plot(xs, [row["switch_s"] for row in r["rows"]], marker="o", label=mode)
        axes[1].plot(xs, [row["first_inference_s"] for row in r["rows"]], marker="o", label=mode)
    for ax, title in zip(axes, ("switch time (s)", "first inference after switch (s)")):
        ax.set_yscale("log")
        ax.set_xlabel("switch")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{result['device']}: " + " <-> ".join(Path(m).name for m in result["models"]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ the article's ablations
def ablation_figures(result: dict) -> dict:
    """A level-1 run in the article's terms: initial load (both servers, with any warm-up), per-model (A, B)
    wake and first inference after a wake, the later inference, 5-switch total (switch + first inference)
    and that total with the initial load."""
    level1 = result["modes"]["level1"]
    nan = {"wake_s": float("nan"), "first_inference_s": float("nan")}  # a model never switched to
    a, b = (level1["per_model_median"].get(m, nan) for m in result["models"])
    load = sum(result["initial_load_s"])
    return {"initial_load_s": load, "warmup_s": sum(result.get("warmup_s", [0.0])), "wake_s": [a["wake_s"], b["wake_s"]],
            "first_inference_s": [a["first_inference_s"], b["first_inference_s"]],
            "later_inference_s": level1["median_second_inference_s"], "switches_total_s": level1["total_s"],
            "total_s": load + level1["total_s"]}


def _pair(x) -> str:
    return " / ".join(f"{v:.2f}" for v in x) if isinstance(x, list) else f"{x:.2f}"


def _ratio(x, y) -> str:
    if isinstance(x, list):
        return " / ".join(f"{b / a:.2f}x" if a else "-" for a, b in zip(x, y))
    return f"{y / x:.2f}x" if x else "-"


def _side_by_side(title: str, names: tuple[str, str], art_a: dict, art_b: dict, ours_a: dict, ours_b: dict,
                  rows) -> list[str]:
    """One markdown table: the article's two arms, then ours, each with the second / first ratio; ``rows``:
    ``(label, article key, our key)``."""
    first, second = names
    lines = ["", title, "",
             f"| metric | article: {first} | {second} | {second}/{first} | ours: {first} | {second} | {second}/{first} |",
             "|---|---|---|---|---|---|---|"]
    for label, k, ours_k in rows:
        lines.append(f"| {label} | {_pair(art_a[k])} | {_pair(art_b[k])} | {_ratio(art_a[k], art_b[k])} | "
                     f"{_pair(ours_a[ours_k])} | {_pair(ours_b[ours_k])} | {_ratio(ours_a[ours_k], ours_b[ours_k])} |")
    return lines


def ablation_markdown(arms: dict[str, dict]) -> str:
    """Side-by-side tables of the article's A100 figures and ours; ``arms``: ``bf16_warmup``,
    ``bf16_no_warmup``, ``fp8_warmup`` → :func:`ablation_figures` (missing arms are left out)."""
    art = ARTICLE_A100
    lines = [f"Article: {art['setup']} ({art['source']}). Pairs are model A / model B; s = seconds. Our arms "
             "start their servers one arm after another: an arm whose models another arm compiled first reuses "
             "vLLM's compile cache, so its initial load is shorter for that reason too (the warm-up row is the "
             "warm-up's own cost)."]
    on, off, fp8 = (arms.get(k) for k in ("bf16_warmup", "bf16_no_warmup", "fp8_warmup"))
    if on and off:
        lines += _side_by_side(
            "Warm-up (one-token request after each server starts) on vs off:", ("with", "without"),
            art["warmup"]["on"], art["warmup"]["off"], on, off,
            (("initial load, both models (s)", "initial_load_s", "initial_load_s"),
             ("of which the warm-up requests (s)", "warmup_s", "warmup_s"),
             ("first inference after a wake, A / B (s)", "first_inference_s", "first_inference_s"),
             ("later inferences (s)", "later_inference_s", "later_inference_s"),
             ("total (s; ours: initial load + 5 switches)", "total_s", "total_s")))
    if on and fp8:
        lines += _side_by_side(
            "FP8 (vLLM's online FP8 of the bf16 checkpoints) vs bf16, both with warm-up:", ("bf16", "FP8"),
            art["quantization"]["bf16"], art["quantization"]["fp8"], on, fp8,
            (("wake, A / B (s)", "wake_s", "wake_s"),
             ("first inference after a wake, A / B (s)", "inference_s", "first_inference_s"),
             ("initial load, both models (s)", "initial_load_s", "initial_load_s"),
             ("total (s; ours: initial load + 5 switches)", "total_s", "total_s")))
    return "\n".join(lines)


def ablation_chart(arms: dict[str, dict], path: Path, device: str = "ours") -> bool:
    """Bars of wake and first-inference times per model, article vs ours, for both ablations (matplotlib;
    ``False`` where it is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    art = ARTICLE_A100
    panels = []
    if "bf16_warmup" in arms and "bf16_no_warmup" in arms:
        panels.append(("first inference after a wake (s)", "first_inference_s",
                       [("A100 warm-up", art["warmup"]["on"]["first_inference_s"]),
                        ("A100 none", art["warmup"]["off"]["first_inference_s"]),
                        ("ours warm-up", arms["bf16_warmup"]["first_inference_s"]),
                        ("ours none", arms["bf16_no_warmup"]["first_inference_s"])]))
    if "bf16_warmup" in arms and "fp8_warmup" in arms:
        for title, k, art_k in (("wake (s)", "wake_s", "wake_s"),
                                ("first inference after a wake (s)", "first_inference_s", "inference_s")):
            panels.append((f"bf16 vs FP8: {title}", k,
                           [("A100 bf16", art["quantization"]["bf16"][art_k]),
                            ("A100 FP8", art["quantization"]["fp8"][art_k]),
                            ("ours bf16", arms["bf16_warmup"][k]), ("ours FP8", arms["fp8_warmup"][k])]))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, _, bars) in zip(axes[0], panels):
        width = 0.8 / len(bars)
        for j, (label, (va, vb)) in enumerate(bars):
            ax.bar([i + j * width for i in range(2)], [va, vb], width, label=label,
                   hatch="//" if label.startswith("A100") else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(2)], ["model A", "model B"])
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"sleep-mode ablations: article (A100, Qwen3-0.6B <-> Phi-3-vision) vs ours ({device})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs=2, default=["tiny", "tiny"],
                    help="checkpoint directories, or model-factory shapes (tiny, qwen3-0.6b, ...) built under --out")
    ap.add_argument("--switches", type=int, default=5)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.4)
    ap.add_argument("--warmup", choices=["on", "off"], default="off",
                    help="on: a one-token request to each server right after it starts (before its first sleep)")
    ap.add_argument("--quantization", choices=["none", "fp8"], default="none",
                    help="fp8: serve both models with vLLM's online FP8 (CUDA; refused where vLLM has no FP8)")
    ap.add_argument("--out", default="runs/switch-bench")
    ap.add_argument("--verbose", "-v", action="store_true",
                    help="show every library's logs and warnings (vLLM's included) and debug logs")
    args = ap.parse_args(argv)
    from rollout_sleep.log import configure

    configure(args.verbose)  # before vLLM / torch are imported: they read their switches then
    quantization = None if args.quantization == "none" else args.quantization
    try:
        check_quantization(quantization)
    except ValueError as err:  # e.g. FP8 on vLLM's CPU build: said plainly, before anything starts
        print(f"switch_bench: {err}", file=sys.stderr)
        return 2
    kw = {"gpu_memory_utilization": args.gpu_memory_utilization} if sleep_mode_available() else {}
    run_switch_bench(prepare_models(args.models, args.out), args.out, switches=args.switches,
                     modes=args.modes.split(","), max_tokens=args.max_tokens, server_kwargs=kw,
                     warmup=args.warmup == "on", quantization=quantization)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
