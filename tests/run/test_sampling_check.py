"""The sampling correction's warning: a step whose mean sample weight is low (an FP8 engine beside a bf16 trainer
masked ~97 % of the completions on an H100, and nothing said so) warns with the numbers, causes and fixes, once,
then reminds rarely; a normal run says nothing."""

from __future__ import annotations

import logging

import pytest
import torch

from rollout_sleep.run.sampling_check import SamplingCheck

LOGGER = "rollout_sleep.run.sampling_check"
# the H100 measurement: FP8 engine, bf16 trainer, sequence_mask capped at 3
FP8_ROW = {"sampling_weight_mean": 0.025, "sampling_masked_sequences": 0.97, "sampling_masked_tokens": 0.975,
           "sampling_logp_diff": 0.31, "sampling_ratio": 1.21, "loss": 0.1}
NORMAL_ROW = {"sampling_weight_mean": 0.98, "sampling_masked_sequences": 0.01, "sampling_masked_tokens": 0.02,
              "sampling_logp_diff": 0.004, "sampling_ratio": 1.0}


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def test_a_mostly_masked_step_warns_with_its_numbers_causes_and_fixes(caplog):
    check = SamplingCheck("sequence_mask", None, 3.0, verify_every=1)
    with caplog.at_level(logging.WARNING, LOGGER):
        assert check.observe(7, FP8_ROW) == {"sampling_weight_low": 1.0}
    [msg] = _warnings(caplog)
    assert msg == check.message
    for part in ["step 7: sampling_weight_mean=0.025, below 0.5",
                 "train.sampling_correction=sequence_mask", "outside [-inf, 3]",
                 "train.sampling_clip_min=None, train.sampling_clip_max=3.0",
                 "97.0% of the step's completions and 97.5% of its completion tokens",
                 "trained on about 2.5% of what it sampled", "by 0.31 per token", "sampling_ratio=1.21",
                 "compounds", "FP8", "engine.verify_every=1", "temperature/top-p",
                 "model.path", "train.sampling_correction=token_truncate",
                 "train.sampling_correction=sequence_truncate", "train.sampling_clip_max",
                 "train.sampling_correction=none"]:
        assert part in msg, (part, msg)


def test_a_normal_run_says_nothing(caplog):
    check = SamplingCheck("sequence_mask", None, 3.0)
    with caplog.at_level(logging.WARNING, LOGGER):
        rows = [check.observe(s, NORMAL_ROW) for s in range(1, 101)]
    assert _warnings(caplog) == [] and check.message is None and check.low == 0
    assert rows == [{"sampling_weight_low": 0.0}] * 100
    # no correction: every weight is 1, nothing to check or log
    none = SamplingCheck("none", None, 3.0)
    assert none.observe(1, {**FP8_ROW, "sampling_weight_mean": 1.0}) == {} and none.message is None


def test_a_persisting_low_weight_is_not_warned_every_step(caplog):
    """Warned at the first low step, reminded at the 51st and 101st low steps (one line each), not between; a
    normal step in between does not restart the warning; each step's flag goes into the metrics."""
    check = SamplingCheck("sequence_mask", None, 3.0, remind_every=50)
    flags = []
    with caplog.at_level(logging.WARNING, LOGGER):
        for step in range(1, 122):
            flags.append(check.observe(step, NORMAL_ROW if step == 60 else FP8_ROW)["sampling_weight_low"])
    msgs = _warnings(caplog)
    assert len(msgs) == 3, msgs
    assert msgs[0].startswith("step 1: sampling_weight_mean=0.025") and "Fixes:" in msgs[0]
    assert msgs[1].startswith("sampling_weight_mean is still below 0.5: 51 of the 51 steps so far (now 0.025 at "
                              "step 51, 97.0% of the completions dropped)") and "warning of step 1" in msgs[1]
    assert "101 of the 102 steps so far" in msgs[2] and "step 102" in msgs[2]
    assert flags.count(1.0) == 120 and flags[59] == 0.0
    # not the main process: the same decisions, nothing printed
    quiet = SamplingCheck("sequence_mask", None, 3.0)
    caplog.clear()
    with caplog.at_level(logging.WARNING, LOGGER):
        quiet.observe(1, FP8_ROW, warn=False)
    assert _warnings(caplog) == [] and quiet.message is not None


def test_a_truncating_correction_warns_of_down_weighting():
    check = SamplingCheck("token_truncate", 0.1, 3.0)
    check.observe(2, {"sampling_weight_mean": 0.2, "sampling_masked_sequences": 0.0, "sampling_masked_tokens": 0.0,
                      "sampling_logp_diff": 1.5, "sampling_ratio": 0.3})
    msg = check.message
    assert "clamps each token's trainer/engine probability ratio to [0.1, 3]" in msg
    assert "the step's gradient is about 20.0% of its size" in msg and "masked" not in msg
    assert "compounds" not in msg and "never verified" not in msg


def test_the_real_loss_with_a_mismatched_engine_triggers_it(ckpts, caplog):
    """GRPOLoss.step on a tiny model: with the sampler's log-probs the model's own (plus noise) the weights stay near
    1 and nothing is said; with every sampled log-prob 0.6 below the trainer's (an engine that computes otherwise;
    the tiny batch's completions are 1-6 tokens, so the gap per token must be larger than FP8's 0.31 over 128),
    sequence_mask masks every completion longer than one token (e^(0.6 x 2) > 3), and the check warns with the
    step's own numbers."""
    from rollout_sleep.engine.completion import Completion
    from rollout_sleep.grpo.loss import GRPOLoss
    from rollout_sleep.run.schema import RecipeConfig
    from workers import grpo_case as case

    model = case.policy(ckpts["tied0"])
    ids, logprobs = case.completions_for(model, 1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    loss = GRPOLoss(group_size=case.GROUP, sampling_correction="sequence_mask", sampling_clip_max=3.0,
                    max_completion_length=case.MAX_TOKENS)
    cfg = RecipeConfig()
    check = SamplingCheck.from_config(cfg)

    def step(shift: float) -> dict:
        comps = [Completion(r // case.GROUP, case.PROMPTS[r // case.GROUP], ids[r],
                            [lp - shift for lp in logprobs[r]], "", "length") for r in range(len(ids))]
        return loss.step(model, opt, case.PROMPTS, comps, torch.tensor(case.REWARDS))

    with caplog.at_level(logging.WARNING, LOGGER):
        normal = step(0.0)
        assert check.observe(1, normal) == {"sampling_weight_low": 0.0}
        assert _warnings(caplog) == []
        mismatched = step(0.6)
        assert check.observe(2, mismatched) == {"sampling_weight_low": 1.0}
    # 1 (CAPPED_ROW) of 16 completions masked normally; with the gap, the 13 of 2+ tokens
    assert normal["sampling_masked_sequences"] == pytest.approx(1 / 16)
    lengths = [len(t) for t in ids]
    assert mismatched["sampling_masked_sequences"] == pytest.approx(sum(n >= 2 for n in lengths) / 16) == 13 / 16
    assert mismatched["sampling_masked_tokens"] == pytest.approx(sum(n for n in lengths if n >= 2) / sum(lengths))
    assert mismatched["sampling_weight_mean"] < 0.5 < normal["sampling_weight_mean"]
    [msg] = _warnings(caplog)
    assert f"sampling_weight_mean={mismatched['sampling_weight_mean']:.3g}" in msg
    assert f"{100 * mismatched['sampling_masked_sequences']:.1f}% of the step's completions" in msg
    assert f"by {mismatched['sampling_logp_diff']:.3g} per token" in msg


def test_a_mask_mode_dropping_most_tokens_warns_even_when_the_survivors_keep_the_mean_up(caplog):
    """sequence_mask capped at 3: 60% of the completions masked, the rest at ratio 2 give a mean weight of 0.8 (not
    below 0.5): most of the step is still dropped, so it warns, naming the masked share and the 40% trained on."""
    row = {"sampling_weight_mean": 0.8, "sampling_masked_sequences": 0.6, "sampling_masked_tokens": 0.6,
           "sampling_logp_diff": 0.2, "sampling_ratio": 1.4}
    check = SamplingCheck("sequence_mask", None, 3.0, remind_every=1)
    with caplog.at_level(logging.WARNING, LOGGER):
        assert check.observe(3, row) == {"sampling_weight_low": 1.0}
        assert check.observe(4, row) == {"sampling_weight_low": 1.0}
    first, reminder = _warnings(caplog)
    assert first.startswith("step 3: sampling_masked_tokens=0.6, above 0.5 (sampling_weight_mean=0.8)")
    assert "masked 60.0% of the step's completions" in first and "trained on about 40.0% of what it sampled" in first
    assert reminder.startswith("sampling_masked_tokens is still above 0.5: 2 of the 2 steps so far (now 0.6 at step 4")
    # truncating modes mask nothing: their weight alone decides
    assert SamplingCheck("sequence_truncate", None, 3.0).observe(1, row) == {"sampling_weight_low": 0.0}


def _named_keys(text: str) -> set[str]:
    import re

    return set(re.findall(r"\b((?:model|engine|data|train|wandb|watchdog)\.[a-z_]+)", text))


def _schema_keys() -> set[str]:
    import dataclasses

    from rollout_sleep.run.schema import RecipeConfig

    cfg = RecipeConfig()
    return {f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
            if dataclasses.is_dataclass(getattr(cfg, section.name))
            for f in dataclasses.fields(getattr(cfg, section.name))}


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("verify_every", [0, 1, 4])
def test_every_key_the_warning_names_is_a_config_key(mode, verify_every):
    check = SamplingCheck(mode, 0.5, 3.0, verify_every=verify_every, remind_every=1)
    check.observe(1, FP8_ROW)
    named = _named_keys(check.message)
    assert named and named <= _schema_keys(), named - _schema_keys()
    fixes = check.message.split("Fixes:")[1]
    # a fix already in effect is not offered: verify_every=1 verifies every sync
    assert ("engine.verify_every=1" in fixes) == (verify_every != 1)

