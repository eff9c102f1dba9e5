"""GRPO's pieces (group-normalized advantages, token log-probs, clipped loss), as plain functions.

>>> import torch
>>> [round(a, 3) for a in group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2).tolist()]
[0.707, -0.707, 0.0, 0.0]
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """Reward minus its group's mean (divided by the group's std when ``scale``); groups are consecutive."""
    g = rewards.view(-1, group_size)
    adv = g - g.mean(1, keepdim=True)
    if scale:
        adv = adv / (g.std(1, keepdim=True) + eps)
    return adv.view(-1)


def pad_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and a mask of completion positions (targets)."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    target = torch.zeros((len(seqs), width - 1), dtype=torch.float32)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attn[i, : len(p) + len(c)] = 1
        target[i, len(p) - 1: len(p) + len(c) - 1] = 1.0
    return ids, attn, target


def token_logprobs(model, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """Log-prob of each next token (shape ``[batch, len-1]``) under ``model``.

    One row at a time in float32: never materializes float32 logits for the whole batch
    (``batch x len x vocab``; 2.9 GB for 32 x 150 tokens of a 152k vocabulary).
    """
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]
    targets = ids[:, 1:]
    rows = [torch.log_softmax(logits[i].float(), -1).gather(1, targets[i, :, None])[:, 0]
            for i in range(logits.shape[0])]
    return torch.stack(rows)


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0):
    """Clipped policy-gradient loss averaged over completion tokens, plus an optional k3 KL to a reference.

    Returns ``(loss, stats)`` with ``clip_frac`` and ``kl``.
    """
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    stats = {"clip_frac": ((ratio - 1).abs() > clip_eps).float().mul(mask).sum() / mask.sum().clamp(min=1)}
    if ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        stats["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
        per_token = per_token + kl_coef * kl
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    return loss, {k: float(v) for k, v in stats.items()}


def grpo_update(model, optimizer, prompts: list[list[int]], completions, rewards: torch.Tensor, *,
                group_size: int, pad_id: int, clip_eps: float = 0.2, micro_batch: int = 16,
                ref_model=None, kl_coef: float = 0.0, max_grad_norm: float = 1.0, backward=None,
                autocast=None) -> dict[str, float]:
    """One GRPO optimizer step on a rollout batch (``completions``: :class:`~rollout_sleep.engine.Completion`).

    Log-probs of the sampled tokens are recomputed by the trainer; the mean |trainer − vLLM| log-prob
    gap and the mean importance ratio between them are returned with the loss statistics.
    ``backward`` (e.g. ``accelerator.backward``) and ``autocast`` (a context factory) are optional hooks.
    """
    import contextlib

    device = next(model.parameters()).device
    adv_all = group_advantages(rewards, group_size).to(device)
    n = len(completions)
    stats = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "sampling_logp_diff": 0.0, "sampling_ratio": 0.0}
    model.train()
    autocast = autocast or contextlib.nullcontext
    for start in range(0, n, micro_batch):
        chunk = completions[start: start + micro_batch]
        ids, attn, mask = pad_batch([prompts[c.prompt_index] for c in chunk], [c.token_ids for c in chunk], pad_id)
        ids, attn, mask = ids.to(device), attn.to(device), mask.to(device)
        with autocast():
            logp = token_logprobs(model, ids, attn)
            ref = None
            if ref_model is not None and kl_coef > 0:
                with torch.no_grad():
                    ref = token_logprobs(ref_model, ids, attn)
            loss, s = grpo_loss(logp, logp.detach(), adv_all[start: start + len(chunk)], mask, clip_eps,
                                ref, kl_coef)
        weight = len(chunk) / n
        (backward or torch.Tensor.backward)(loss * weight)
        with torch.no_grad():
            vllm_lp = torch.zeros_like(logp)
            for i, c in enumerate(chunk):
                if c.logprobs is not None:
                    p = len(prompts[c.prompt_index])
                    vllm_lp[i, p - 1: p - 1 + len(c.logprobs)] = torch.tensor(c.logprobs, device=device)
            gap = (logp.detach() - vllm_lp)
            denom = mask.sum().clamp(min=1)
            stats["sampling_logp_diff"] += float((gap.abs() * mask).sum() / denom) * weight
            stats["sampling_ratio"] += float((torch.exp(gap) * mask).sum() / denom) * weight
        stats["loss"] += loss.item() * weight
        for k, v in s.items():
            stats[k] += v * weight
    params = [p for p in model.parameters() if p.requires_grad]
    stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
    return stats
