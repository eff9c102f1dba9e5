"""The TRL plugin streams the parameters the trainer holds at sync time, not those it held at ``patch()``:
accelerate's ``prepare`` (FSDP2, ZeRO-3) replaces them after the patch. One process, the session engine's
vLLM, a stand-in for the trainer (TRL itself runs in test_trl_plugin.py)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

from conftest import hf_model
from rollout_sleep.integrations.trl import patch
from rollout_sleep.weights.verify import verify


def test_sync_streams_the_model_the_trainer_holds_after_prepare(engine, ckpts):
    before = hf_model(ckpts["tied0"])
    gen = SimpleNamespace(llm=engine.llm, enable_sleep_mode=False, generation_kwargs={})
    trainer = SimpleNamespace(args=SimpleNamespace(use_vllm=True, vllm_mode="colocate"), vllm_generation=gen,
                              model=before, model_wrapped=before, _metrics={"train": defaultdict(list)})
    patch(trainer)
    prepared = hf_model(ckpts["tied1"])  # what prepare hands back: other parameter objects, other values
    trainer.model = trainer.model_wrapped = prepared
    gen.sync_weights()
    assert verify(engine, prepared).ok  # the engine holds the prepared model's weights
    assert not verify(engine, before).ok
    assert trainer._metrics["train"]["rollout_sleep/verify_max_abs_diff"] == [0.0]
