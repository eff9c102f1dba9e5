"""None / NaN / inf rewards and the overall reward metrics, as TRL 1.16 has them: None or NaN means "does not
apply to this completion" (the total is a weighted ``nansum``, each reward's mean a ``nanmean``), a completion
no reward scores is reported and gets no advantage, an infinite reward stops the step; the overall metrics are
TRL's ``reward``, ``reward_std`` and ``frac_reward_zero_std``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rollout_sleep.grpo.rewards import combine, resolve_rewards, reward_metrics, reward_summary

from helpers import RECIPE, ROOT


CONFIG = ROOT / "configs" / "tiny-cpu.yaml"
NAN = float("nan")


def test_totals_and_metrics_follow_trl():
    """The same numbers as TRL's ``_generate_and_score_completions`` on a table with None/NaN (its code, inlined:
    ``nansum`` of the weighted rewards, unscorable rows NaN, ``nanmean`` / ``nanstd`` for the metrics, groups
    with zero std counted per completion)."""
    from trl.trainer.utils import nanstd

    table = torch.tensor([[1.0, 0.5], [NAN, 2.0], [NAN, NAN], [0.0, NAN],   # group 1
                          [1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [NAN, 3.0]])  # group 2: all alike
    weights = torch.tensor([1.0, 0.5])
    trl_total = (table * weights).nansum(dim=1)
    trl_total[torch.isnan(table).all(dim=1)] = NAN
    ours = combine(table, weights.tolist())
    assert torch.equal(torch.isnan(ours), torch.isnan(trl_total))
    assert torch.allclose(ours.nan_to_num(-9), trl_total.nan_to_num(-9))
    group_std = nanstd(trl_total.view(-1, 4), dim=1).repeat_interleave(4)
    expected = {"reward": torch.nanmean(trl_total).item(), "reward_std": nanstd(trl_total).item(),
                "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float().mean().item()}
    assert reward_summary(ours, group_size=4) == pytest.approx(expected)
    assert expected["frac_reward_zero_std"] == 0.5  # (sanity: the second group is all alike)
    per_reward = reward_metrics(resolve_rewards(["digits_format", "length_target"]), table)
    assert per_reward["rewards/digits_format/mean"] == pytest.approx(torch.nanmean(table[:, 0]).item())
    assert per_reward["rewards/length_target/std"] == pytest.approx(nanstd(table[:, 1]).item())


def _run(tmp_path: Path, rewards: str, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "row_id": i}) + "\n" for i in range(8)))
    (tmp_path / "rw.py").write_text(textwrap.dedent("""
        def half_nan(completions, row_id, **kwargs):  # NaN for the odd rows
            return [float("nan") if r % 2 else 1.0 for r in row_id]

        def some_none(completions, row_id, **kwargs):  # None for rows 1 and 5 (so nobody scores those)
            return [None if r % 4 == 1 else float(len(c)) for c, r in zip(completions, row_id)]

        def inf_on_row_2(completions, row_id, **kwargs):
            return [float("inf") if r == 2 else 0.0 for r in row_id]
    """))
    out = tmp_path / "run"
    names = ", ".join(f"{tmp_path / 'rw.py'}:{n}" for n in rewards.split(","))
    proc = subprocess.run([sys.executable, str(RECIPE), "--config", str(CONFIG), f"output_dir={out}",
                           f"data.dataset={data}", f"rewards=[{names}]", "train.generations=2", "train.max_tokens=4",
                           "engine.verify_every=0", "wandb.mode=disabled", "train.update_check_every=0",
                           "train.memory_plan=off", *overrides],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    return proc, out


def test_none_and_nan_rewards_do_not_apply_and_unscored_rows_are_named(tmp_path):
    """The old recipe trained on such a reward without a word (and logged the overall mean as reward_mean)."""
    proc, out = _run(tmp_path, "half_nan,some_none", "train.steps=2", "save_every=0", "save_final=true")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert log.count("reward 'half_nan' returned NaN for 8 of 16 completions: NaN counts as None") == 1, log[-3000:]
    for step in (1, 2):
        assert (f"step {step}: no reward scored 4 of 16 completions (every one of half_nan, some_none returned None "
                f"or NaN), of dataset row(s) 1, 5: they get no advantage") in log, log[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rewards/half_nan/mean"] == 1.0 and r["rewards/half_nan/std"] == 0.0  # nanmean, as TRL
        assert r["unscorable"] == 4 and r["rollouts"] == 16
        assert math.isfinite(r["reward"]) and math.isfinite(r["reward_std"]) and 0 <= r["frac_reward_zero_std"] <= 1
        assert "reward_mean" not in r  # one name for the overall reward: TRL's
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
    assert (out / "checkpoints" / "step_2").is_dir()


def test_an_infinite_reward_stops_the_step_before_training(tmp_path):
    proc, out = _run(tmp_path, "inf_on_row_2", "train.steps=2", "save_every=1")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log[-3000:]
    assert ("2 of 16 rewards of step 1 are infinite (from inf_on_row_2; the first for dataset row 2)" in log
            and "nothing was trained at step 1" in log), log[-3000:]
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step_*"))


def test_two_processes_decide_on_the_steps_completions_together(tmp_path):
    """2 processes (gloo), 4 prompts a step, 2 a rank. The reward applies to every row but the two rank 0 draws at
    step 1, so rank 0 alone has no scorable completion while the step has 4 of 8 scored: TRL trains on such a
    step (its check is over all processes' completions), and so does the recipe now. The old code decided on each
    rank's share: rank 0 stopped the run ('no completion of step 1 could be scored') and the launcher killed
    rank 1, which had scored all of its own."""
    from rollout_sleep.grpo.data import step_rows
    from helpers import run_recipe_ranks

    skipped = step_rows(0, 8, 4, seed=0)[0::2]  # rank 0's rows at step 1
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=", "applies": i not in skipped}) + "\n" for i in range(8)))
    rewards = tmp_path / "partial.py"
    rewards.write_text("def partial(completions, applies, **kwargs):\n"
                       "    return [float(len(c)) if a else None for c, a in zip(completions, applies)]\n")
    out = tmp_path / "run"
    proc, log = run_recipe_ranks(
        CONFIG, f"output_dir={out}", f"data.dataset={data}", f"rewards=[{rewards}:partial]", "train.steps=2",
        "train.prompts_per_step=4", "train.generations=2", "train.max_tokens=4", "wandb.mode=disabled",
        "save_every=0", "save_final=false", "engine.verify_every=0", "train.update_check_every=0",
        "train.memory_plan=off")
    assert proc.returncode == 0, log[-4000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["unscorable"], r["rollouts"]) for r in rows] == [(1, 4, 8), (2, 0, 8)], rows
    shown = ", ".join(map(str, sorted(skipped)))
    assert log.count(f"step 1: no reward scored 4 of 8 completions (every one of partial returned None or NaN), of "
                     f"dataset row(s) {shown}") == 1, log[-4000:]  # said once, for the whole step
