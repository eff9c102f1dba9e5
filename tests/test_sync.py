"""Trainer → engine sync and verification, real vLLM engine, plain and PEFT models."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, assert_follows, hf_model
from rollout_sleep.weights.stream import WeightStream, unwrap
from rollout_sleep.weights.verify import verify
from rollout_sleep.weights.spec import WeightMismatchError


def train_step(model, lr: float = 1e-2, seed: int = 0) -> None:
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(1, 250, (4, 24))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def test_plain_model_sync_then_verify(engine, ckpts):
    model = hf_model(ckpts["tied1"])
    train_step(model)
    engine.sleep(level=2)
    engine.wake_up(weights=WeightStream(model, dtype=engine.dtype, bucket_bytes=64 << 10))
    report = verify(engine, model)
    assert report.ok and report.compared == len(WeightStream(model).spec()) and report.max_abs_diff == 0.0
    assert_follows(engine, model)


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


def test_stream_validates_before_touching_the_engine(engine, ckpts):
    before = [c.token_ids for c in engine.generate(PROMPTS, max_tokens=8, temperature=0.0)]
    model = hf_model(ckpts["tied1"])
    model.model.layers[0].mlp.down_proj = torch.nn.Linear(256, 64, bias=False)  # wrong shape
    engine.sleep(level=2)
    with pytest.raises(WeightMismatchError, match=r"shape mismatch for 'model.layers.0.mlp.down_proj.weight'"):
        engine.wake_up(weights=WeightStream(model))
    engine.wake_up(reload_checkpoint=True)
    assert [c.token_ids for c in engine.generate(PROMPTS, max_tokens=8, temperature=0.0)] == before


def test_dtype_cast_and_bucket_bound(engine, ckpts):
    model = hf_model(ckpts["tied1"]).to(torch.bfloat16)
    stream = WeightStream(model, dtype=torch.float32, bucket_bytes=256 << 10)
    largest = max(torch.Size(s).numel() * 4 for s, _ in stream.spec().values())
    engine.load_weights(stream)
    assert 0 < stream.peak_bucket_bytes <= max(256 << 10, largest)
    report = verify(engine, stream)
    assert report.ok  # bf16 → fp32 is exact, so bitwise equal to the cast


def test_peft_lora_pushes_merged_weights_and_keeps_adapter(engine, ckpts):
    from peft import LoraConfig, get_peft_model

    base = hf_model(ckpts["tied1"])
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    train_step(model, lr=1e-1)
    stream = WeightStream(model, dtype=engine.dtype)
    assert "model.layers.0.self_attn.q_proj.weight" in stream.spec()
    assert not any("lora" in n or "base_layer" in n for n in stream.spec())
    base_q = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    engine.load_weights(stream)
    assert verify(engine, model).ok
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert not q.merged and torch.equal(q.base_layer.weight, base_q)  # the adapter stays unmerged
    merged = hf_model(ckpts["tied1"])
    merged.load_state_dict({k: v for k, v in model.merge_and_unload(progressbar=False).state_dict().items()})
    assert verify(engine, merged).ok  # the engine holds exactly PEFT's own merge
    assert_follows(engine, merged)


def test_unwrap_strips_wrappers():
    inner = torch.nn.Linear(2, 2)

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    assert unwrap(Wrapper(inner)) is inner


def test_buffers_are_skipped_with_a_reason(ckpts):
    stream = WeightStream(hf_model(ckpts["tied1"]))
    assert any("rotary" in n for n in stream.skipped)
    assert all("buffer" in why for why in stream.skipped.values())
