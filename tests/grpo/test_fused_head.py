"""The fused LM head (``linear_selected_logprobs``): log-probs and every gradient equal to the unfused path (the
model's logits, then ``selected_logprobs``), for the function alone, a tiny Qwen3 (tied and untied head) through
``completion_logprobs`` and ``GRPOLoss.step``, and each model family (fused or falling back).

Tolerances: float32 on CPU, same kernels, different chunking: log-probs within 1e-5 absolute, gradients within
1e-5 relative to their largest entry (measured ~1e-7). bf16: log-probs within 0.05 (a bf16 logit's rounding,
~0.4% of its size, moves its log-prob by about that much when the chunks' matmul shapes differ) and gradients
within 2% of their largest entry (bf16's 2^-8 resolution, summed over vocabulary chunks in float32 here and
rounded once per product in the unfused head).
"""

from __future__ import annotations

import copy

import pytest
import torch

from rollout_sleep.grpo import logprobs as grpo
from rollout_sleep.grpo.logprobs import (completion_logprobs, fused_head_problem, linear_selected_logprobs,
                                         selected_logprobs)
from rollout_sleep.grpo.loss import GRPOLoss, pad_batch

PROMPTS = [[5, 9, 2, 7], [3], [11, 12], [40, 41, 42]]
COMPS = [[4, 4, 8], [6, 1, 2, 9, 10], [7], [100, 101]]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    return float((a.float() - b.float()).abs().max()) <= rel * max(float(b.float().abs().max()), 1e-12)


@pytest.fixture()
def small_chunks(monkeypatch):
    """Several chunks in both directions (the tiny vocabulary would otherwise fit in one)."""
    monkeypatch.setattr(grpo, "_head_chunk", lambda width, budget_bytes=0: 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_function_matches_linear_then_selected(small_chunks, dtype, temperature):
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 16).to(dtype).requires_grad_()
    weight = (torch.randn(37, 16) * 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, 37, (3, 5))
    targets[0, 0], targets[1, 1] = 0, 36  # the first and last vocabulary rows
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0  # padding: no gradient from those positions
    w_out = torch.randn(3, 5) * mask
    got = linear_selected_logprobs(hidden, weight, targets, temperature)
    (got * w_out).sum().backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = selected_logprobs(torch.nn.functional.linear(hidden, weight), targets, temperature)
    (ref * w_out).sum().backward()
    assert got.dtype == torch.float32 and got.shape == (3, 5)
    exact = dtype == torch.float32
    assert torch.allclose(got, ref, atol=1e-5 if exact else 0.05), (got - ref).abs().max()
    for mine, want in zip(grads, (hidden.grad, weight.grad)):
        assert mine.dtype == dtype and _close(mine, want, 1e-5 if exact else 0.02)
    assert grads[0][1, 3:].abs().max() == 0  # padded positions


def test_fused_function_without_grad_and_bad_temperature():
    h, w, t = torch.randn(1, 2, 4), torch.randn(6, 4), torch.tensor([[1, 5]])
    with torch.no_grad():
        assert linear_selected_logprobs(h, w, t).shape == (1, 2)
    with pytest.raises(ValueError, match="temperature must be positive"):
        linear_selected_logprobs(h, w, t, 0.0)


def _batch():
    return pad_batch(PROMPTS, COMPS, pad_id=0)


def _logprobs_and_grads(model, fused: bool, temperature: float, monkeypatch):
    monkeypatch.setattr(grpo, "FUSED_HEAD", fused)
    ids, attn, positions, mask = _batch()
    model.zero_grad(set_to_none=True)
    logp = completion_logprobs(model, ids, attn, positions, mask.shape[1], temperature)
    weights = torch.linspace(-1, 1, mask.numel()).view(mask.shape) * mask
    (logp * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logp.detach() * mask, grads


def _assert_same(model, monkeypatch, temperature=1.0, atol=1e-5, rel=1e-5):
    fused_lp, fused_g = _logprobs_and_grads(model, True, temperature, monkeypatch)
    plain_lp, plain_g = _logprobs_and_grads(model, False, temperature, monkeypatch)
    monkeypatch.setattr(grpo, "FUSED_HEAD", True)
    assert torch.allclose(fused_lp, plain_lp, atol=atol), (fused_lp - plain_lp).abs().max()
    assert fused_g.keys() == plain_g.keys() and len(fused_g) == sum(p.requires_grad for p in model.parameters())
    for name in plain_g:
        assert _close(fused_g[name], plain_g[name], rel), name


@pytest.mark.parametrize("which", ["tied0", "untied0"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_qwen3_fused_by_default_matches_logits_path(ckpts, which, temperature, small_chunks, monkeypatch):
    """Every parameter's gradient, the embedding included (a tied head adds its gradient to the embedding's)."""
    from helpers import hf_model

    model = hf_model(ckpts[which])
    head, problem = fused_head_problem(model)
    assert problem is None and head is model.lm_head
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == (which == "tied0")
    _assert_same(model, monkeypatch, temperature)
    assert "forward" not in model.lm_head.__dict__  # the swap is undone


def test_no_logits_kept_for_backward(ckpts, monkeypatch):
    """What autograd saves for backward: fused, no tensor of vocabulary width (the unfused path keeps the logits)."""
    from helpers import hf_model

    model = hf_model(ckpts["tied0"])
    ids, attn, positions, mask = _batch()
    vocab = model.config.vocab_size
    for fused in (True, False):
        monkeypatch.setattr(grpo, "FUSED_HEAD", fused)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            completion_logprobs(model, ids, attn, positions, mask.shape[1])
        assert any(s[-1] == vocab for s in saved) != fused, saved


def test_grpo_step_fused_equals_unfused(ckpts, small_chunks, monkeypatch):
    """End to end: one GRPO step (KL to a reference, sampling correction, temperature 0.7) moves every parameter
    as the unfused path does (SGD, lr 1, no clipping: the update is the gradient)."""
    from helpers import hf_model
    from rollout_sleep.engine.completion import Completion

    base = hf_model(ckpts["untied0"])
    ref = hf_model(ckpts["untied1"])
    comps = [Completion(i // 2, PROMPTS[i // 2], c, [-1.0] * len(c), "", "length") for i, c in enumerate(COMPS)]
    loss = GRPOLoss(group_size=2, pad_id=0, micro_batch=3, temperature=0.7, kl_coef=0.1,
                    sampling_correction="token_truncate", max_grad_norm=float("inf"))
    out = {}
    for fused in (True, False):
        monkeypatch.setattr(grpo, "FUSED_HEAD", fused)
        model = copy.deepcopy(base)
        stats = loss.step(model, torch.optim.SGD(model.parameters(), lr=1.0), PROMPTS[:2], comps,
                          torch.tensor([1.0, 0.0, 0.5, 2.0]), ref_model=ref)
        out[fused] = stats, {n: base.state_dict()[n] - p for n, p in model.state_dict().items()}
    for key in out[False][0]:
        assert out[True][0][key] == pytest.approx(out[False][0][key], rel=1e-4, abs=1e-6), key
    for name, step in out[False][1].items():
        assert step.abs().max() > 0 or "norm" in name, name
        assert _close(out[True][1][name], step, 1e-4), name


def test_bf16_model_and_autocast_loosely(ckpts, monkeypatch):
    from helpers import hf_model

    model = hf_model(ckpts["untied0"]).to(torch.bfloat16)
    _assert_same(model, monkeypatch, 0.7, atol=0.05, rel=0.02)
    model = hf_model(ckpts["tied0"])  # float32 weights under bf16 autocast: the head computes in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _assert_same(model, monkeypatch, 1.0, atol=0.05, rel=0.03)


@pytest.mark.parametrize("family", ["qwen2.5", "llama3", "mistral", "gemma2", "gemma3", "phi3", "qwen3-moe",
                                    "mixtral"])
def test_families_fuse_or_fall_back(family, monkeypatch):
    """The other families (qwen3 / qwen3-untied above): fused where the model returns its head's output as the
    logits; Gemma 2 soft-caps its logits after the head, so it falls back (and its log-probs are the model's)."""
    from rollout_sleep.weights.checkpoints import family_config, random_model

    model = random_model(family_config(family, dtype="float32"), seed=1, std=0.2)
    head, problem = fused_head_problem(model)
    if family == "gemma2":
        assert head is None and "final_logit_softcapping=30.0" in problem
    else:
        assert problem is None and head is model.get_output_embeddings()
    _assert_same(model, monkeypatch, 0.7)


def test_fallbacks_named(ckpts, monkeypatch):
    """Heads the fused path does not cover fall back (with the reason), and PEFT without a LoRA head fuses."""
    from helpers import hf_model
    from peft import LoraConfig, get_peft_model

    model = hf_model(ckpts["untied0"])
    assert fused_head_problem(get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj"])))[1] \
        is None
    lora_head = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    assert "not a plain Linear" in fused_head_problem(lora_head)[1]
    _assert_same(lora_head, monkeypatch)  # the fallback is the old path
    assert "DataParallel" in fused_head_problem(torch.nn.DataParallel(model))[1]
    assert "torch.compile" in fused_head_problem(torch.compile(model))[1]
    biased = copy.deepcopy(model)
    biased.lm_head.bias = torch.nn.Parameter(torch.zeros(biased.lm_head.out_features))
    assert "with a bias" in fused_head_problem(biased)[1]
    monkeypatch.setattr(biased.lm_head.weight, "ds_id", 0, raising=False)
    biased.lm_head.bias = None
    assert "sharded" in fused_head_problem(biased)[1]
    cfg = copy.deepcopy(model.config)
    cfg.model_type = "cohere"
    assert "not known" in grpo.fused_config_problem(cfg)
