"""Random-weight checkpoints: each computes as its saved files, and a config-only folder names its class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rollout_sleep.weights.checkpoints import FAMILIES, family_config, make_checkpoint, random_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_model_computes_as_its_saved_checkpoint(tmp_path, dtype):
    """``random_model`` (a trainer built from a config, as the model-matrix benchmark does) must compute
    exactly what ``from_pretrained`` of its own checkpoint computes: ``to_empty`` had left the rotary tables
    uninitialized (logits 5-80 off, NaN for Qwen3), so the trainer silently trained a different model."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 9, 33, 2, 77, 12, 90, 1]])
    for family in ("qwen2.5", "qwen3", "gemma3"):
        model = random_model(family_config(family, "tiny", str(dtype).replace("torch.", "")), seed=1, std=0.3,
                             dtype=dtype)
        assert all(p.dtype == dtype for p in model.parameters())
        model.save_pretrained(tmp_path / family)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / family, dtype=dtype).eval()
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits), family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_dir_names_the_causal_lm_class(tmp_path, family):
    """A weights-free directory (vLLM's dummy load) names the class a saved checkpoint names: without
    ``architectures`` vLLM 0.26 picks a non-generative runner and ``generate`` fails (the H100 LoRA arm)."""
    from rollout_sleep.weights.checkpoints import make_config_dir

    bare = json.loads((Path(make_config_dir(tmp_path / "bare", "tiny", family=family)) / "config.json").read_text())
    full = json.loads((Path(make_checkpoint(tmp_path / "full", "tiny", family=family)) / "config.json").read_text())
    assert bare["architectures"] == full["architectures"] and bare["architectures"][0].endswith("ForCausalLM")
