"""The demo end to end (real engine, CPU) and the pure pieces it uses."""

import re
import subprocess
import sys

import torch

from rollout_sleep.grpo.loss import group_advantages, grpo_loss, pad_batch
from rollout_sleep.grpo.rewards import score


def test_demo_reward_rises_and_output_is_quiet():
    # The command a newcomer runs, in a subprocess (the demo starts its own engine; one per process).
    proc = subprocess.run([sys.executable, "-m", "rollout_sleep.cli.main", "demo", "--steps", "12"],
                          capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    summary = re.search(r"mean reward: first 3 steps ([\d.]+) -> last 3 steps ([\d.]+); "
                        r"verify passed after all 12 syncs", proc.stdout)
    assert summary, output[-3000:]
    first, last = map(float, summary.groups())
    # Measured: first-3 mean 0.03, last-3 mean 0.57 (seed 0). A random tiny model starts near 0.03
    # (~10 digit tokens of 320); require a clear rise, well above step-to-step noise (~0.05).
    assert last > first + 0.2, (first, last)
    # Quiet by default: no library's warning line (vLLM's per-step "sleep mode is not supported on CPU",
    # torch's / DeepSpeed's start-up notes, Python FutureWarnings): see rollout_sleep.log.BENIGN.
    noisy = [ln for ln in output.splitlines() if re.search(r"warn", ln, re.IGNORECASE)]
    assert not noisy, noisy[:10]


def test_grpo_pieces():
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 2.0]), group_size=2)
    assert adv[:2].abs().max() == 0 and adv[2] < 0 < adv[3]
    ids, attn, positions, mask = pad_batch([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[1, 2, 4, 5, 6], [0, 3, 7, 0, 0]]  # completions start at one column
    assert positions[1, 1:3].tolist() == [0, 1] and attn[1].tolist() == [0, 1, 1, 0, 0]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert logp.grad[0, 1] < 0 < logp.grad[1, 0] and logp.grad[1, 1] == 0 and stats["clip_frac"] == 0.0


def test_rewards_sum_by_name():
    assert score(["arithmetic_exact", "digits_format"], ["7", "x"], [{"answer": "7"}, {"answer": "1"}]) == [2.0, 0.0]
