"""The watchdog under torchrun (2 processes, gloo, CPU; no engine): a rank stalled in a phase, or a rank
left waiting at a collective, ends the run non-zero within its timeout, naming the phase, the rank and what
it waited for, with every thread's stack."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from rollout_sleep.run.watchdog import EXIT_CODE, STALL_ENV

from helpers import RECIPE, ROOT, WORKERS, run_launch, run_ranks, two_ranks


WORKER = WORKERS / "watchdog_worker.py"


def torchrun(generate_s: float, collective_s: float, stall: str | None) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != STALL_ENV}
    if stall:
        env[STALL_ENV] = stall
    with two_ranks() as torchrun:
        t0 = time.perf_counter()
        proc = run_launch([*torchrun, str(WORKER), str(generate_s), str(collective_s)], timeout=300, env=env)
        return proc, time.perf_counter() - t0


@pytest.mark.parametrize("generate_s, collective_s, rank, phase, waited_for", [
    # rank 1 hangs in generate: its own watchdog stops it
    (4, 120, 1, "generate", "vLLM to generate for 4 prompt(s), n=2"),
    # generate unwatched (0): rank 0, waiting at the gather for rank 1, stops the run
    (0, 4, 0, "collective", "all 2 ranks to reach the reward gather of step 1"),
])
def test_a_stalled_rank_stops_the_run_with_the_phase_and_stacks(generate_s, collective_s, rank, phase,
                                                               waited_for):
    proc, seconds = torchrun(generate_s, collective_s, stall="1:generate:600")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    timeout = generate_s or collective_s
    assert f"watchdog: rank {rank} of 2 spent more than {timeout:g} s in phase '{phase}' (waiting for " \
           f"{waited_for}); stopping the run (exit code {EXIT_CODE})" in out, out[-3000:]
    assert f"set watchdog.{phase}_s higher" in out
    assert "most recent call first" in out and "watchdog_worker.py" in out, out[-3000:]  # faulthandler's stacks
    assert seconds < 90, seconds  # the timeout plus start-up, not the 600 s stall nor torch's own timeout


@pytest.mark.slow
def test_recipe_rank_stalled_in_generate_stops_the_run(tmp_path, request):
    """The real recipe under torchrun (2 ranks, an engine each): rank 1 hangs in generate; the run ends
    within watchdog.generate_s (plus start-up) with the phase named, instead of rank 0 waiting forever."""
    if "slow" not in (request.config.getoption("-m") or ""):
        pytest.skip("slow (two engines start): run with -m slow")
    proc = run_ranks([str(RECIPE), "--config", str(ROOT / "configs" / "tiny-cpu.yaml"),
                      f"output_dir={tmp_path / 'run'}", "train.steps=3", "wandb.mode=disabled",
                      "watchdog.generate_s=60"], timeout=900,
                     env={**os.environ, STALL_ENV: "1:generate:900", "VLLM_LOGGING_LEVEL": "WARNING"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "watchdog: rank 1 of 2 spent more than 60 s in phase 'generate' (waiting for vLLM to generate for " \
           "4 prompt(s), n=8)" in out, out[-3000:]
    assert "in rollout" in out and "most recent call first" in out  # the stalled thread's stack
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped at its first generate


def test_a_huge_watchdog_timeout_means_no_limit_not_a_crash():
    """``watchdog.train_s=1e12`` ("never") overflowed the timers: the first watched phase raised OverflowError
    and the watchdog's thread died (no phase was watched any more)."""
    from rollout_sleep.run.watchdog import Watchdog

    wd = Watchdog({"train": 1e12, "save": 1.0})
    with wd.phase("train", "a long thing"):
        pass
    with wd.phase("save", "a short thing", timeout=1e300):
        pass
    assert wd._thread.is_alive()
    wd.close()


NESTED = textwrap.dedent('''
    import sys, time
    from rollout_sleep.run.watchdog import Watchdog

    before, inner_limit, inner_s, after = (float(x) for x in sys.argv[1:])
    wd = Watchdog({"outer": 2.0, "inner": inner_limit}, grace_s=30)
    with wd.phase("outer", "the outer block"):
        time.sleep(before)
        with wd.phase("inner", "the inner block"):
            time.sleep(inner_s)
        time.sleep(after)
    wd.close()
    print("finished")
''')


@pytest.mark.parametrize("before, inner_limit, inner_s, after, blamed", [
    (0.2, 0.0, 3.0, 0.2, None),  # an unwatched inner phase longer than the outer's limit: the outer is paused
    (0.2, 1.0, 3.0, 0.2, "inner"),  # a watched inner phase that stalls: named, under its own limit
    (1.2, 0.0, 1.0, 1.5, "outer"),  # the outer's clock runs on after the inner phase (not started over)
])
def test_nested_phases_blame_the_innermost(before, inner_limit, inner_s, after, blamed):
    proc = subprocess.run([sys.executable, "-c", NESTED, str(before), str(inner_limit), str(inner_s), str(after)],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    if blamed is None:
        assert proc.returncode == 0 and "finished" in out, out
    else:
        assert proc.returncode == EXIT_CODE and f"in phase '{blamed}'" in out and "finished" not in out, out


HOLDS_THE_GIL = textwrap.dedent('''
    import re
    from rollout_sleep.run.watchdog import Watchdog

    wd = Watchdog({"reward": 1.0}, grace_s=4, hint="set watchdog.{phase}_s higher")
    with wd.phase("reward", "the rewards (parse) to score 32 completions of step 1"):
        re.match(r"(a+)+$", "a" * 60 + "b")  # backtracks for ages, holding the GIL: the watchdog's thread cannot run
    print("finished")
''')


def test_a_stall_that_holds_the_gil_is_named_with_its_phase():
    """A reward whose regular expression backtracks without end holds the GIL: the watchdog's thread cannot run.
    The old watchdog then left it to faulthandler's backstop, which printed ``Timeout (0:00:45)!`` and the
    stacks (exit code 1) with no phase named; a helper process now names it before the backstop fires."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", HOLDS_THE_GIL], capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "finished" not in out, out[-3000:]
    said = ("rollout_sleep watchdog: the process spent more than 1 s in phase 'reward' (waiting for the rewards "
            "(parse) to score 32 completions of step 1) and does not answer: the code it runs holds Python's "
            "interpreter lock")
    assert said in out and "set watchdog.reward_s higher" in out, out[-3000:]
    assert out.index(said) < out.index("Timeout (") and "in <module>" in out  # then the backstop's stacks
    assert seconds < 60, seconds  # the deadline plus the grace, not the regular expression's hours
