"""``rollout-sleep switch-bench``: two ``vllm serve`` models, one awake at a time, switched A→B→A→B…

Modes (the published sleep-mode benchmark's):
- ``level1``: sleep the current server at level 1, wake the other (weights come back from host memory;
  no reload, no reset needed);
- ``level2``: sleep at level 2, wake the other in the memory-safe order: weights → reload from its
  checkpoint path → KV cache → reset the prefix cache;
- ``cold``: no sleep: stop the current server, start the other from scratch.
Each switch is followed by one inference with a fresh prompt (its time is reported on its own).
The two sleep modes share the two servers (started once, their start-up timed apart); ``cold`` then
starts from the server left awake. Writes ``switch_bench.json``, ``switch_bench.png`` and prints a table.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from . import versions
from .remote import RemoteEngine
from .server import ServerProcess

MODES = ("level1", "level2", "cold")


def prepare_models(models: list[str], out_dir: str | Path) -> list[str]:
    """Checkpoint directories as given; a model-factory shape name becomes a random-weight checkpoint
    under ``out_dir/models`` (seed = its position; the tiny shape untied: on CPU a path reload of a tied
    model keeps a stale LM head)."""
    from .checkpoints import SHAPES, make_checkpoint

    paths = []
    for i, m in enumerate(models):
        if Path(m).is_dir() or m not in SHAPES:
            paths.append(m)
            continue
        dest = Path(out_dir) / "models" / f"{m}-seed{i}"
        if not (dest / "config.json").exists():
            make_checkpoint(dest, m, seed=i, tie_word_embeddings=False if m == "tiny" else None,
                            dtype="float32" if m == "tiny" else "bfloat16")
        paths.append(str(dest))
    return paths


def _gpu_used_mib() -> float | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def _infer(engine: RemoteEngine, i: int, max_tokens: int) -> float:
    t0 = time.perf_counter()
    engine.generate([f"Switch {i}: what is {i} plus {7 * i + 3}? Answer:"], max_tokens=max_tokens, temperature=0.0)
    return time.perf_counter() - t0


def run_switch_bench(models: list[str], out_dir: str | Path, *, switches: int = 5, modes=MODES,
                     max_tokens: int = 32, server_kwargs: dict | None = None) -> dict:
    """Run the A↔B workload for each mode; returns (and writes) the results."""
    if len(models) != 2:
        raise ValueError(f"switch-bench needs exactly two models, got {len(models)}")
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(server_kwargs or {})
    result: dict = {"models": models, "switches": switches, "max_tokens": max_tokens, "modes": {},
                    "versions": versions(), "device": _device()}
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
                                 "phases_s": {**slept.seconds, **woke.seconds}, "gpu_used_mib": _gpu_used_mib(),
                                 "first_inference_s": _infer(engines[nxt], s, max_tokens)})
                    current = nxt
                result["modes"][mode] = _summarize(rows)
                (out / "switch_bench.json").write_text(json.dumps(result, indent=1))
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
                             "phases_s": {"stop_and_start": switch_s}, "gpu_used_mib": _gpu_used_mib(),
                             "first_inference_s": _infer(engine, s, max_tokens)})
                current = nxt
            result["modes"]["cold"] = _summarize(rows)
            print(f"cold: median switch {result['modes']['cold']['median_switch_s']:.3f} s", flush=True)
    finally:
        for srv in servers:
            srv.stop()
    modes_done = result["modes"]
    if "cold" in modes_done and "level2" in modes_done:
        result["level2_speedup_vs_cold"] = modes_done["cold"]["median_switch_s"] / modes_done["level2"]["median_switch_s"]
    (out / "switch_bench.json").write_text(json.dumps(result, indent=1))
    table = markdown_table(result)
    (out / "switch_bench.md").write_text(table + "\n")
    print(table, flush=True)
    _chart(result, out / "switch_bench.png")
    return result


def _summarize(rows: list[dict]) -> dict:
    return {"rows": rows, "total_s": sum(r["switch_s"] + r["first_inference_s"] for r in rows),
            "median_switch_s": statistics.median(r["switch_s"] for r in rows),
            "median_first_inference_s": statistics.median(r["first_inference_s"] for r in rows)}


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


def _device() -> str:
    if shutil.which("nvidia-smi"):
        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            pass
    return "cpu"
