"""The trainer's log-probs of sampled tokens: chunked float32 log-softmax and completion-only logits,
checked against the plain formulas on a real (tiny) Qwen3."""

from __future__ import annotations

import pytest
import torch

from rollout_sleep.grpo import logprobs as grpo
from rollout_sleep.grpo.logprobs import completion_logprobs, selected_logprobs
from rollout_sleep.grpo.loss import GRPOLoss, pad_batch


class _NoKeep(torch.nn.Module):
    """A causal LM whose forward has no ``logits_to_keep``: full logits, same answer."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_selected_logprobs_match_log_softmax(monkeypatch, dtype):
    monkeypatch.setattr(grpo, "_chunk_rows", lambda logits, n, budget_bytes=0: 2)  # force several chunks
    torch.manual_seed(0)
    logits = (torch.randn(5, 7, 50) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (5, 6))
    weights = torch.randn(5, 6)
    got = selected_logprobs(logits, targets)
    (got * weights).sum().backward()
    grad = logits.grad.clone()
    logits.grad = None
    ref = torch.log_softmax(logits[:, :6].float(), -1).gather(-1, targets[..., None])[..., 0]
    (ref * weights).sum().backward()
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=tol)
    assert torch.allclose(grad.float(), logits.grad.float(), atol=1e-2 if dtype == torch.bfloat16 else tol)
    assert grad[:, 6].abs().max() == 0  # the last position predicts nothing here


def test_completion_logprobs_equal_unpadded_forward(ckpts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpts["tied0"], dtype=torch.float32).eval()
    prompts = [[5, 9, 2, 7], [3], [11, 12]]
    comps = [[4, 4, 8], [6, 1, 2, 9, 10], [7]]
    ids, attn, positions, mask = pad_batch(prompts, comps, pad_id=0)
    with torch.no_grad():
        got = completion_logprobs(model, ids, attn, positions, mask.shape[1])
        full = completion_logprobs(_NoKeep(model), ids, attn, positions, mask.shape[1])
    assert not grpo._keeps_logits(_NoKeep(model)) and grpo._keeps_logits(torch.nn.DataParallel(model))
    for i, (p, c) in enumerate(zip(prompts, comps)):
        seq = torch.tensor([p + c])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=seq).logits[0, :-1].float(), -1)
        want = lp[len(p) - 1:].gather(-1, torch.tensor(c)[:, None])[:, 0]  # no padding at all
        assert torch.allclose(got[i, : len(c)], want, atol=1e-5), (i, got[i], want)
        assert torch.allclose(full[i, : len(c)], want, atol=1e-5)
    assert mask.sum() == sum(map(len, comps))


def test_sampling_correction_modes():
    from rollout_sleep.grpo.loss import grpo_loss, sampling_correction

    logp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    sampled = torch.tensor([[-1.5, -1.0, float("nan")], [-3.0, -1.0, -1.0]])  # row 0: one token without vLLM's
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert sampling_correction(logp, sampled, mask, "none") is None
    tok = sampling_correction(logp, sampled, mask, "token_truncate", clip_max=3.0)
    assert torch.allclose(tok, torch.tensor([[0.5, 0.0, 0.0], [2.0, 0.0, 0.0]]).exp().clamp(max=3.0))
    seq = sampling_correction(logp, sampled, mask, "sequence_mask", clip_max=3.0)
    assert seq.shape == (2, 1) and torch.isclose(seq[0, 0], torch.tensor(0.5).exp()) and seq[1, 0] == 0  # e^2 > 3
    assert sampling_correction(logp, sampled, mask, "sequence_truncate", clip_max=3.0)[1, 0] == 3.0
    with pytest.raises(ValueError, match="unknown sampling correction 'sequence'"):
        sampling_correction(logp, sampled, mask, "sequence")
    # a masked sequence contributes nothing to the policy gradient
    lp = logp.clone().requires_grad_()
    loss, _ = grpo_loss(lp, lp.detach(), torch.tensor([1.0, 1.0]), mask, weights=seq)
    loss.backward()
    assert lp.grad[1].abs().max() == 0 and lp.grad[0].abs().min() > 0


def test_recipe_config_rejects_unknown_correction():
    from rollout_sleep.run.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.sampling_correction must be one of"):
        load_config(None, ["train.sampling_correction=sequence"])


def test_engine_logprobs_are_the_trainers_at_temperature(engine):
    """vLLM returns the sampled tokens' log-probs after temperature (``processed_logprobs``) and the trainer
    computes them the same way: at temperature 0.7 the update's ``sampling_logp_diff`` is at the float32 floor,
    where the raw (temperature-1) log-probs would be far off."""
    from helpers import hf_model

    model = hf_model(engine.model_path)
    prompts = [[5, 9, 2, 7], [3, 8, 1], [11, 12]]
    comps = engine.generate(prompts, n=4, max_tokens=6, temperature=0.7)
    ids, attn, positions, mask = pad_batch([prompts[c.prompt_index] for c in comps], [c.token_ids for c in comps], 0)
    sampled = torch.zeros(mask.shape)
    for i, c in enumerate(comps):
        sampled[i, : len(c.logprobs)] = torch.tensor(c.logprobs)
    with torch.no_grad():
        raw = completion_logprobs(model, ids, attn, positions, mask.shape[1])
    assert float(((raw - sampled).abs() * mask).sum() / mask.sum()) > 0.05  # temperature matters here
    loss = GRPOLoss(group_size=4, pad_id=0, micro_batch=5, temperature=0.7)
    stats = loss.step(model, torch.optim.SGD(model.parameters(), lr=0.0), prompts, comps,
                      torch.arange(len(comps), dtype=torch.float32))
    assert stats["sampling_logp_diff"] < 1e-4, stats
