"""GRPO's pieces (group-normalized advantages, completion log-probs, the vLLM-mismatch correction, TRL's losses)
and :class:`GRPOLoss`: the loss configured once, whose ``step`` is one optimizer step on a rollout batch.

>>> import torch
>>> [round(a, 3) for a in group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2).tolist()]
[0.707, -0.707, 0.0, 0.0]
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """Reward minus its group's mean (divided by the group's std when ``scale``); groups are consecutive.
    NaN rewards (completions no reward scored) stay out of their group's mean and std and get advantage 0 (TRL)."""
    g = rewards.view(-1, group_size)
    mean = g.nanmean(1, keepdim=True)
    adv = g - mean
    if scale:
        count = (~torch.isnan(g)).sum(1, keepdim=True)
        std = (adv.square().nansum(1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        adv = adv / (std + eps)
    return adv.nan_to_num(0.0).view(-1)


def pad_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Prompts left-padded to a common width, completions right-padded after them (so every completion
    starts at the same column and the model needs logits for the completion columns only).

    Returns ``ids`` and ``attention_mask`` (``[batch, P + C]``), ``position_ids`` that count real tokens
    only (left padding must not shift positions) and ``mask`` (``[batch, C]``): 1 at completion tokens.
    """
    width_p, width_c = max(len(p) for p in prompts), max(len(c) for c in completions)
    ids = torch.full((len(prompts), width_p + width_c), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, width_p - len(p): width_p + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attn[i, width_p - len(p): width_p + len(c)] = 1
    positions = (attn.cumsum(1) - 1).clamp(min=0)
    return ids, attn, positions, attn[:, width_p:].float()


class _SelectedLogProbs(torch.autograd.Function):
    """``log_softmax(logits.float() / temperature)`` at the target tokens, computed in row chunks: float32 never
    exists for more than a chunk, and backward recomputes the softmax from the (bf16) logits instead of keeping
    float32 copies (``batch x len x vocab`` x 4 bytes: 2.5 GB for 32 x 128 tokens of a 152k vocabulary)."""

    @staticmethod
    def forward(ctx, logits, targets, n, temperature):  # logits [B, T, V]; positions [:, :n] predict targets [B, n]
        rows = _chunk_rows(logits, n)
        out = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for b in range(0, logits.shape[0], rows):
            x = _scaled(logits[b: b + rows, :n], temperature)
            lse[b: b + rows] = torch.logsumexp(x, -1)
            out[b: b + rows] = x.gather(-1, targets[b: b + rows, :, None])[..., 0] - lse[b: b + rows]
        ctx.save_for_backward(logits, targets, lse)
        ctx.n, ctx.temperature = n, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, lse = ctx.saved_tensors
        n, t, rows = ctx.n, ctx.temperature, _chunk_rows(logits, ctx.n)
        grad = torch.empty_like(logits)
        grad[:, n:].zero_()  # positions past n predict nothing here; the rest is written below
        for b in range(0, logits.shape[0], rows):
            g = grad_out[b: b + rows, :, None].float() / t  # d(x / t) / dx = 1 / t
            d = (_scaled(logits[b: b + rows, :n], t) - lse[b: b + rows, :, None]).exp_().mul_(-g)  # -g * softmax
            d.scatter_add_(-1, targets[b: b + rows, :, None], g)
            grad[b: b + rows, :n] = d
        return grad, None, None, None


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    x = logits.float()
    return x if temperature == 1.0 else x / temperature


def _chunk_rows(logits: torch.Tensor, n: int, budget_bytes: int = 256 * 2**20) -> int:
    return max(1, budget_bytes // max(1, n * logits.shape[-1] * 4))


def selected_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Float32 log-prob of ``targets`` (``[B, n]``) under ``logits / temperature`` (``[B, T >= n, V]``, positions
    ``:n``): the distribution vLLM samples from at that temperature (and TRL scores)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return _SelectedLogProbs.apply(logits, targets, targets.shape[1], float(temperature))


_HEAD_BUDGET = 256 * 2**20  # bytes of float32 logits one chunk of the fused head may hold


def _head_chunk(width: int, budget_bytes: int = _HEAD_BUDGET) -> int:
    """Rows (forward) or vocabulary columns (backward) per chunk of :func:`linear_selected_logprobs`: float32
    logits of ``width`` columns (rows) each within ``budget_bytes``."""
    return max(1, budget_bytes // max(1, width * 4))


class _LinearSelectedLogProbs(torch.autograd.Function):
    """:func:`selected_logprobs` of ``hidden @ weight.T`` without the logits: forward in row chunks, backward in
    vocabulary chunks, each recomputing its logits from ``hidden`` and ``weight`` (which the LM head keeps for its
    backward anyway). Only float32 log-sum-exps (one per row) are kept between forward and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, dtype):  # hidden [N, H], weight [V, H], targets [N]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
            lse = torch.empty_like(out)
            rows = _head_chunk(w.shape[0])
            for r in range(0, h.shape[0], rows):
                x = _scaled_fresh(torch.nn.functional.linear(h[r: r + rows], w), temperature)  # as lm_head would
                lse[r: r + rows] = torch.logsumexp(x, -1)
                out[r: r + rows] = x.gather(-1, targets[r: r + rows, None])[:, 0] - lse[r: r + rows]
                del x
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.dtype = temperature, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        t, dtype = ctx.temperature, ctx.dtype
        need_h, need_w = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            g = grad_out.float() / t  # d(x / t) / dx = 1 / t
            grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
            grad_w = torch.empty(w.shape, dtype=dtype, device=w.device) if need_w else None
            cols = _head_chunk(h.shape[0])
            for v in range(0, w.shape[0], cols):
                wc = w[v: v + cols]
                # -g * softmax, plus g at the target (in this chunk): the gradient of the chunk's logits, in the
                # logits' dtype as the unfused path hands it to the LM head's backward
                d = _scaled_fresh(torch.nn.functional.linear(h, wc), t).sub_(lse[:, None]).exp_().mul_(-g[:, None])
                local = targets - v  # targets outside the chunk add 0 (no boolean indexing: no device sync)
                here = (local >= 0) & (local < wc.shape[0])
                d.scatter_add_(1, local.clamp(0, wc.shape[0] - 1)[:, None], (g * here)[:, None])
                d = d.to(dtype)
                if need_h:
                    grad_h += d @ wc
                if need_w:
                    torch.mm(d.t(), h, out=grad_w[v: v + cols])
                del d
        grad_h = grad_h.to(hidden.dtype) if need_h else None
        grad_w = grad_w.to(weight.dtype) if need_w else None
        return grad_h, grad_w, None, None, None


def _scaled_fresh(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`_scaled` of a temporary: divided in place (one float32 chunk at a time, not two)."""
    x = logits.float()
    return x if temperature == 1.0 else x.div_(temperature)


def linear_selected_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             temperature: float = 1.0) -> torch.Tensor:
    """:func:`selected_logprobs` of the logits ``hidden @ weight.T`` (an LM head without bias), never holding more
    than one chunk of logits: ``hidden`` ``[B, n, H]`` (position ``i`` predicts ``targets[:, i]``), ``weight``
    ``[V, H]``, ``targets`` ``[B, n]``; float32 ``[B, n]``.

    Logits are computed as the LM head computes them (``F.linear`` in the weight's dtype, or autocast's dtype
    under autocast), divided by ``temperature`` and log-softmaxed in float32, chunk by chunk (at most 256 MiB of
    float32 logits each). Backward recomputes each chunk's logits (one more ``hidden @ W.T`` in all) and returns
    the gradients of ``hidden`` (accumulated in float32 over vocabulary chunks) and ``weight`` (each vocabulary
    chunk's rows in one product over all positions, as the unfused LM head's). A tied weight receives its gradient
    like any other use of the parameter: autograd adds it to the embedding's.

    >>> h, w = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(11, 8, dtype=torch.float64)
    >>> tgt = torch.tensor([[1, 2, 3], [4, 5, 10]])
    >>> ref = torch.log_softmax(h @ w.T / 0.7, -1).gather(-1, tgt[..., None])[..., 0]
    >>> torch.allclose(linear_selected_logprobs(h, w, tgt, 0.7).double(), ref.float().double(), atol=1e-6)
    True
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    kind = hidden.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
    b, n, width = hidden.shape
    out = _LinearSelectedLogProbs.apply(hidden.reshape(b * n, width), weight, targets.reshape(b * n),
                                        float(temperature), dtype)
    return out.view(b, n)


FUSED_HEAD = True
"""Whether :func:`completion_logprobs` takes the fused LM head (:func:`linear_selected_logprobs`) where the model
allows it (see :func:`fused_head_problem`); ``False``: always the model's own logits."""

# Model types whose causal LM returns ``lm_head(hidden)`` as its logits with nothing after it (transformers 5: the
# project's families, tests/grpo/test_fused_head.py). Gemma 2 / 3 qualify without final-logit soft-capping only.
FUSED_MODEL_TYPES = frozenset({"qwen3", "qwen2", "llama", "mistral", "phi3", "qwen3_moe", "mixtral", "gemma2",
                               "gemma3_text"})
# config attributes that transform the logits after the LM head (soft-capping, scaling): their models fall back
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_fallbacks_logged: set[str] = set()


def fused_config_problem(config) -> str | None:
    """Why a model of this transformers ``config`` cannot take the fused LM head (``None``: it can): a model type
    not known to return the LM head's output unchanged, or logits transformed after the head."""
    config = getattr(config, "text_config", None) or config
    kind = getattr(config, "model_type", None)
    if kind not in FUSED_MODEL_TYPES:
        return f"model type {kind!r} is not known to return its LM head's output as the logits"
    for attr in _LOGIT_TRANSFORMS:
        value = getattr(config, attr, None)
        if value is not None and not (attr in ("logit_scale", "logits_scaling") and value == 1):
            return f"its logits are transformed after the LM head ({attr}={value})"
    return None


def fused_head_problem(model) -> tuple[torch.nn.Module | None, str | None]:
    """``(lm_head, None)`` where :func:`completion_logprobs` can run ``model``'s LM head fused with the log-softmax
    (:func:`linear_selected_logprobs`), else ``(None, why not)``. The head is swapped for the fused function during
    the model's own forward, so wrappers (DDP, DeepSpeed, PEFT) run as usual and see the head's weight in the graph.

    Falls back to the model's logits (then :func:`selected_logprobs`) for: a model ``torch.compile`` wraps, or a
    compiled or hooked (accelerate) head; model types and configs :func:`fused_config_problem` refuses; a head that
    is not a plain ``nn.Linear`` without bias (LoRA or quantized heads); and a sharded weight (FSDP2's DTensor,
    DeepSpeed ZeRO-3's partitioned parameter), which is only whole inside its module's forward hooks. One copy
    (``model.share_weights``: the weight a view of vLLM's, its real rows only) takes the fused head."""
    from rollout_sleep.weights.stream import unwrap

    if not FUSED_HEAD:
        return None, "the fused head is off (rollout_sleep.grpo.loss.FUSED_HEAD)"
    m = model
    while True:  # the wrappers unwrap() strips, one at a time
        if hasattr(m, "_orig_mod"):
            return None, "torch.compile wraps the model"
        if type(m).__name__ == "DataParallel":  # replicas copy the swapped forward, bound to the original weight
            return None, "DataParallel replicates the model"
        if m is not unwrap(m):
            m = m.module
        elif hasattr(m, "get_base_model") and m.get_base_model() is not m:  # PEFT
            m = m.get_base_model()
        else:
            break
    config = getattr(m, "config", None)
    if config is None or not hasattr(m, "get_output_embeddings"):
        return None, f"{type(m).__name__} is not a transformers causal LM"
    problem = fused_config_problem(config)
    if problem:
        return None, problem
    head = m.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None:
        kind = "a Linear with a bias" if type(head) is torch.nn.Linear else type(head).__name__
        return None, f"the LM head is {kind}, not a plain Linear"
    if "forward" in head.__dict__ or getattr(head, "_compiled_call_impl", None) is not None:
        return None, "the LM head's forward is replaced (accelerate hooks) or compiled"
    w = head.weight
    if hasattr(w, "ds_id") or type(w).__name__ == "DTensor" or hasattr(w, "device_mesh"):
        return None, "the LM head's weight is sharded (FSDP2 / DeepSpeed ZeRO-3)"
    return head, None


def _fused_head(model) -> torch.nn.Module | None:
    head, problem = fused_head_problem(model)
    if problem and problem not in _fallbacks_logged:
        _fallbacks_logged.add(problem)
        import logging

        logging.getLogger(__name__).info("log-probs from the model's full logits (no fused LM head): %s", problem)
    return head


def _keeps_logits(model) -> bool:
    """Whether the model under its wrappers (DDP, DeepSpeed, ``torch.compile``, PEFT) takes ``logits_to_keep``
    (Hugging Face causal LMs do; the wrappers pass keyword arguments through)."""
    from rollout_sleep.weights.stream import unwrap

    model = unwrap(model)
    if hasattr(model, "get_base_model"):  # PEFT
        model = unwrap(model.get_base_model())
    return _takes_logits_to_keep(getattr(model.forward, "__func__", model.forward))


@functools.lru_cache(maxsize=64)
def _takes_logits_to_keep(forward) -> bool:  # once per forward function, not per micro-batch
    return "logits_to_keep" in inspect.signature(forward).parameters


def completion_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, positions: torch.Tensor,
                        n: int, temperature: float = 1.0) -> torch.Tensor:
    """Log-probs (``[batch, n]``, float32) of the last ``n`` columns of ``ids`` (the completions of
    :func:`pad_batch`) under ``model`` with its logits divided by ``temperature`` (the sampling distribution);
    the LM head runs on those columns only where the model allows.

    Where :func:`fused_head_problem` allows (Qwen3 and the project's other families, one process or DDP), the LM
    head is fused with the log-softmax (:func:`linear_selected_logprobs`): for the model's forward its head's
    ``forward`` is swapped for that function, so the model returns the log-probs as its "logits" and neither the
    ``[batch, n, vocab]`` logits nor their gradient ever exist; otherwise (logged once per reason) the model's
    logits and :func:`selected_logprobs`. Both agree to the dtype's rounding (tests/grpo/test_fused_head.py)."""
    kw = {"logits_to_keep": n + 1} if _keeps_logits(model) else {}
    targets = ids[:, -n:]
    head = _fused_head(model)
    if head is None:
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions, **kw).logits
        return selected_logprobs(logits[:, -(n + 1):], targets, temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")

    def fused(hidden):  # [B, n + 1, H] (or all positions without logits_to_keep): positions :n predict targets
        return linear_selected_logprobs(hidden[:, -(n + 1):-1], head.weight, targets, temperature)

    head.forward = fused
    try:
        out = model(input_ids=ids, attention_mask=attn, position_ids=positions, **kw).logits
    finally:
        del head.forward
    if out.shape != targets.shape:
        raise RuntimeError(f"the fused LM head returned {tuple(out.shape)}, expected {tuple(targets.shape)}: the "
                           "model transformed its head's output (set rollout_sleep.grpo.loss.FUSED_HEAD = False)")
    return out


SAMPLING_CORRECTIONS = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def sampling_correction(logp: torch.Tensor, sampling_logp: torch.Tensor, mask: torch.Tensor, mode: str,
                        clip_min: float | None = None, clip_max: float | None = 3.0) -> torch.Tensor | None:
    """Importance weights for the trainer-vs-sampler (vLLM) mismatch, as TRL's ``vllm_importance_sampling_*``.

    ``exp(logp - sampling_logp)`` per token, or per sequence (the sum over its tokens) for ``sequence_*``;
    ``*_truncate`` clamps it to ``[clip_min, clip_max]``, ``*_mask`` sets ratios outside it to 0. NaN
    sampling log-probs (none returned) count as no mismatch. ``none``: ``None`` (no correction).
    """
    if mode not in SAMPLING_CORRECTIONS:
        raise ValueError(f"unknown sampling correction {mode!r}; choose one of {SAMPLING_CORRECTIONS}")
    if mode == "none":
        return None
    diff = torch.nan_to_num((logp - sampling_logp) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = diff.exp()
    lo = -float("inf") if clip_min is None else clip_min
    hi = float("inf") if clip_max is None else clip_max
    if mode.endswith("truncate"):
        return ratio.clamp(min=lo, max=hi)
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


LOSS_TYPES = ("dapo", "grpo", "dr_grpo", "bnpo")
"""TRL's ``loss_type`` names and formulas (TRL's default: ``dapo``); see :func:`grpo_loss`."""


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
              clip_eps: float = 0.2, ref_logp: torch.Tensor | None = None, kl_coef: float = 0.0,
              weights: torch.Tensor | None = None, *, loss_type: str = "dapo", normalizer: float | None = None,
              max_completion_length: int | None = None, kl_bias_correction: bool = True):
    """TRL's GRPO loss (``GRPOTrainer._compute_loss``) on one micro-batch: clipped policy-gradient term,
    ``weights`` (e.g. :func:`sampling_correction`) on it, plus ``kl_coef`` x the k3 KL to a reference.

    ``loss_type`` sets how token terms are summed (``m``: the mask, ``l``: the per-token loss):

    - ``dapo``: ``sum(l m) / normalizer``, ``normalizer`` = completion tokens of the whole batch (this
      micro-batch's when ``None``): every token weighs the same, wherever it sits;
    - ``grpo``: ``sum_i [sum_t(l m)_i / |o_i|] / normalizer``, ``normalizer`` = sequences of the whole batch: the
      mean over sequences of each sequence's token mean;
    - ``dr_grpo``: ``sum(l m) / (max_completion_length * normalizer)``, ``normalizer`` = sequences;
    - ``bnpo``: ``sum(l m) / sum(m) / normalizer``, ``normalizer`` = micro-batches (TRL's gradient accumulation
      steps): the token mean of each micro-batch, averaged (so it depends on the micro-batch size, as in TRL).

    ``kl_bias_correction`` (TRL's ``use_bias_correction_kl``, on by default there) multiplies the KL by
    ``exp(logp - old_logp)``: 1 in value, but it adds ``kl * grad(logp)`` to the gradient.
    Returns ``(loss, stats)``: ``clip_frac`` and ``kl`` (token means) as 0-d tensors (no device sync).

    With ratio 1, token terms are ``-advantage``: 3 tokens at ``-1`` and 1 at ``+1`` give

    >>> lp, m = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    >>> [round(float(grpo_loss(lp, lp, torch.tensor([1.0, -1.0]), m, loss_type=t, max_completion_length=4)[0]), 3)
    ...  for t in LOSS_TYPES]
    [-0.5, 0.0, -0.25, -0.5]
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; choose one of {LOSS_TYPES}")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' divides by max_completion_length: pass it (the sampling max_tokens)")
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a)
    if weights is not None:
        per_token = per_token * weights
    tokens = mask.sum().clamp(min=1)
    stats = {"clip_frac": ((ratio - 1).abs() > clip_eps).float().mul(mask).sum() / tokens}
    if ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        stats["kl"] = (kl * mask).sum() / tokens
        if kl_bias_correction:
            kl = kl * ratio
        per_token = per_token + kl_coef * kl
    masked = per_token * mask
    if loss_type == "grpo":
        total = (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        default = mask.shape[0]
    elif loss_type == "bnpo":
        total, default = masked.sum() / tokens, 1
    elif loss_type == "dr_grpo":
        total, default = masked.sum() / max_completion_length, mask.shape[0]
    else:
        total, default = masked.sum(), tokens
    loss = total / (default if normalizer is None else normalizer)
    return loss, {k: v.detach() for k, v in stats.items()}


def loss_normalizers(completions, micro_batch: int, device=None) -> dict[str, float]:
    """The normalizer of :func:`grpo_loss` for each loss type on this process's share of a rollout batch,
    such that the gradients averaged over processes (as DDP, FSDP and DeepSpeed reduce them) equal the
    gradient of the whole batch's loss, as TRL's: token and sequence counts are summed over all processes
    (``torch.distributed``, when initialized) and divided by their number; ``bnpo`` counts this process's
    micro-batches (TRL's ``gradient_accumulation_steps``)."""
    counts = torch.tensor([sum(len(c.token_ids) for c in completions), len(completions)], dtype=torch.float64,
                          device=device)
    world = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            torch.distributed.all_reduce(counts)
    tokens, sequences = (float(x) / world for x in counts.tolist())
    return {"dapo": max(tokens, 1.0 / world), "grpo": max(sequences, 1.0 / world),
            "dr_grpo": max(sequences, 1.0 / world), "bnpo": float(max(1, -(-len(completions) // micro_batch)))}


# GRPOLoss field -> the recipe config's key (rollout_sleep.run.schema): the one place the loss reads its config
_CONFIG_KEYS = {"group_size": "train.generations", "loss_type": "train.loss", "clip_eps": "train.clip_eps",
                "kl_coef": "train.kl_coef", "kl_bias_correction": "train.kl_bias_correction",
                "sampling_correction": "train.sampling_correction", "sampling_clip_min": "train.sampling_clip_min",
                "sampling_clip_max": "train.sampling_clip_max", "temperature": "train.temperature",
                "max_completion_length": "train.max_tokens", "micro_batch": "train.micro_batch",
                "max_grad_norm": "train.max_grad_norm"}


def _problems(s: dict, key) -> list[str]:
    """What is wrong with the loss settings ``s`` (by field name), each naming its key as ``key(field)`` gives it."""
    out = []

    def number(name: str, low: float, strict: bool = False, optional: bool = False, finite: bool = True) -> None:
        v = s[name]
        if v is None and optional:
            return
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v) and \
            (math.isfinite(v) or not finite) and (v > low if strict else v >= low)
        if not ok:
            out.append(f"{key(name)} must be {'>' if strict else '>='} {low}, got {v!r}")

    if s["group_size"] < 2:
        out.append(f"{key('group_size')} must be >= 2, got {s['group_size']}: GRPO's advantage is a completion's "
                   "reward minus its group's mean, over the group's standard deviation; a group of one has none "
                   "(every loss would be NaN)")
    if s["loss_type"] not in LOSS_TYPES:
        out.append(f"{key('loss_type')} must be one of {', '.join(LOSS_TYPES)}, got {s['loss_type']!r}")
    if s["sampling_correction"] not in SAMPLING_CORRECTIONS:
        out.append(f"{key('sampling_correction')} must be one of {', '.join(SAMPLING_CORRECTIONS)}, "
                   f"got {s['sampling_correction']!r}")
    number("clip_eps", 0)
    number("kl_coef", 0)
    number("temperature", 0, strict=True)
    number("micro_batch", 1)
    number("max_grad_norm", 0, strict=True, finite=False)  # inf: no clipping
    number("max_completion_length", 1, optional=True)
    number("sampling_clip_min", 0, optional=True)
    number("sampling_clip_max", 0, optional=True)
    lo, hi = s["sampling_clip_min"], s["sampling_clip_max"]
    if lo is not None and hi is not None and lo > hi:
        out.append(f"{key('sampling_clip_min')} ({lo}) must not exceed {key('sampling_clip_max')} ({hi})")
    if s["loss_type"] == "dr_grpo" and not s["max_completion_length"]:
        out.append(f"{key('loss_type')} 'dr_grpo' divides by {key('max_completion_length')}: set it (the sampling "
                   "max_tokens)")
    return out


def _config_value(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@dataclass(frozen=True)
class GRPOLoss:
    """TRL's GRPO loss (:func:`grpo_loss`) and its optimizer step, configured once; :meth:`step` takes a rollout
    batch. Settings are checked here, each error naming its setting (or, from :meth:`from_config`, its config key).

    Args:
        group_size: completions per prompt (consecutive completions form a group).
        pad_id: the token that pads prompts and completions.
        loss_type: TRL's ``loss_type``, one of :data:`LOSS_TYPES`.
        clip_eps: PPO clip range of the policy ratio.
        kl_coef: weight of the k3 KL to a reference model (0: none).
        kl_bias_correction: TRL's ``use_bias_correction_kl``: the KL times the policy ratio.
        sampling_correction: the trainer-vs-vLLM correction, one of :data:`SAMPLING_CORRECTIONS`.
        sampling_clip_min, sampling_clip_max: its ratio bounds (``None``: none).
        temperature: the sampling temperature (log-probs are taken at it).
        max_completion_length: the longest completion (``dr_grpo`` divides by it).
        micro_batch: sequences per forward/backward pass.
        max_grad_norm: the gradients' global norm is clipped to this (``inf``: no clipping).

    Example:

    >>> GRPOLoss(group_size=8, loss_type="dr_grpo")
    Traceback (most recent call last):
    ...
    ValueError: loss_type 'dr_grpo' divides by max_completion_length: set it (the sampling max_tokens)
    """

    group_size: int
    pad_id: int = 0
    loss_type: str = "dapo"
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    kl_bias_correction: bool = True
    sampling_correction: str = "none"
    sampling_clip_min: float | None = None
    sampling_clip_max: float | None = 3.0
    temperature: float = 1.0
    max_completion_length: int | None = None
    micro_batch: int = 16
    max_grad_norm: float = 1.0

    def __post_init__(self):
        problems = _problems(dataclasses.asdict(self), str)
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_config(cls, cfg, pad_id: int = 0) -> GRPOLoss:
        """The loss a recipe config (:class:`~rollout_sleep.run.schema.RecipeConfig`) describes; ``ValueError``
        naming the config keys of any bad setting (see :meth:`config_problems`)."""
        problems = cls.config_problems(cfg)
        if problems:
            raise ValueError("; ".join(problems))
        return cls(pad_id=pad_id, **{name: _config_value(cfg, k) for name, k in _CONFIG_KEYS.items()})

    @staticmethod
    def config_problems(cfg) -> list[str]:
        """Every problem with the loss's keys of a recipe config, each naming its key (the config's own check
        lists them with the rest, before anything starts).

        >>> from rollout_sleep.run.schema import RecipeConfig
        >>> cfg = RecipeConfig()
        >>> cfg.train.loss, cfg.train.micro_batch = "ppo", 0
        >>> for problem in GRPOLoss.config_problems(cfg):
        ...     print(problem)
        train.loss must be one of dapo, grpo, dr_grpo, bnpo, got 'ppo'
        train.micro_batch must be >= 1, got 0
        """
        return _problems({name: _config_value(cfg, k) for name, k in _CONFIG_KEYS.items()}, _CONFIG_KEYS.get)

    def step(self, model, optimizer, prompts: list[list[int]], completions, rewards: torch.Tensor, *,
             ref_model=None, backward=None, autocast=None, clip_grad_norm=None, no_sync=None) -> dict[str, float]:
        """One optimizer step on a rollout batch (``completions``:
        :class:`~rollout_sleep.engine.completion.Completion` of ``prompts``, one reward each): the gradient of the
        whole batch's loss whatever ``micro_batch`` and however many processes share the batch (see
        :func:`loss_normalizers`).

        Log-probs of the sampled tokens are recomputed by the trainer at the sampling ``temperature``; the mean
        |trainer − vLLM| log-prob gap and the mean importance ratio between them are returned with the loss
        statistics, and ``sampling_correction`` reweights the loss by that ratio. One optimizer step per batch: the
        trainer's "old" log-probs are the current ones, so the correction needs no extra forward pass.
        ``sampling_weight_mean`` is the correction's mean weight per completion token; ``sampling_masked_tokens`` and
        ``sampling_masked_sequences`` the shares of completion tokens, and of completions (every token), it gave
        weight 0 (:mod:`rollout_sleep.run.sampling_check` warns when it drops most of a step).
        ``ref_model``: the reference of the KL term (used when ``kl_coef > 0``).

        Hooks, all optional: ``backward`` (e.g. ``accelerator.backward``), ``autocast`` (a context factory),
        ``clip_grad_norm(params, max_norm) -> norm`` (e.g. ``accelerator.clip_grad_norm_``: unscales fp16
        gradients first, clips FSDP/DeepSpeed shards right) and ``no_sync`` (a context factory, e.g.
        ``lambda: accelerator.no_sync(model)``): every micro-batch but the last runs inside it, so DDP all-reduces
        the accumulated gradient once per step. Statistics stay on the device until the end (no sync per
        micro-batch); ``loss`` is this process's loss (the sum of what its micro-batches back-propagated), the
        others are token means over this process's batch.
        """
        import contextlib

        device = next(model.parameters()).device
        adv_all = group_advantages(rewards, self.group_size).to(device)
        n, micro = len(completions), self.micro_batch
        normalizer = loss_normalizers(completions, micro, device)[self.loss_type]
        keys = ("loss", "clip_frac", "kl", "sampling_logp_diff", "sampling_ratio", "sampling_weight_mean",
                "sampling_masked_tokens")
        totals = torch.zeros(len(keys), device=device)  # loss, then token sums of the rest
        tokens = torch.zeros((), device=device)
        masked = torch.zeros(2, device=device)  # completions the correction gave weight 0 on every token; completions
        model.train()
        autocast = autocast or contextlib.nullcontext
        last = (n - 1) // micro * micro  # the last micro-batch's start: its backward synchronizes
        for start in range(0, n, micro):
            accumulate = no_sync() if no_sync is not None and start != last else contextlib.nullcontext()
            chunk = completions[start: start + micro]
            batch = pad_batch([prompts[c.prompt_index] for c in chunk], [c.token_ids for c in chunk], self.pad_id)
            sampled = torch.full(batch[3].shape, float("nan"))  # vLLM's log-probs; NaN where it gave none
            for i, c in enumerate(chunk):
                if c.logprobs is not None:
                    sampled[i, : len(c.logprobs)] = torch.tensor(c.logprobs, dtype=torch.float32)
            ids, attn, positions, mask, sampled = (t.to(device, non_blocking=True) for t in (*batch, sampled))
            width = mask.shape[1]
            with accumulate:  # no_sync: forward and backward both inside (DDP's rule)
                with autocast():
                    logp = completion_logprobs(model, ids, attn, positions, width, self.temperature)
                    ref = None
                    if ref_model is not None and self.kl_coef > 0:
                        with torch.no_grad():
                            ref = completion_logprobs(ref_model, ids, attn, positions, width, self.temperature)
                    weights = sampling_correction(logp.detach(), sampled, mask, self.sampling_correction,
                                                  self.sampling_clip_min, self.sampling_clip_max)
                    loss, s = grpo_loss(logp, logp.detach(), adv_all[start: start + len(chunk)], mask, self.clip_eps,
                                        ref, self.kl_coef, weights, loss_type=self.loss_type, normalizer=normalizer,
                                        max_completion_length=self.max_completion_length,
                                        kl_bias_correction=self.kl_bias_correction)
                (backward or torch.Tensor.backward)(loss)
            with torch.no_grad():
                gap = torch.nan_to_num(logp.detach() - sampled, nan=0.0)
                count = mask.sum()
                w = count if weights is None else (weights.expand_as(mask) * mask).sum()
                zero = torch.zeros_like(mask, dtype=torch.bool) if weights is None else weights.expand_as(mask) == 0
                dropped = (zero | (mask == 0)).all(-1) & (mask.sum(-1) > 0)  # every completion token masked
                totals += torch.stack([loss.detach(), s["clip_frac"] * count,
                                       s.get("kl", torch.zeros((), device=device)) * count,
                                       (gap.abs() * mask).sum(), (gap.exp() * mask).sum(), w.to(device),
                                       (zero * mask).sum()]).float()
                masked += torch.stack([dropped.sum(), (mask.sum(-1) > 0).sum()]).float()
                tokens += count
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = (clip_grad_norm or torch.nn.utils.clip_grad_norm_)(params, self.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        totals[1:] /= tokens.clamp(min=1)
        stats = dict(zip(keys, totals.tolist()))
        dropped, sequences = masked.tolist()
        stats["sampling_masked_sequences"] = dropped / max(sequences, 1.0)
        stats["grad_norm"] = float(grad_norm)
        return stats

