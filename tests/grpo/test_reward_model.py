"""A reward-model folder whose checkpoint lacks weights (its score head, typically) is refused, before vLLM starts
in the recipe and at every load: the old code scored with a freshly drawn random head (other scores at every
load), transformers' report of the missing weights hidden by the quiet logging."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rollout_sleep.grpo.errors import RewardError
from rollout_sleep.grpo.reward_model import RewardModel
from rollout_sleep.weights.checkpoints import make_reward_checkpoint

from helpers import RECIPE, ROOT


CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def _drop_score_head(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    del weights["score.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture()
def headless(tmp_path) -> Path:
    path = Path(make_reward_checkpoint(tmp_path / "rm", "tiny", seed=0, dtype="float32"))
    _drop_score_head(path)
    return path


def test_a_reward_model_without_its_score_head_is_refused_before_vllm(tmp_path, headless):
    proc = subprocess.run([sys.executable, str(RECIPE), "--config", str(CONFIG), f"output_dir={tmp_path / 'run'}",
                           f"rewards=[digits_format, {headless}]", "wandb.mode=disabled"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert f"reward model {str(headless)!r}: its checkpoint files have no weights for score.weight" in out, out[-3000:]
    assert "starting the vLLM engine" not in out and not (tmp_path / "run").exists()


def test_missing_weights_are_refused_when_the_reward_model_loads(tmp_path, headless):
    with pytest.raises(RewardError, match="its checkpoint files have no weights for score.weight"):
        RewardModel(str(headless), load=False)
    path = Path(make_reward_checkpoint(tmp_path / "later", "tiny", seed=0, dtype="float32"))
    model = RewardModel(str(path), load=False)  # checked whole; the head goes missing before the load
    _drop_score_head(path)
    with pytest.raises(RewardError, match="no weights for score.weight; loading it would draw them at random"):
        model.load()
    empty = tmp_path / "config_only"
    empty.mkdir()
    (empty / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(RewardError, match="its weights cannot be read"):
        RewardModel(str(empty), load=False)
