"""Bring your own task: the shipped GSM8K example (reward functions by import path, a reward model,
conversational data) run by the recipe and by TRL's GRPOTrainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rollout_sleep.grpo.data import load_prompts
from rollout_sleep.grpo.loss import group_advantages
from rollout_sleep.grpo.rewards import combine, resolve_rewards, score_rewards

from helpers import RECIPE, ROOT, WORKERS


DATA = "examples/gsm8k/data.jsonl"
REWARDS = "examples/gsm8k/rewards.py"


CONFIG = ROOT / "configs" / "example-gsm8k.yaml"


def run_json(cmd: list[str], tag: str) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith(tag)]
    assert proc.returncode == 0 and line, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(line[-1][len(tag):])


@pytest.mark.slow  # ~2 min alone on 2 cores (TRL's trainer + vLLM in a subprocess); the recipe run below is in CI
def test_same_files_run_in_trl_as_in_the_recipe(in_root, tmp_path, ckpts, reward_ckpt):
    """The example's JSONL and reward module, unchanged, with a reward model beside them: TRL's GRPOTrainer
    trains on them, and our scoring reproduces TRL's rewards and advantages on TRL's own batch."""
    trl = run_json([sys.executable, str(WORKERS / "trl_own_task_worker.py"), ckpts["tied0"],
                    str(tmp_path / "trl"), DATA, REWARDS, reward_ckpt], "RESULT ")
    assert trl["ok"], trl["error"]
    batch = trl["batch"]
    by_prompt = {json.dumps(r["prompt"]): r for r in load_prompts(DATA)}
    rows = [by_prompt[json.dumps(p)] for p in batch["prompt"]]
    assert batch["completion"][0][0]["role"] == "assistant"  # TRL's conversational completions, as ours
    rewards = resolve_rewards([f"{REWARDS}:gsm8k_correct", f"{REWARDS}:gsm8k_format", reward_ckpt], [1.0, 0.2, 0.5],
                              columns=["prompt", "answer"])
    table = score_rewards(rewards, batch["prompt"], batch["completion"], rows)
    for j, r in enumerate(rewards):
        assert table[:, j].tolist() == pytest.approx(batch["rewards"][r.name], abs=1e-4), r.name
    adv = group_advantages(combine(table, [r.weight for r in rewards]), group_size=4)
    assert adv.tolist() == pytest.approx(batch["advantages"], abs=1e-3)


def test_example_runs_end_to_end_with_a_reward_model(in_root, tmp_path, reward_ckpt):
    """The example config (the same files TRL trained on above), plus the reward model, through the recipe."""
    out = tmp_path / "recipe"
    proc = subprocess.run([sys.executable, str(RECIPE), "--config", str(CONFIG),
                           f"output_dir={out}", "train.steps=2", "reward_weights=[1.0, 0.2, 0.5]",
                           f"rewards=[{REWARDS}:gsm8k_correct, {REWARDS}:gsm8k_format, {reward_ckpt}]"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rewards/gsm8k_correct/mean"] == 0.0 and r["rewards/rm/std"] > 0 and r["unscorable"] == 0
        assert r["reward"] == pytest.approx(0.2 * r["rewards/gsm8k_format/mean"] + 0.5 * r["rewards/rm/mean"]
                                            + r["rewards/gsm8k_correct/mean"], abs=1e-5)
        assert r["sampling_logp_diff"] < 1e-3 and r["reward_s"] > 0
