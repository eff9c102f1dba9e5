"""The trainer's side: a WeightStream of plain, PEFT and other models (names, casts, buckets, tied heads,
buffers), synced into the real vLLM engine."""

from __future__ import annotations

import copy

import pytest
import torch

from rollout_sleep.weights.checkpoints import build_tokenizer, family_config, random_model
from rollout_sleep.weights.spec import WeightMismatchError
from rollout_sleep.weights.stream import WeightStream, unwrap
from rollout_sleep.weights.verify import verify

from helpers import PROMPTS, assert_follows, hf_model


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


SEQUENCES = [[(11 * i + 5 * j) % 250 + 1 for j in range(20)] for i in range(3)]


def _opt_config(tokenizer):
    from transformers import AutoConfig

    vocab = -(-len(tokenizer) // 64) * 64
    return AutoConfig.for_model(
        "opt", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=128,
        max_position_embeddings=1024, vocab_size=vocab, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
        torch_dtype="float32")


def _hf_logprobs(model, sequences):
    out = []
    with torch.no_grad():
        for s in sequences:
            lp = torch.log_softmax(model(input_ids=torch.tensor([s])).logits[0].float(), -1)
            out.append([lp[j - 1, s[j]].item() for j in range(1, len(s))])
    return out


def test_plain_model_sync_then_verify(engine, ckpts):
    model = hf_model(ckpts["tied1"])
    train_step(model)
    engine.sleep(level=2)
    engine.wake_up(weights=WeightStream(model, dtype=engine.dtype, bucket_bytes=64 << 10))
    report = verify(engine, model)
    assert report.ok and report.compared == len(WeightStream(model).spec()) and report.max_abs_diff == 0.0
    assert_follows(engine, model)


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


@pytest.mark.parametrize("family,targets,variant", [
    ("qwen2.5", ["q_proj", "k_proj", "v_proj"], {}), ("qwen2.5", ["q_proj", "k_proj", "v_proj"], {"use_dora": True}),
    ("qwen2.5", ["q_proj", "k_proj", "v_proj"], {"lora_bias": True}), ("phi3", ["qkv_proj", "gate_up_proj"], {})])
def test_peft_stream_equals_peft_merge_on_biased_family(family, targets, variant):
    """LoRA on Qwen2.5's biased q/k/v: each pushed tensor is bitwise PEFT's merged one (weights and biases),
    with plain LoRA, DoRA and lora_bias; Phi-3's pre-fused qkv_proj / gate_up_proj too. The adapter stays
    unmerged in the trainer."""
    from peft import LoraConfig, get_peft_model

    base = random_model(family_config(family, "tiny", "float32"), seed=0, std=0.3, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                            init_lora_weights=False, **variant))
    with torch.no_grad():  # a trained-looking adapter: nonzero lora_B bias / magnitude away from the norm
        for name, p in model.named_parameters():
            if "lora_B" in name and name.endswith("bias") or "lora_magnitude_vector" in name:
                p.mul_(1.5).add_(0.1)
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    got = dict(WeightStream(model))
    assert set(got) == set(want)
    wrong = [n for n in want if got[n].shape != want[n].shape or not torch.equal(got[n], want[n])]
    assert not wrong, wrong
    assert not any(getattr(m, "merged", False) for m in model.modules())
    first = f"model.layers.0.self_attn.{targets[0]}"
    assert not torch.equal(got[first + ".weight"], base.get_submodule(first).base_layer.weight)


def test_tied_head_of_a_non_llama_embedding_name(tmp_path):
    """OPT ties its head to ``model.decoder.embed_tokens``: a stream sync and a path reload must give the
    trainer's log-probs on vLLM CPU (its head computes with a packed copy), and verify must say so honestly
    (a passing verify with a stale head was the bug)."""
    from rollout_sleep.engine.engine import Engine

    tokenizer = build_tokenizer()
    config = _opt_config(tokenizer)
    for seed, name in ((0, "A"), (1, "B")):
        random_model(config, seed=seed, std=0.3, dtype=torch.float32).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    trainer = random_model(config, seed=1, std=0.3, dtype=torch.float32)
    want = _hf_logprobs(trainer, SEQUENCES)
    eng = Engine(str(tmp_path / "A"), dtype="float32", seed=0, max_model_len=256, kv_cache_bytes=32 << 20,
                 enforce_eager=True)
    try:
        assert not verify(eng, trainer).ok  # engine holds A
        for weights in (WeightStream(trainer, dtype=eng.dtype), str(tmp_path / "B")):
            eng.sleep(level=2)
            eng.wake_up(weights=weights)
            report = verify(eng, trainer)
            got = eng.score(SEQUENCES)
            diff = max(abs(x - y) for ra, rb in zip(got, want) for x, y in zip(ra, rb))
            assert report.ok, (type(weights).__name__, report.mismatched, report.unplaced)
            assert diff <= 1e-3, f"{type(weights).__name__}: vLLM vs the trainer {diff:.3g} with verify ok"
        assert "lm_head.weight" in WeightStream(trainer).spec()  # the tied head, pushed and checked
        # one tensor off inside a fused group (OPT's k bias in qkv_proj), or a square matrix transposed:
        # verify names exactly that tensor
        for name, change in (("model.decoder.layers.1.self_attn.k_proj.bias", lambda t: t.add_(1e-3)),
                             ("model.decoder.layers.0.self_attn.out_proj.weight", lambda t: t.copy_(t.t().clone()))):
            other = copy.deepcopy(trainer)
            with torch.no_grad():
                change(other.get_parameter(name))
            report = verify(eng, other)
            assert not report.ok and set(report.mismatched) == {name} and not report.unplaced, report
    finally:
        eng.close()
