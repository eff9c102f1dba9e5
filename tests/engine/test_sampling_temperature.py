"""``temperature_problem``: a temperature vLLM would not sample at exactly is named, with the value vLLM would use:
vLLM raises one below its floor (0.01) to the floor, while the trainer divides the logits by the config's value, so
the two sides' log-probs silently differed (sampling_logp_diff 0.61 at 1e-4). The recipe refuses one before vLLM
starts (tests/recipes/test_grpo_guards.py), the TRL plugin at patch() (tests/integrations/test_trl.py)."""

from __future__ import annotations

import pytest

from rollout_sleep.engine.completion import temperature_problem


@pytest.mark.parametrize("temperature", [0.01, 0.7, 1.0, 2.0])
def test_temperatures_vllm_samples_at_are_accepted(temperature):
    assert temperature_problem(temperature) is None


@pytest.mark.parametrize("temperature", [1e-6, 1e-4, 0.0099])
def test_a_temperature_below_vllms_floor_is_named_with_the_floor(temperature):
    from vllm import SamplingParams

    floor = SamplingParams(temperature=temperature).temperature  # what vLLM really samples at
    assert floor > temperature
    problem = temperature_problem(temperature, "train.temperature")
    assert problem.startswith(f"train.temperature={temperature:g} is below vLLM's lowest sampling temperature: "
                              f"vLLM would sample at {floor:g}")
    assert problem.endswith(f"Set train.temperature={floor:g} or higher")


def test_a_temperature_vllm_refuses_is_named():
    problem = temperature_problem(2.5, "train.temperature")
    assert problem is not None and problem.startswith("train.temperature=2.5 is refused by vLLM: ")
