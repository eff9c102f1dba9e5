"""verify: the bitwise proof that the engine holds the trainer's weights, and what it names when it does not."""

from __future__ import annotations

import pytest
import torch

from rollout_sleep.weights.stream import WeightStream
from rollout_sleep.weights.verify import verify

from helpers import hf_model


def test_verify_names_a_corrupted_tensor(engine, ckpts):
    model = hf_model(ckpts["tied1"])
    engine.load_weights(WeightStream(model))
    assert verify(engine, model).ok
    with torch.no_grad():  # the trainer moves on without a sync
        model.model.layers[1].self_attn.v_proj.weight[3, 5] += 1e-3
    report = verify(engine, model)
    assert not report.ok and list(report.mismatched) == ["model.layers.1.self_attn.v_proj.weight"]
    assert report.mismatched["model.layers.1.self_attn.v_proj.weight"] == pytest.approx(1e-3, rel=1e-2)
    with pytest.raises(AssertionError, match="v_proj"):
        report.raise_if_failed()
    engine.load_weights(WeightStream(model))

    def corrupt(vmodel):  # and the engine's own copy drifting is caught too
        vmodel.model.layers[0].post_attention_layernorm.weight.data[0] += 0.5

    engine.run_on_model(corrupt)
    report = verify(engine, model)
    assert list(report.mismatched) == ["model.layers.0.post_attention_layernorm.weight"]
