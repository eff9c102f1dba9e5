"""A temperature vLLM would not sample at exactly is refused before vLLM starts: vLLM raises one below its floor
(0.01) to the floor, while the trainer divides the logits by the config's value, so the two sides' log-probs
silently differed (sampling_logp_diff 0.61 at 1e-4)."""

from __future__ import annotations

import pytest

from recipe_cli import ENGINE_START, run
from rollout_sleep.engine import temperature_problem


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


def test_the_recipe_refuses_a_temperature_below_the_floor_before_the_engine_starts(tmp_path):
    """The old code trained on: vLLM sampled at 0.01, the trainer scored at 1e-4."""
    code, out = run(tmp_path / "run", "train.steps=1", "train.prompts_per_step=4", "train.temperature=1e-4",
                    timeout=600)
    assert code == 2, out[-3000:]
    assert "error: train.temperature=0.0001 is below vLLM's lowest sampling temperature: vLLM would sample at 0.01" \
           in out, out[-3000:]
    assert ENGINE_START not in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_trl_plugin_refuses_a_temperature_below_the_floor():
    """TRL divides the logits by ``GRPOConfig.temperature`` too: refused when the trainer is patched (before any
    sync or rollout; checked on the trainer's config alone)."""
    from types import SimpleNamespace

    from rollout_sleep.integrations.trl import patch

    args = SimpleNamespace(use_vllm=True, vllm_mode="colocate", temperature=1e-3)
    with pytest.raises(ValueError, match=r"GRPOConfig.temperature=0.001 is below vLLM's lowest sampling temperature"):
        patch(SimpleNamespace(args=args))
