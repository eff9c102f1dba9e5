"""Did the optimizer step change the weights? A sampled before/after check, and a warning when it did not.

Training pure bf16 (weights in bfloat16, no float32 master copy) with a small learning rate changes nothing:
AdamW moves a weight by about ``lr``, and bfloat16 keeps 8 significant bits, so near |w| ~ 0.02 its
neighbouring values are 1.2e-4 apart and an update of 1e-6 rounds back to the same weight. Loss and gradients
look normal; the reward stays flat.

:class:`UpdateCheck` hooks the optimizer that really updates the weights (the innermost
``torch.optim.Optimizer``: inside accelerate's wrapper, inside DeepSpeed's ZeRO optimizer, whose parameters are
its flat float32 master partitions) with PyTorch's step pre/post hooks. On a checked step it reads a fixed
sample of each stepped tensor's local data (this rank's shard of an FSDP2 DTensor; only parameters with a
gradient, so a PEFT model's frozen weights are left out) before the step and compares after it. The result is
the fraction of sampled elements with a non-zero gradient whose value changed, overall and per dtype; the
first check warns (``rollout_sleep.run.update_check`` logger) when it is below ``threshold``.

>>> spacing(0.02, torch.bfloat16)  # bf16's gap between neighbouring values near 0.02
0.0001220703125
>>> print(lr_note(1e-6, torch.bfloat16, 0.02))  # doctest: +ELLIPSIS
train.lr=1e-06 is below half of bfloat16's spacing near |w|~0.02 (1.2e-04): ... (train.stochastic_rounding=true)
>>> lr_note(1e-6, torch.float32, 0.02) is None and lr_note(1e-3, torch.bfloat16, 0.02) is None
True
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from rollout_sleep.weights.stream import local_shard

logger = logging.getLogger(__name__)

SLOTS = (torch.float32, torch.bfloat16, torch.float16)  # the per-dtype counts; any other dtype: one more slot
METRIC = "train/updated_fraction"
FIXES = ("Fixes: train in fp32 master weights (model.dtype=float32 with train.mixed_precision=bf16), a larger "
         "train.lr, or stochastic rounding, which keeps the updates in expectation (train.stochastic_rounding=true)")


def spacing(magnitude: float, dtype: torch.dtype) -> float:
    """The gap between ``dtype``'s neighbouring values near ``magnitude`` (an update under half of it rounds
    away)."""
    info = torch.finfo(dtype)
    return 2.0 ** math.floor(math.log2(max(abs(magnitude), info.tiny))) * info.eps


def lr_note(lr: float, dtype: torch.dtype, magnitude: float) -> str | None:
    """The warning for weights of ``dtype`` stepped in place when ``lr`` (AdamW's update size) is below half
    of the dtype's spacing near ``magnitude`` (a typical |w|); ``None`` when it is not."""
    gap = spacing(magnitude, dtype)
    if dtype == torch.float32 or lr >= gap / 2:
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"train.lr={lr:.0e} is below half of {name}'s spacing near |w|~{magnitude:.2g} ({gap:.1e}): with "
            f"{name} weights and no float32 master copy, AdamW's updates of ~lr round away and most weights will "
            f"not change (the first optimizer step measures it: {METRIC}). {FIXES}")


def checkpoint_magnitude(path: str | Path, tensors: int = 4, elements: int = 1 << 16) -> float | None:
    """The median |w| of a few 2-D weight matrices of a local safetensors checkpoint (their first rows only:
    ``elements`` per tensor at most, nothing else is read); ``None`` when ``path`` is no local checkpoint."""
    from safetensors import safe_open

    from rollout_sleep.weights.spec import checkpoint_files

    if not Path(path).is_dir():
        return None
    values = []
    try:
        for f in checkpoint_files(path):
            with safe_open(str(f), framework="pt") as fh:
                for name in fh.keys():
                    s = fh.get_slice(name)
                    shape = s.get_shape()
                    if len(values) == tensors or len(shape) != 2 or "embed" in name or "lm_head" in name:
                        continue
                    rows = max(1, elements // max(1, shape[1]))
                    values.append(s[:rows].float().abs().flatten())
    except Exception as err:  # an unreadable checkpoint is reported where it is loaded; this is only a hint
        logger.info("the typical weight magnitude of %s could not be read (%s): no config-time lr note", path, err)
        return None
    sampled = torch.cat(values) if values else torch.empty(0)
    finite = sampled[sampled.isfinite()]  # a NaN or inf is the loader's to report; this is only a hint
    return float(finite.median()) if finite.numel() else None


def innermost_optimizer(optimizer) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` that updates the weights: through accelerate's ``AcceleratedOptimizer``
    and DeepSpeed's wrappers (each keeps the next as ``.optimizer``)."""
    found, seen = None, set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if isinstance(optimizer, torch.optim.Optimizer):
            found = optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    if found is None:
        raise TypeError("the optimizer wraps no torch.optim.Optimizer: nothing to hook the update check on")
    return found


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The elements of ``t`` at flat positions ``index`` (no copy of ``t``)."""
    if t.is_contiguous():
        return t.view(-1)[index]
    return t[torch.unravel_index(index, t.shape)]


class UpdateCheck:
    """Count, on checked steps, the sampled weights a step changed; see the module's docstring.

    ``every``: check the first step, then every step that is a multiple of it. ``sample``: elements read per
    tensor at most (fixed positions, drawn once per tensor from ``seed``): bounded memory, ``sample`` values
    and indices per tensor. Use: ``arm(step)`` before the step, :meth:`result` after it (every rank alike: a
    multi-process run passes ``reduce`` to sum the counts over ranks).
    """

    def __init__(self, optimizer, *, every: int = 50, sample: int = 1024, threshold: float = 0.1, seed: int = 0):
        if every < 1 or sample < 1:
            raise ValueError(f"every and sample must be >= 1, got every={every}, sample={sample}")
        self.optimizer = innermost_optimizer(optimizer)
        self.every, self.sample, self.threshold, self.seed = every, sample, threshold, seed
        self.indices: dict[int, torch.Tensor] = {}  # id(tensor) -> its fixed flat positions
        self._sizes: dict[int, int] = {}  # id(tensor) -> its element count when they were drawn
        self.checks = 0  # steps measured so far (with a sampled gradient)
        self.lr = 0.0
        self._armed = False
        self._before: list | None = None
        self._counts: torch.Tensor | None = None
        self._magnitude: dict[int, float] = {}
        self.handles = [self.optimizer.register_step_pre_hook(self._pre),
                        self.optimizer.register_step_post_hook(self._post)]

    def due(self, step: int) -> bool:
        """Whether ``step`` is checked: the first measured one, then every ``every``-th."""
        return self.checks == 0 or step % self.every == 0

    def arm(self, step: int) -> bool:
        """Measure the next optimizer step if ``step`` is due; returns whether it is."""
        self._armed, self._before, self._counts = self.due(step), None, None
        return self._armed

    def sampled_elements(self) -> int:
        """Elements read per check (the memory held between the hooks is this many values and indices)."""
        return sum(i.numel() for i in self.indices.values())

    def _positions(self, p: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        index, n = self.indices.get(id(p)), data.numel()
        # a tensor resized in place (``p.data = ...``) or a new one under a freed one's id: draw its positions anew
        if index is None or index.device != data.device or self._sizes.get(id(p)) != n:
            self._sizes[id(p)] = n
            if n <= self.sample:
                index = torch.arange(n)
            else:
                gen = torch.Generator().manual_seed(self.seed + len(self.indices))
                index = torch.unique(torch.randint(n, (self.sample,), generator=gen))
            index = self.indices[id(p)] = index.to(data.device)
        return index

    @torch.no_grad()
    def _pre(self, opt, args, kwargs) -> None:
        if not self._armed:
            return
        self.lr = max(float(g["lr"]) for g in opt.param_groups) if opt.param_groups else 0.0
        self._before = []
        for group in opt.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                data, grad = local_shard(p.detach()), local_shard(p.grad.detach())
                if data.numel() == 0 or not data.is_floating_point():
                    continue
                index = self._positions(p, data)
                slot = SLOTS.index(data.dtype) if data.dtype in SLOTS else len(SLOTS)
                self._before.append((p, index, _take(data, index).clone(), _take(grad, index) != 0, slot))

    @torch.no_grad()
    def _post(self, opt, args, kwargs) -> None:
        if self._before is None:
            return
        per_device: dict[torch.device, torch.Tensor] = {}
        magnitudes: dict[int, list[torch.Tensor]] = {}
        for p, index, before, moved, slot in self._before:
            after = _take(local_shard(p.detach()), index)
            acc = per_device.setdefault(before.device, torch.zeros(len(SLOTS) + 1, 2, dtype=torch.float64,
                                                                   device=before.device))
            acc[slot, 0] += ((after != before) & moved).sum()
            acc[slot, 1] += moved.sum()
            magnitudes.setdefault(slot, []).append(before[moved].float().abs())
        counts = torch.zeros(len(SLOTS) + 1, 2, dtype=torch.float64)
        for acc in per_device.values():
            counts += acc.cpu()
        self._counts = counts
        self._magnitude = {s: float(torch.cat(m).median()) for s, m in magnitudes.items() if sum(x.numel() for x in m)}
        self._before = None

    def result(self, step: int, grad_norm: float, *, reduce=None, warn: bool = True) -> dict[str, float]:
        """The metrics of the step armed for ``step`` (``{}`` when it was not checked or no sampled element had a
        gradient): ``train/updated_fraction`` and one ``train/updated_fraction/<dtype>`` per dtype seen. The
        first measured check warns (when ``warn``: rank zero) if the fraction is under ``threshold`` while
        ``grad_norm`` and the learning rate are non-zero. ``reduce(counts)`` sums a tensor over ranks."""
        if not self._armed:
            return {}
        self._armed = False
        counts = self._counts if self._counts is not None else torch.zeros(len(SLOTS) + 1, 2, dtype=torch.float64)
        self._counts = None
        if reduce is not None:
            counts = reduce(counts).cpu()
        changed, total = counts[:, 0], counts[:, 1]
        if float(total.sum()) == 0:
            logger.info("update check at step %d: no sampled weight had a non-zero gradient", step)
            return {}
        self.checks += 1
        fraction = float(changed.sum() / total.sum())
        names = [str(d).removeprefix("torch.") for d in SLOTS] + ["other"]
        metrics = {METRIC: fraction}
        metrics.update({f"{METRIC}/{names[s]}": float(changed[s] / total[s])
                        for s in range(len(names)) if total[s] > 0})
        if self.checks == 1 and warn and fraction < self.threshold and grad_norm > 0 and self.lr > 0:
            logger.warning(self._explain(step, changed, total, names))
        return metrics

    def _explain(self, step: int, changed: torch.Tensor, total: torch.Tensor, names: list[str]) -> str:
        """Which dtype's sampled weights stayed, and why: rounding (lr under half the spacing) or not."""
        slot = int(torch.argmax(total - changed))  # the dtype with the most unchanged sampled weights
        unchanged = 100 * float((total[slot] - changed[slot]) / total[slot])
        head = (f"{unchanged:.1f}% of the sampled {names[slot]} weights (those with a non-zero gradient) did not "
                f"change at step {step}")
        magnitude = self._magnitude.get(slot)
        if magnitude is None or slot >= len(SLOTS):
            return f"{head} (lr={self.lr:.0e}). {FIXES}"
        gap = spacing(magnitude, SLOTS[slot])
        if self.lr < gap / 2:
            return (f"{head}: an update of ~lr={self.lr:.0e} is below {names[slot]}'s spacing near "
                    f"|w|~{magnitude:.2g} ({gap:.1e}), so it rounds away. {FIXES}")
        return (f"{head}, although lr={self.lr:.0e} is above half of {names[slot]}'s spacing near |w|~{magnitude:.2g} "
                f"({gap:.1e}): rounding does not explain it; check that the optimizer holds the model's own parameters "
                "and that its steps are not skipped")

    def remove(self) -> None:
        """Unhook the check from the optimizer."""
        for h in self.handles:
            h.remove()
