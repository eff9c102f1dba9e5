"""Stop a training step whose gradients are not finite before the optimizer applies them.

:func:`guard_optimizer` registers a step pre-hook on a ``torch.optim.Optimizer`` (PyTorch's own hook; it
fires inside ``accelerate``'s wrapped optimizer too): it checks that the total gradient norm is finite, agrees
on it across ranks (one tiny all-reduce when ``torch.distributed`` runs), and raises :class:`NonFiniteError`
naming the parameters whose gradient is NaN/inf. The weights, the optimizer state and every checkpoint
stay as they were before the step.

The norm costs little: this rank's gradients (an FSDP2 DTensor's local shard: no collective per parameter)
are reduced with ``torch._foreach_norm`` per device and dtype, accumulated in float32 without a float32 copy
of any gradient. Cheaper still, the clipping that ran just before hands its norm over
(:meth:`NonFiniteGuard.clipping` wraps the clip function): a finite clip norm of the very gradients the
optimizer is about to apply (each one the same tensor, not modified in place since, by its version counter)
proves them finite, and nothing is computed. The handed norm is used once; any change to the gradients after
the clip, a gradient it did not cover, or no clipping, and the guard computes the norm itself.

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
import weakref

import torch


class NonFiniteError(FloatingPointError):
    """A NaN/inf in training (rewards, loss, gradients) caught before it reached the weights."""


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor, a sparse gradient's values (``nn.Embedding(sparse=True)``:
    ``_foreach_norm`` takes dense tensors only), else the tensor itself."""
    if hasattr(t, "to_local"):
        return t.to_local()
    return t.coalesce().values() if t.is_sparse else t


def _version(t: torch.Tensor) -> int:
    """A counter that grows with every in-place change of ``t``: a DTensor's own and its local shard's (FSDP2
    accumulates into ``grad._local_tensor``, which the DTensor's counter does not see)."""
    if type(t) is torch.Tensor:  # the common case, without an attribute lookup that misses
        return t._version
    local = getattr(t, "_local_tensor", None)
    return t._version + (local._version if local is not None else 0)


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The float32 2-norm of this rank's ``grads`` (a DTensor's local shard): one ``_foreach_norm`` per device
    and dtype, accumulating in float32 without a float32 copy of a gradient; on the first gradient's device."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        g = _local(g.detach())
        groups.setdefault((g.device, g.dtype), []).append(g)
    totals = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(group, 2.0, dtype=torch.float32)))
              for group in groups.values()]
    if not totals:
        return torch.zeros(())
    first = totals[0].device
    return torch.linalg.vector_norm(torch.stack([t.to(first) for t in totals])) if len(totals) > 1 else totals[0]


class NonFiniteGuard:
    """The step pre-hook of :func:`guard_optimizer`; :meth:`clipping` hands it the clip's norm, :meth:`remove`
    unhooks it."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
        self.names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self._handed: tuple[float, dict] | None = None  # (the clip's norm, {id(param): (ref to its grad, version)})
        self.reused = 0  # steps whose check used the clip's norm (nothing computed)
        self.handle = self.optimizer.register_step_pre_hook(self._check)

    def remove(self) -> None:
        """Unhook the guard from the optimizer."""
        self.handle.remove()

    def hand_norm(self, norm, params) -> None:
        """The total norm of the gradients of ``params`` as they are now (e.g. what clipping returned): the next
        check uses it instead of computing one, if no gradient changed in between. Call it on every rank alike
        (a DTensor norm is gathered here)."""
        if norm is None:
            return
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        norm = float(norm)
        self._handed = (norm, {id(p): (weakref.ref(p.grad), _version(p.grad))
                               for p in params if p.grad is not None}) if math.isfinite(norm) else None

    def clipping(self, clip):
        """``clip(params, max_norm, ...) -> norm`` (``torch.nn.utils.clip_grad_norm_``,
        ``accelerator.clip_grad_norm_``) that also hands its norm to the guard (:meth:`hand_norm`). A gradient
        changed in place after the clip is seen by its version counter; a write through ``.grad.data`` is not
        (it does not count), so code that edits gradients that way between clip and step should not hand the norm."""
        def clip_and_hand(parameters, max_norm, *args, **kwargs):
            params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
            norm = clip(params, max_norm, *args, **kwargs)
            self.hand_norm(norm, params)
            return norm
        return clip_and_hand

    def _handed_norm(self, params: list[torch.Tensor]) -> float | None:
        """The handed norm if it was of exactly these gradients, unchanged since; consumed either way."""
        handed, self._handed = self._handed, None
        if handed is None:
            return None
        norm, seen = handed
        for p in params:
            ref, version = seen.get(id(p), (None, None))
            if ref is None or ref() is not p.grad or _version(p.grad) != version:
                return None
        return norm

    def _check(self, opt, args, kwargs) -> None:
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        norm = self._handed_norm(params)
        if norm is not None:
            self.reused += 1
        else:
            total = _total_norm([p.grad for p in params])
            norm = float(total)
        # 0: finite, 1: inf, 2: NaN; the worst over the ranks (a NaN anywhere makes the global norm NaN)
        code = 0.0 if math.isfinite(norm) else 2.0 if math.isnan(norm) else 1.0
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            device = params[0].grad.device if params else \
                torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
            flag = torch.tensor([code], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            code = float(flag)
        if code == 0.0:
            return
        which = [self.names.get(id(p), f"parameter {i}") for i, p in enumerate(params)
                 if not bool(torch.isfinite(_local(p.grad.detach())).all())]
        if which:
            where = (f"{len(which)} parameter(s) with non-finite gradients on this rank: "
                     + ", ".join(which[:8]) + (" ..." if len(which) > 8 else ""))
        elif not math.isfinite(norm):
            where = "every gradient on this rank is finite, but their norm overflows float32"
        else:
            where = "this rank's gradients are finite: another rank's are not"
        raise NonFiniteError(f"the gradient norm is {'nan' if code == 2.0 else 'inf'} before the optimizer step; "
                             f"the step was not applied ({where}). Usual causes: a learning rate too high "
                             "(the loss diverged), fp16 overflow.")


def guard_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None) -> NonFiniteGuard:
    """Make ``optimizer.step()`` raise :class:`NonFiniteError` (and apply nothing) when the gradients are not
    all finite. ``model`` supplies parameter names for the message. Returns the :class:`NonFiniteGuard` (its
    ``clipping(clip_fn)`` hands the clip's norm over; ``remove()`` unhooks it)."""
    return NonFiniteGuard(optimizer, model)


def check_finite(name: str, values: torch.Tensor) -> None:
    """Raise :class:`NonFiniteError` naming ``name`` and how many of ``values`` are NaN/inf."""
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        raise NonFiniteError(f"{int(bad.sum())} of {values.numel()} {name} are not finite "
                             f"(first: {values[bad][0].item()})")
