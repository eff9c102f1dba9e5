"""`rollout-sleep switch-bench` end to end on CPU: two real tiny-model servers, all three modes."""

import json
import os
import subprocess
import sys


def test_switch_bench_runs_all_modes_and_leaves_no_server(tmp_path):
    out = tmp_path / "sw"
    proc = subprocess.run([sys.executable, "-m", "rollout_sleep.cli", "switch-bench", "--switches", "1",
                           "--max-tokens", "8", "--out", str(out)], capture_output=True, text=True, timeout=800,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((out / "switch_bench.json").read_text())
    assert list(result["modes"]) == ["level1", "level2", "cold"]
    for mode, r in result["modes"].items():
        (row,) = r["rows"]
        assert row["switch_s"] > 0 and row["first_inference_s"] > 0, mode
    assert list(result["modes"]["level2"]["rows"][0]["phases_s"]) == [
        "sleep", "wake_weights", "load", "wake_kv_cache", "reset"]  # level 2 reloads, then resets
    assert "load" not in result["modes"]["level1"]["rows"][0]["phases_s"]
    assert (out / "switch_bench.png").stat().st_size > 0
    assert "| cold |" in proc.stdout
    assert str(out) not in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
