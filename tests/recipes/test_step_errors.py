"""Errors a user's own run meets late, said early or said plainly: a reward that raises or returns the wrong thing
stops the run with one message naming the reward, the step and what it returned (no raw ``[rank0]`` traceback
on the console: it goes to the run's log); ``wandb.mode=online`` without credentials is refused before vLLM
starts; a slow reward is blamed on the reward phase by the watchdog, not on the training. (The units behind them:
the run's log files in tests/run/test_output_dir.py, wandb's credentials in tests/integrations/test_wandb.py, nested
watchdog phases in tests/run/test_watchdog.py.)"""

from __future__ import annotations

from rollout_sleep.run.watchdog import EXIT_CODE

from workers.recipe_cli import ENGINE_START, run, start

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
    it did named after ``error: step 1:``, no traceback on the console, the reward's own traceback in run.log, and
    (one tracked by W&B) what the run logged kept in its W&B file.
    A slow reward (started alongside, to share the engine start-up time) trips the watchdog in phase 'reward'
    after watchdog.reward_s, although watchdog.train_s is shorter: the old code had no reward phase and blamed
    "forward, backward, optimizer step"."""
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    cases = {"raises": ("error: step 1: reward 'raises' raised ValueError: the judge is down on completion 0",),
             "too_few": ("error: step 1: reward 'too_few' returned 1 rewards for 32 completions",),
             "words": ("error: step 1: reward 'words' returned 'good' (a str) for completion 0",)}
    procs = {name: start(tmp_path / name, *SMALL, f"rewards=[{tmp_path / 'my_rewards.py'}:{name}]",
                         *(["wandb.mode=offline"] if name == "too_few" else []), accelerate=name == "raises")
             for name in cases}
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
        assert "Traceback (most recent call last)" in log and "rollout_sleep.grpo.errors.RewardError" in log
    assert "my_rewards.py" in (tmp_path / "raises" / "run.log").read_text()  # the user's line that raised
    # the failed run's W&B file keeps what was logged (its config at least): the exit skipped wandb's own hook, and
    # the file held its 7-byte header only
    (run_file,) = (tmp_path / "too_few" / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"my_rewards.py" in run_file.read_bytes(), run_file.stat().st_size
    out = slow.communicate(timeout=900)[0]
    assert slow.returncode == EXIT_CODE, out[-3000:]
    assert "spent more than 25 s in phase 'reward' (waiting for the rewards (slow) to score the 32 completions of " \
           "step 1)" in out, out[-3000:]
    assert "set watchdog.reward_s higher" in out and "phase 'train'" not in out


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


def test_a_wandb_server_that_cannot_be_reached_stops_the_run_before_the_engine_starts(tmp_path):
    """A key, but no server behind WANDB_BASE_URL: wandb.init retries, then raises. The old code opened W&B after
    vLLM had started (on a GPU, after the engine's minute of start-up) and ended in a raw CommError."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "WANDB_CONFIG_DIR": str(home / ".config" / "wandb"), "NETRC": str(home / ".netrc"),
           "WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_INIT_TIMEOUT": "5"}
    code, out = run(tmp_path / "run", *SMALL, "wandb.mode=online", timeout=300, **env)
    assert code == 2, out[-3000:]
    assert "error: wandb.mode=online: W&B could not start the run (CommError: " in out, out[-3000:]
    assert "127.0.0.1:9" in out and "wandb.mode=offline" in out
    assert ENGINE_START not in out and "Traceback" not in out
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_reward_that_exits_or_is_interrupted_ends_in_one_message(tmp_path):
    """A reward calling ``sys.exit()`` at step 1: the old code ended the run with exit code 0 and no message (as if
    it had finished). A ``KeyboardInterrupt`` in a step (Ctrl-C while the rewards score): the old code printed a
    raw ``[rank0]`` traceback and no word on where to go on from. Now: exit 1 naming the reward, exit 130
    saying the interrupt and the checkpoint a rerun resumes from; tracebacks in run.log."""
    (tmp_path / "stopping_rewards.py").write_text(
        "import sys\n\n\ndef exits(prompts, completions, **kwargs):\n    sys.exit(0)\n\n\n"
        "def interrupted(completion, example):\n    raise KeyboardInterrupt\n")
    procs = {name: start(tmp_path / name, *SMALL, f"rewards=[{tmp_path / 'stopping_rewards.py'}:{name}]")
             for name in ("exits", "interrupted")}
    outs = {name: p.communicate(timeout=900)[0] for name, p in procs.items()}
    out = outs["exits"]
    assert procs["exits"].returncode == 1, out[-3000:]
    assert "error: step 1: reward 'exits' raised SystemExit (it called sys.exit(0)); a reward must return its " \
           "scores (or raise), never exit the process on a batch of 32 completions" in out, out[-3000:]
    out = outs["interrupted"]
    assert procs["interrupted"].returncode == 130, out[-3000:]
    assert "error: step 1: interrupted (KeyboardInterrupt). The run stopped; no checkpoint was saved yet (a rerun " \
           f"starts at step 0). The traceback is in {tmp_path / 'interrupted' / 'run.log'}" in out, out[-3000:]
    for name, out in outs.items():
        assert "Traceback" not in out and "[rank0]" not in out, (name, out[-3000:])
        assert "Traceback (most recent call last)" in (tmp_path / name / "run.log").read_text()
