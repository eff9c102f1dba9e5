"""Stop a training step whose gradients are not finite before the optimizer applies them.

:func:`guard_optimizer` registers a step pre-hook on a ``torch.optim.Optimizer`` (PyTorch's own hook; it
fires inside ``accelerate``'s wrapped optimizer too): it computes the total gradient norm, agrees on it
across ranks (one tiny all-reduce when ``torch.distributed`` runs), and raises :class:`NonFiniteError`
naming the parameters whose gradient is NaN/inf. The weights, the optimizer state and every checkpoint
stay as they were before the step.

>>> import torch
>>> model = torch.nn.Linear(2, 1)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> guard = guard_optimizer(opt, model)
>>> model(torch.tensor([[float("nan"), 1.0]])).sum().backward()
>>> opt.step()  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
rollout_sleep.run.nonfinite.NonFiniteError: the gradient norm is nan before the optimizer step; the step was not applied ...
"""

from __future__ import annotations

import math

import torch


class NonFiniteError(FloatingPointError):
    """A NaN/inf in training (rewards, loss, gradients) caught before it reached the weights."""


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    norms = [g.detach().float().norm() for g in grads]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]  # FSDP2 shards: DTensor
    return torch.stack(norms).norm() if norms else torch.zeros(())


def guard_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None):
    """Make ``optimizer.step()`` raise :class:`NonFiniteError` (and apply nothing) when the gradients are not
    all finite. ``model`` supplies parameter names for the message. Returns the hook's handle."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
    names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}

    def check(opt, args, kwargs):
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = _total_norm([p.grad for p in params])
        bad = torch.tensor([0.0 if math.isfinite(float(norm)) else 1.0])
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            bad = bad.to(norm.device)
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if float(bad) == 0.0:
            return
        which = [names.get(id(p), f"parameter {i}") for i, p in enumerate(params)
                 if not bool(torch.isfinite(p.grad.detach().float().sum()))]
        where = (f"{len(which)} parameter(s) with non-finite gradients on this rank: "
                 + ", ".join(which[:8]) + (" ..." if len(which) > 8 else "")) if which else \
            "this rank's gradients are finite: another rank's are not"
        raise NonFiniteError(f"the gradient norm is {float(norm)} before the optimizer step; the step was not "
                             f"applied ({where}). Usual causes: a learning rate too high "
                             "(the loss diverged), fp16 overflow.")

    return optimizer.register_step_pre_hook(check)


def check_finite(name: str, values: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` and how many of ``values`` are NaN/inf."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise NonFiniteError(f"{int(bad.sum())} of {values.numel()} {name} are not finite "
                             f"(first: {values[bad][0].item()})")
