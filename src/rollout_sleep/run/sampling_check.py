"""Is the sampling correction training on the batch, or dropping most of it? A warning when it drops most.

The GRPO loss reweights each completion (or token) by the ratio of the trainer's probability of the sampled tokens
to the engine's (``train.sampling_correction``, TRL's ``vllm_importance_sampling_*``); ``*_mask`` modes give weight
0 to ratios outside ``[train.sampling_clip_min, train.sampling_clip_max]``, ``*_truncate`` modes clamp them. When
the engine's numerics differ from the trainer's (an FP8 engine beside a bf16 trainer measured a per-token log-prob
gap of 0.31 on an H100), a sequence's ratio compounds that gap over every token: ``sequence_mask`` then masked
~97 % of the completions (``sampling_weight_mean`` 0.025) and the run trained on ~3 % of its samples, silently.

:class:`SamplingCheck` reads each step's statistics (:meth:`rollout_sleep.grpo.loss.GRPOLoss.step`): when the
mean weight falls below ``threshold`` (or, in a ``*_mask`` mode, more than ``1 - threshold`` of the completion
tokens are masked: the survivors' weights, ratios up to ``sampling_clip_max``, can hold the mean above the
threshold while most of the step is dropped) it warns (``rollout_sleep.run.sampling_check`` logger) with the numbers,
the likely causes and the keys that fix it, at the first such step; then a one-line reminder every
``remind_every``-th low step, not every step. Each step's ``sampling_weight_low`` (1 when below) goes into the
metrics (metrics.jsonl, W&B); the recipe puts the warning's text into W&B's summary.

>>> check = SamplingCheck("sequence_mask", None, 3.0)
>>> check.observe(1, {"sampling_weight_mean": 0.97, "sampling_masked_sequences": 0.0})
{'sampling_weight_low': 0.0}
>>> check.message is None
True
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

METRIC = "sampling_weight_mean"
THRESHOLD = 0.5  # below: the step trains on less than half of what it sampled
REMIND_EVERY = 50  # low steps between two reminders


class SamplingCheck:
    """Warn when the sampling correction's mean weight of a step is below ``threshold``; see the module.

    ``mode``, ``clip_min``, ``clip_max``: the loss's correction (named in the message); ``verify_every``: the
    engine's, to point at the likely cause. Statistics are this process's share of
    the batch (the main process's in a multi-process run).
    """

    def __init__(self, mode: str, clip_min: float | None, clip_max: float | None, *, threshold: float = THRESHOLD,
                 remind_every: int = REMIND_EVERY, verify_every: int | None = None):
        if remind_every < 1:
            raise ValueError(f"remind_every must be >= 1, got {remind_every}")
        self.mode, self.clip_min, self.clip_max = mode, clip_min, clip_max
        self.threshold, self.remind_every = threshold, remind_every
        self.verify_every = verify_every
        self.seen = 0  # steps observed
        self.low = 0  # of them, below the threshold
        self.first_low: int | None = None  # the step of the full warning
        self.message: str | None = None  # the warning (or reminder) the last observed step gave, else None

    @classmethod
    def from_config(cls, cfg, **kwargs) -> SamplingCheck:
        """The check of a recipe config (:class:`~rollout_sleep.run.schema.RecipeConfig`)."""
        t = cfg.train
        return cls(t.sampling_correction, t.sampling_clip_min, t.sampling_clip_max,
                   verify_every=cfg.engine.verify_every, **kwargs)

    def observe(self, step: int, stats: dict, *, warn: bool = True) -> dict[str, float]:
        """Read step ``step``'s statistics; warn (when ``warn``: the main process) at the first step whose
        ``sampling_weight_mean`` is below the threshold, remind every ``remind_every``-th low step after. Returns
        the step's metrics: ``sampling_weight_low`` (1.0 below the threshold, else 0.0); ``{}`` without a
        correction (``none``: every weight is 1)."""
        self.message = None
        weight = stats.get(METRIC)
        if self.mode == "none" or weight is None:
            return {}
        self.seen += 1
        if not self._low(stats):
            return {"sampling_weight_low": 0.0}
        self.low += 1
        if self.first_low is None:
            self.first_low = step
            self.message = self.explain(step, stats)
        elif (self.low - 1) % self.remind_every == 0:
            what, now = (f"{METRIC} is still below {self.threshold:g}", f"{weight:.3g}") if weight < self.threshold \
                else (f"sampling_masked_tokens is still above {1 - self.threshold:g}",
                      f"{stats['sampling_masked_tokens']:.3g}")
            self.message = (f"{what}: {self.low} of the {self.seen} steps so far (now {now} at step {step}"
                            f"{self._dropped(stats, ', ')}); the causes and fixes are in the warning of step "
                            f"{self.first_low}")
        if self.message is not None and warn:
            logger.warning(self.message)
        return {"sampling_weight_low": 1.0}

    def _low(self, stats: dict) -> bool:
        """The mean weight below the threshold, or (``*_mask``) the share of completion tokens kept."""
        masked = stats.get("sampling_masked_tokens")
        return stats[METRIC] < self.threshold or (self.masks and masked is not None and masked > 1 - self.threshold)

    def _dropped(self, stats: dict, lead: str = "") -> str:
        seqs = stats.get("sampling_masked_sequences")
        return f"{lead}{100 * seqs:.1f}% of the completions dropped" if seqs is not None and self.masks else ""

    @property
    def masks(self) -> bool:
        return self.mode.endswith("_mask")

    def _bounds(self) -> str:
        lo = "-inf" if self.clip_min is None else f"{self.clip_min:g}"
        hi = "inf" if self.clip_max is None else f"{self.clip_max:g}"
        return (f"[{lo}, {hi}] (train.sampling_clip_min={self.clip_min}, train.sampling_clip_max={self.clip_max})")

    def explain(self, step: int, stats: dict) -> str:
        """The full warning: the numbers, the likely causes, the fixes."""
        weight = stats[METRIC]
        unit = "completion" if self.mode.startswith("sequence") else "token"
        if self.masks:
            seqs, toks = stats.get("sampling_masked_sequences"), stats.get("sampling_masked_tokens")
            shares = [f"{100 * seqs:.1f}% of the step's completions" if seqs is not None else None,
                      f"{100 * toks:.1f}% of its completion tokens" if toks is not None else None]
            dropped = " and ".join(s for s in shares if s) or "most of the step's samples"
            kept = 1 - toks if toks is not None else weight  # a masked token trains on nothing, the rest on its ratio
            what = (f"train.sampling_correction={self.mode} gives weight 0 to each {unit} whose trainer/engine "
                    f"probability ratio is outside {self._bounds()}: it masked {dropped}, and the weights average "
                    f"{weight:.3g}: the step trained on about {100 * kept:.1f}% of what it sampled")
        else:
            what = (f"train.sampling_correction={self.mode} clamps each {unit}'s trainer/engine probability ratio to "
                    f"{self._bounds()}: the weights average {weight:.3g}, so the step's gradient is about "
                    f"{100 * weight:.1f}% of its size")
        gap, ratio = stats.get("sampling_logp_diff"), stats.get("sampling_ratio")
        numbers = ""
        if gap is not None:
            numbers = (f" The trainer's log-probs of the sampled tokens differ from the engine's by {gap:.3g} per "
                       f"token on average (sampling_logp_diff")
            numbers += f"; mean per-token ratio sampling_ratio={ratio:.3g})." if ratio is not None else ")."
            if self.mode.startswith("sequence"):
                numbers += (" A sequence's ratio is the product of its tokens' ratios: a per-token gap compounds over "
                            "the completion's length.")
        verify = " (this run: engine.verify_every=0, never verified)" if self.verify_every == 0 else \
            " (this run verifies every sync)" if self.verify_every == 1 else ""
        causes = ("Likely causes: the engine's weights or numerics differ from the trainer's: a quantized checkpoint "
                  "(FP8, int4) beside a trainer in bf16, or a weight sync that did not land (run verify: "
                  f"engine.verify_every=1 checks every sync bitwise{verify}); or the sampling and the loss use "
                  "different distributions: a temperature/top-p/top-k mismatch (the loss scores at train.temperature "
                  "with no top-p/top-k; sample the same way).")
        fixes = ["a checkpoint in the trainer's precision (model.path)"]
        if self.verify_every != 1:
            fixes.append("engine.verify_every=1 to prove each sync landed")
        if self.mode.startswith("sequence"):
            fixes.append("a per-token correction, which does not compound the gap (train.sampling_correction="
                         "token_truncate or token_mask)")
        if self.masks:
            clamped = self.mode.replace("_mask", "_truncate")
            fixes.append(f"clamping instead of masking (train.sampling_correction={clamped})")
        fixes += ["wider bounds (train.sampling_clip_max, train.sampling_clip_min)",
                  "no correction (train.sampling_correction=none)"]
        head = f"{METRIC}={weight:.3g}, below {self.threshold:g}" if weight < self.threshold else \
            (f"sampling_masked_tokens={stats['sampling_masked_tokens']:.3g}, above {1 - self.threshold:g} "
             f"({METRIC}={weight:.3g})")
        return (f"step {step}: {head}: {what}.{numbers} {causes} Fixes: "
                + "; ".join(fixes) + f". (Warned once; reminded every {self.remind_every} such steps; logged per "
                "step as sampling_weight_low.)")

