"""The soak: a CI-sized run, and proof that its stale-prefix probe catches a missing cache reset."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def run(code: str, tmp=None) -> str:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING", **({"TMPDIR": str(tmp)} if tmp else {})}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    return proc.stdout + proc.stderr


def test_soak_30_cycles_then_its_probe_catches_a_missing_prefix_cache_reset(tmp_path):
    """One interpreter for both soaks (vLLM, torch and transformers load once): a CI-sized run (verify on
    every cycle, bounded RSS), then the same soak with the engine's prefix-cache reset disabled, which its
    stale-prefix probe must catch."""
    out, work = tmp_path / "soak.json", tmp_path / "work"
    work.mkdir()
    log = run(f"from rollout_sleep.cli.soak import run_soak; import os; run_soak(30, out={str(out)!r}, quiet=True); "
              "print('SOAK OK', flush=True)\n"
              "from rollout_sleep.engine import engine\nengine.Engine._reset_prefix_cache = lambda self: None\n"
              "try:\n    run_soak(8, quiet=True, warmup=0)\n    print('NOT CAUGHT')\n"
              "except AssertionError as e:\n    print('CAUGHT', e)\nos._exit(0)", tmp=work)
    assert "SOAK OK" in log, log[-3000:]
    result = json.loads(out.read_text())
    assert result["verify_passed"] == 30
    # Bound: 64 MiB of RSS growth over the 20 cycles after 10 warm-up cycles (measured 0.0 MiB over 60 and
    # 1000 cycles): a leak of more than ~3 MiB a cycle fails it (30 cycles, not 50: CI time).
    assert result["memory_growth_after_warmup_mib"] <= 64
    assert sum(r["awake_update"] for r in result["rows"]) == 7  # every 4th cycle updates awake
    assert "CAUGHT cycle 4: stale prefix" in log, log[-3000:]
    assert not list(work.glob("rollout-sleep-soak-*")), "the soak left its checkpoint in the temp folder"


def test_soak_refuses_zero_cycles_before_building_anything():
    from rollout_sleep.cli.soak import run_soak

    with pytest.raises(ValueError, match="cycles must be at least 1, got 0"):
        run_soak(0)
