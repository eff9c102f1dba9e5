"""Errors a user's own run meets late, said early or said plainly: a reward that raises or returns the wrong thing
stops the run with one message naming the reward, the step and what it returned (no raw ``[rank0]`` traceback
on the console: it goes to the run's log); ``wandb.mode=online`` without credentials is refused before vLLM
starts; a slow reward is blamed on the reward phase by the watchdog, not on the training."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from recipe_cli import ENGINE_START, run, start
from rollout_sleep.integrations.wandb import credentials_problem
from rollout_sleep.watchdog import EXIT_CODE

REWARDS = '''
import time


def raises(completion, example):
    raise ValueError("the judge is down")


def too_few(prompts, completions, **kwargs):
    return [1.0]


def words(prompts, completions, **kwargs):
    return ["good"] * len(completions)


def slow(completion, example):
    time.sleep(600)
    return 0.0
'''
SMALL = ("train.steps=2", "train.prompts_per_step=4", "data.num_prompts=8")


def test_a_failing_reward_ends_the_run_with_one_message_and_its_traceback_in_the_log(tmp_path):
    """Three rewards that fail at step 1, one under ``accelerate launch``: each exits 1 with the reward and what
    it did named after ``error: step 1:``, no traceback on the console, the reward's own traceback in run.log.
    A slow reward (started alongside, to share the engine start-up time) trips the watchdog in phase 'reward'
    after watchdog.reward_s, although watchdog.train_s is shorter: the old code had no reward phase and blamed
    "forward, backward, optimizer step"."""
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    cases = {"raises": ("error: step 1: reward 'raises' raised ValueError: the judge is down on completion 0",),
             "too_few": ("error: step 1: reward 'too_few' returned 1 rewards for 32 completions",),
             "words": ("error: step 1: reward 'words' returned 'good' (a str) for completion 0",)}
    procs = {name: start(tmp_path / name, *SMALL, f"rewards=[{tmp_path / 'my_rewards.py'}:{name}]",
                         accelerate=name == "raises") for name in cases}
    slow = start(tmp_path / "slow", *SMALL, f"rewards=[{tmp_path / 'my_rewards.py'}:slow]", "watchdog.reward_s=25",
                 "watchdog.train_s=10")
    outs = {name: p.communicate(timeout=900)[0] for name, p in procs.items()}
    for name, said in cases.items():
        out = outs[name]
        assert procs[name].returncode == 1, (name, out[-3000:])
        for text in said:
            assert text in out, (name, text, out[-3000:])
        assert "The run stopped; no checkpoint was saved yet (a rerun starts at step 0)." in out
        assert f"The traceback is in {tmp_path / name / 'run.log'}" in out, out[-3000:]
        assert "Traceback" not in out and "[rank0]" not in out, (name, out[-3000:])
        log = (tmp_path / name / "run.log").read_text()
        assert "Traceback (most recent call last)" in log and "rollout_sleep.rewards.RewardError" in log
    assert "my_rewards.py" in (tmp_path / "raises" / "run.log").read_text()  # the user's line that raised
    out = slow.communicate(timeout=900)[0]
    assert slow.returncode == EXIT_CODE, out[-3000:]
    assert "spent more than 25 s in phase 'reward' (waiting for the rewards (slow) to score the 32 completions of " \
           "step 1)" in out, out[-3000:]
    assert "set watchdog.reward_s higher" in out and "phase 'train'" not in out


def test_the_log_files_belong_to_the_run(tmp_path):
    """overwrite=true deletes the earlier run's log files with its other files (a new run's log starts clean)."""
    from rollout_sleep import run_dir
    from rollout_sleep.config_schema import RecipeConfig

    run_dir.write_run_config(tmp_path, RecipeConfig().to_dict())
    for rank in (0, 1):
        run_dir.log_file(tmp_path, rank).write_text("an earlier run's log\n")
    (tmp_path / "notes.log").write_text("the user's own\n")
    assert run_dir.clear_run(tmp_path, RecipeConfig().to_dict()) == ["run_config.json", "run.log", "run.rank1.log"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.log"]


def test_wandb_online_without_credentials_is_refused_before_the_engine_starts(tmp_path):
    """No API key anywhere wandb looks (a fresh HOME): the old code started vLLM, then failed in wandb.init."""
    home = tmp_path / "home"
    home.mkdir()
    clean = {"HOME": str(home), "WANDB_CONFIG_DIR": str(home / ".config" / "wandb"), "NETRC": str(home / ".netrc"),
             "WANDB_API_KEY": "", "WANDB_IDENTITY_TOKEN_FILE": ""}
    code, out = run(tmp_path / "run", *SMALL, "wandb.mode=online", timeout=300, **clean)
    assert code == 2, out[-3000:]
    assert "error: wandb.mode=online but wandb has no API key here" in out and "`wandb login`" in out
    assert "WANDB_API_KEY" in out and "wandb.mode=offline" in out
    assert ENGINE_START not in out and "Traceback" not in out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_wandb_credentials_are_found_where_wandb_looks(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb"))
    monkeypatch.delenv("NETRC", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert credentials_problem("disabled") is None and credentials_problem("offline") is None
    assert "has no API key" in credentials_problem("online")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert credentials_problem("online") is None
    monkeypatch.setenv("WANDB_API_KEY", "short")
    assert "cannot use its credentials" in credentials_problem("online")


NESTED = textwrap.dedent('''
    import sys, time
    from rollout_sleep.watchdog import Watchdog

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
