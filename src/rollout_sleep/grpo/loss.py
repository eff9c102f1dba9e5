"""GRPO's pieces (group-normalized advantages, the vLLM-mismatch correction, TRL's losses; the completions'
log-probs are :mod:`rollout_sleep.grpo.logprobs`)
and :class:`GRPOLoss`: the loss configured once, whose ``step`` is one optimizer step on a rollout batch.

>>> import torch
>>> [round(a, 3) for a in group_advantages(torch.tensor([1.0, 0.0, 1.0, 1.0]), group_size=2).tolist()]
[0.707, -0.707, 0.0, 0.0]
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from rollout_sleep.grpo.logprobs import completion_logprobs


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: bool = True,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reward minus its group's mean (divided by the group's std when ``scale``); groups are consecutive.
    NaN rewards (completions no reward scored) stay out of their group's mean and std and get advantage 0 (TRL).

    Computed in float64, each group divided by its largest |reward| first (with ``eps`` divided alike: the same
    value), and returned as ``dtype`` (the loss's): in float32, rewards of ±1e20 made the variance overflow (1e40)
    and every advantage 0, silently.

    >>> group_advantages(torch.tensor([1e20, -1e20, 1e300, -1e300], dtype=torch.float64), 2).tolist()
    [0.7071067690849304, -0.7071067690849304, 0.7071067690849304, -0.7071067690849304]
    """
    g = rewards.detach().to(torch.float64).view(-1, group_size)
    if scale:
        size = g.abs().nan_to_num(0.0).amax(1, keepdim=True)
        size = torch.where(size > 0, size, torch.ones_like(size))  # a group of zeros (or of NaN) stays as it is
        g = g / size
    mean = g.nanmean(1, keepdim=True)
    adv = g - mean
    if scale:
        count = (~torch.isnan(g)).sum(1, keepdim=True)
        std = (adv.square().nansum(1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        adv = adv / (std + eps / size)
    return adv.nan_to_num(0.0).view(-1).to(dtype)


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
        adv_all = group_advantages(rewards, self.group_size).to(device)  # float32, from float64 group statistics
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

