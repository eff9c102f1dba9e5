"""`benchmarks/grpo_vs_trl.py`: its record of an arm stopped from outside (a device call's time limit), and its
arms' overrides checked by the recipe's config (a misspelt key would cost a GPU lease its arm)."""

from __future__ import annotations

import json
import os
import time

import pytest

from helpers import benchmark


def test_an_arm_stopped_from_outside_keeps_the_steps_its_child_finished(tmp_path):
    """Pure logic: the finished steps come from the arm's progress file (the recipe's metrics, the TRL child's
    steps), with their median past the warm-up; a file from before the arm started is an earlier run's, not read."""
    bench = benchmark("grpo_vs_trl")
    rows = [{"step": i + 1, "step_s": s} for i, s in enumerate([30.0, 5.0, 3.0, 4.0, 3.5])]
    for arm in ("ours_eager", "trl_compile"):
        path = bench.progress_file(tmp_path, arm)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        got = bench.partial_arm(tmp_path, arm, "stopped from outside (signal 15) while the arm ran", time.time() - 5)
        assert got["steps_done"] == 5 and got["step_s"][0] == 30.0 and got["median_step_s_partial"] == 3.5
        assert got["error"].startswith("stopped from outside")
        stale = time.time() - 3600
        os.utime(path, (stale, stale))
        assert bench.partial_arm(tmp_path, arm, "stopped", time.time() - 5)["steps_done"] == 0
    assert bench.partial_arm(tmp_path, "trl", "stopped", 0.0) == {"error": "stopped", "steps_done": 0, "rows": [],
                                                                  "step_s": []}


@pytest.mark.parametrize("size", ["qwen3-0.6b", "qwen3-4b", "qwen3-8b", "qwen3-14b"])
@pytest.mark.parametrize("optim", [None, "adamw", "adamw8bit_sr"])
def test_every_arm_is_a_config_the_recipe_accepts_on_cuda(size, optim):
    """Each of our arms with the overrides the benchmark gives it, checked as on the GPU. Only a missing optional
    package (bitsandbytes, a CUDA build here) is let through."""
    from rollout_sleep.run.config import ConfigError, load_config

    bench = benchmark("grpo_vs_trl")
    refused = {}
    for arm in bench.OURS_ARMS:
        try:
            load_config(str(bench.config_path(size)), list(bench.arm_overrides(arm, size, optim)), device="cuda")
        except ConfigError as err:
            problems = [p for p in err.problems if "is not installed" not in p]
            if problems:
                refused[arm] = problems
    assert not refused, refused
