"""`benchmarks/switch_bench.py` end to end on CPU: two real tiny-model servers, all three modes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import BENCHMARKS, benchmark


@pytest.mark.slow  # ~100 s of real server starts (two models, three modes): a benchmark script's end-to-end run
def test_switch_bench_runs_all_modes_and_leaves_no_server(tmp_path):
    out = tmp_path / "sw"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "switch_bench.py"), "--switches", "1",
                           "--max-tokens", "8", "--warmup", "on", "--out", str(out)], capture_output=True, text=True,
                          timeout=800,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((out / "switch_bench.json").read_text())
    assert list(result["modes"]) == ["level1", "level2", "cold"]
    for mode, r in result["modes"].items():
        (row,) = r["rows"]
        assert row["switch_s"] > 0 and row["first_inference_s"] > 0 and row["second_inference_s"] > 0, mode
    assert result["warmup"] is True and all(w > 0 for w in result["warmup_s"])  # one request before the 1st sleep
    assert result["initial_load_s"] == [s + w for s, w in zip(result["startup_s"], result["warmup_s"])]
    assert list(result["modes"]["level2"]["rows"][0]["phases_s"]) == [
        "sleep", "wake_weights", "load", "wake_kv_cache", "reset"]  # level 2 reloads, then resets
    assert "load" not in result["modes"]["level1"]["rows"][0]["phases_s"]
    assert (out / "switch_bench.png").stat().st_size > 0
    assert "| cold |" in proc.stdout
    assert str(out) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout


def test_ablation_tables_put_ours_beside_the_articles_figures(tmp_path):
    """The article's figures as published, our arms' figures from switch-bench results (pure logic)."""
    bench = benchmark("switch_bench")

    def run(first_a, first_b, load):
        rows = [{"to": m, "switch_s": 0.3, "wake_s": 0.2, "first_inference_s": f, "second_inference_s": 0.1}
                for m, f in (("A", first_a), ("B", first_b))]
        per = {r["to"]: {k: r[k] for k in ("switch_s", "wake_s", "first_inference_s", "second_inference_s")}
               for r in rows}
        return {"models": ["A", "B"], "initial_load_s": [load, load], "warmup_s": [1.0, 2.0],
                "modes": {"level1": {"rows": rows, "total_s": 1.0, "median_second_inference_s": 0.1,
                                     "per_model_median": per}}}

    on, off = bench.ablation_figures(run(0.5, 1.0, 40.0)), bench.ablation_figures(run(2.0, 5.0, 30.0))
    assert on["first_inference_s"] == [0.5, 1.0] and on["initial_load_s"] == 80.0 and on["total_s"] == 81.0
    assert on["warmup_s"] == 3.0
    table = bench.ablation_markdown({"bf16_warmup": on, "bf16_no_warmup": off, "fp8_warmup": on})
    assert "| first inference after a wake, A / B (s) | 0.45 / 0.93 | 2.59 / 6.61 | 5.76x / 7.11x | " \
           "0.50 / 1.00 | 2.00 / 5.00 | 4.00x / 5.00x |" in table
    assert "| wake, A / B (s) | 0.27 / 0.90 | 0.18 / 0.78 | 0.67x / 0.87x | 0.20 / 0.20 | 0.20 / 0.20 |" in table
    assert bench.ARTICLE_A100["quantization"]["fp8"]["initial_load_s"] == 96.9
    assert "FP8" not in bench.ablation_markdown({"bf16_warmup": on, "bf16_no_warmup": off})  # an arm left out


def test_fp8_refused_on_cpu_before_anything_starts(tmp_path):
    with pytest.raises(ValueError, match="quantization='fp8' is not available here"):
        benchmark("switch_bench").run_switch_bench(["tiny", "tiny"], tmp_path / "sw", quantization="fp8")
    assert not (tmp_path / "sw").exists()  # refused before anything was written or started
