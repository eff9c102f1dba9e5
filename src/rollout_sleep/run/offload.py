"""The optimizer's state in host memory: between steps (``train.offload_optimizer=true``, :class:`OptimizerOffload`)
or always, the step streaming it one parameter at a time (``stream``, :class:`StreamedOptimizer`).

``true`` gives the rollout the state's memory and keeps the state apart from the activations, but the step
itself holds all of it beside all the gradients. ``stream`` keeps the state in host memory for good: its step
moves one parameter's state to the GPU, steps that parameter alone, moves the state back and frees the
parameter's gradient. The step's peak is then the gradients (fewer as it goes) plus one parameter's state and
its step's temporaries, instead of all gradients plus all state. Global gradient clipping and the non-finite
guard stay exact: every gradient exists when the step begins (an optimizer fused into the backward pass would
step each parameter before the last gradient, and so the global norm, is known).

Host copies are allocated once per state tensor and reused, pinned where the parameters are on CUDA. torchao's
quantized moments (tensor subclasses) are copied leaf by leaf (codes, block scales, code map: see
:func:`~rollout_sleep.run.optim.storage_tensors`), so their host copies are pinned too. Where the parameters
live on the host nothing moves (the streamed step still steps one parameter at a time).
"""

from __future__ import annotations

import logging
import time

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .optim import storage_tensors

logger = logging.getLogger(__name__)

METRICS = ("optimizer_offload_s", "optimizer_reload_s", "optimizer_offload_gib")


def torch_optimizer(optimizer, setting: bool | str) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` whose state ``train.offload_optimizer=setting`` moves (inside accelerate's
    wrapper), or a ``ValueError`` naming the key and the fix where it cannot: DeepSpeed's ZeRO optimizer (no
    step hooks, its own offload) and FSDP2's DTensor parameters (their state cannot be swapped for host
    tensors)."""
    said = f"train.offload_optimizer={'true' if setting is True else setting}"
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
    if not isinstance(inner, torch.optim.Optimizer):
        raise ValueError(f"{said} moves a torch.optim.Optimizer's state, not a {type(inner).__name__}'s: with "
                         "DeepSpeed set its own offload_optimizer (zero_optimization.offload_optimizer.device=cpu) "
                         "and train.offload_optimizer=false")
    if any(hasattr(p, "full_tensor") for g in inner.param_groups for p in g["params"]):
        raise ValueError(f"{said} does not move FSDP2's sharded (DTensor) optimizer state: use FSDP's own CPU "
                         "offload (fsdp_offload_params) and train.offload_optimizer=false")
    return inner


def _device_of(optimizer: torch.optim.Optimizer) -> torch.device:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return params[0].device if params else torch.device("cpu")


def _nbytes(t: torch.Tensor) -> int:
    """The bytes holding ``t``'s data (a quantized moment's codes, scales and map, not its apparent size)."""
    return sum(x.numel() * x.element_size() for x in storage_tensors(t))


def _host_like(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """An uninitialised host tensor like ``t``, pinned when ``pin``; a tensor subclass (torchao's quantized
    moments) rebuilt from host leaves, so that each leaf is pinned (its own ``.to("cpu")`` ignores pinning)."""
    if is_traceable_wrapper_subclass(t):
        names, meta = t.__tensor_flatten__()
        leaves = {name: _host_like(getattr(t, name), pin) for name in names}
        return type(t).__tensor_unflatten__(leaves, meta, t.size(), t.stride())
    return torch.empty_like(t, device="cpu", pin_memory=pin)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of host tensor ``t`` on ``device``, leaf by leaf for a tensor subclass (asynchronous from pinned
    memory: ordered on the current stream before the step that reads it)."""
    if is_traceable_wrapper_subclass(t):
        names, meta = t.__tensor_flatten__()
        leaves = {name: _to_device(getattr(t, name), device) for name in names}
        return type(t).__tensor_unflatten__(leaves, meta, t.size(), t.stride())
    return t.to(device, non_blocking=True)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    x, y = storage_tensors(a), storage_tensors(b)
    return type(a) is type(b) and len(x) == len(y) and all(
        u.shape == v.shape and u.dtype == v.dtype and u.stride() == v.stride() for u, v in zip(x, y))


class HostCopies:
    """One reusable host tensor per (parameter, state key): :meth:`send` copies a parameter's device state into
    them and puts them in its state dict, :meth:`bring` puts device copies of them back. Keyed by the
    parameter's id: parameters outlive a ``load_state_dict`` (a resume), state dicts do not."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"
        self._host: dict[tuple[int, str], torch.Tensor] = {}

    def send(self, p: torch.Tensor, state: dict) -> int:
        """Copy ``p``'s state tensors that are on the device to host memory (asynchronously where pinned: the
        caller synchronizes before the host reads them); returns the bytes moved."""
        moved = 0
        for key, t in list(state.items()):
            if not isinstance(t, torch.Tensor) or t.device.type == "cpu":
                continue
            slot = (id(p), key)
            host = self._host.get(slot)
            if host is None or not _same_layout(host, t):
                host = self._host[slot] = _host_like(t, self.pin)
            for dst, src in zip(storage_tensors(host), storage_tensors(t)):
                dst.copy_(src, non_blocking=True)
            state[key] = host
            moved += _nbytes(t)
        return moved

    def bring(self, p: torch.Tensor, state: dict) -> int:
        """Put device copies of what :meth:`send` moved back in ``p``'s state (a host scalar of the optimizer's
        own, torchao's step count, stays); returns the bytes moved."""
        moved = 0
        for key, t in list(state.items()):
            if isinstance(t, torch.Tensor) and self._host.get((id(p), key)) is t:
                state[key] = _to_device(t, self.device)
                moved += _nbytes(t)
        return moved


def load_one_at_a_time(load, optimizer: torch.optim.Optimizer, state_dict: dict, host: "HostCopies",
                       active: bool) -> None:
    """``load(state_dict)`` (``optimizer``'s own ``load_state_dict``) one parameter's state at a time, each sent to
    host memory (when ``active``) before the next is loaded: the loader puts a state on its parameter's device
    (PyTorch's, and bitsandbytes' own), so a whole state loaded at once would sit on the GPU beside whatever is
    there (a resume runs while vLLM is awake)."""
    saved, placed = state_dict["state"], {}
    for key in saved:
        load({**state_dict, "state": {key: saved[key]}})
        for p, state in optimizer.state.items():
            if active:
                host.send(p, state)
            placed[p] = state
        if active:
            torch.cuda.synchronize(host.device)  # the host copies are complete before the next load
    load({**state_dict, "state": {}})  # the groups' settings; then the placed state
    optimizer.state.update(placed)


class _StateInHost:
    """What both settings share: the host buffers of ``optimizer``'s state, whether anything moves (parameters on
    a GPU), the per-step timings, and sending the whole state to host memory."""

    def _init_host(self, optimizer: torch.optim.Optimizer) -> None:
        self.device = _device_of(optimizer)
        self.active = self.device.type != "cpu"
        self.host = HostCopies(self.device)
        self.step_state_bytes = 0  # the most state on the device during a step
        self._timings = dict.fromkeys(METRICS, 0.0)

    def _send_all(self, optimizer: torch.optim.Optimizer) -> int:
        """Every state tensor on the device to host memory, the copies complete; returns the bytes moved."""
        moved = sum(self.host.send(p, state) for p, state in list(optimizer.state.items()))
        torch.cuda.synchronize(self.device)  # the copies are done before the device memory is reused
        return moved

    def pop_timings(self) -> dict[str, float]:
        """Seconds spent moving the state off and back since the last call, and the GiB moved."""
        out, self._timings = self._timings, dict.fromkeys(METRICS, 0.0)
        return out if self.active else {}


class OptimizerOffload(_StateInHost):
    """Keep ``optimizer``'s state in pinned host memory between steps (``train.offload_optimizer=true``): a step
    pre-hook copies it to the parameters' device right before the step, a post-hook copies it back to the host
    right after (before the rollout). ``pop_timings()`` gives this step's seconds and bytes. Idempotent:
    :meth:`offload` moves only what is on the device, :meth:`reload` only what is not.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = torch_optimizer(optimizer, True)
        self._init_host(self.optimizer)  # step_state_bytes: all of the state comes back for the step
        # a resume loads one parameter's state at a time, straight to host memory (see load_one_at_a_time): the
        # instance's own loader is wrapped (bitsandbytes replaces PyTorch's, and with it its load hooks)
        load = self.optimizer.load_state_dict
        self.optimizer.load_state_dict = lambda state_dict: load_one_at_a_time(load, self.optimizer, state_dict,
                                                                               self.host, self.active)
        if not self.active:
            logger.info("train.offload_optimizer: the parameters live on the host already; nothing to move")
            return
        self._handles = [self.optimizer.register_step_pre_hook(lambda *a: self.reload()),
                         self.optimizer.register_step_post_hook(lambda *a: self.offload())]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def offload(self) -> int:
        """Move the state to host memory; returns the bytes moved."""
        if not self.active:
            return 0
        self._sync()
        t0 = time.perf_counter()
        moved = self._send_all(self.optimizer)
        self._timings["optimizer_offload_s"] += time.perf_counter() - t0
        self._timings["optimizer_offload_gib"] = max(self._timings["optimizer_offload_gib"], moved / 2**30)
        self.step_state_bytes = max(self.step_state_bytes, moved)
        return moved

    def reload(self) -> int:
        """Move the state that :meth:`offload` moved back to the parameters' device; returns the bytes moved."""
        if not self.active:
            return 0
        t0 = time.perf_counter()
        moved = sum(self.host.bring(p, state) for p, state in list(self.optimizer.state.items()))
        self._sync()
        self._timings["optimizer_reload_s"] += time.perf_counter() - t0
        return moved


class StreamedOptimizer(_StateInHost, torch.optim.Optimizer):
    """``optimizer`` stepped one parameter at a time with its state in host memory
    (``train.offload_optimizer=stream``): :meth:`step` sets every gradient aside, then for each parameter,
    smallest first, gives its gradient back, brings its state to the device, steps ``optimizer`` (which skips
    parameters without a gradient), sends the state back and frees the gradient. The largest tensors step last,
    when the other gradients are freed, so their step's temporaries (torchao's: up to 25 bytes per element)
    never meet all the gradients. (With stochastic rounding the order changes which random draws each tensor
    takes, not what they keep in expectation.)

    Accelerate prepares it like any optimizer. The param groups, the state and the defaults are ``optimizer``'s
    own, so :meth:`state_dict` is exactly the plain optimizer's (a checkpoint loads in every mode); PyTorch's step
    hooks registered here (the non-finite guard, the update check) fire once per step, with every gradient
    present, before anything moves. The wrapped optimizer is ``.inner``, not ``.optimizer``: the hooks find
    this one as the innermost. ``pop_timings()``, ``offload()`` and ``active`` as :class:`OptimizerOffload`'s.

    >>> model = torch.nn.Linear(2, 2)
    >>> opt = StreamedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1))
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> opt.step()
    >>> [p.grad for p in model.parameters()], len(opt.state)  # gradients freed as the step went
    ([None, None], 2)
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        inner = torch_optimizer(optimizer, "stream")
        params = [p for g in inner.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("train.offload_optimizer=stream steps each parameter once: the optimizer lists a "
                             "parameter twice (pass model.parameters(), which lists a tied weight once)")
        if hasattr(inner, "to_gpu"):  # bitsandbytes moves every parameter's state to its device at its first
            inner.to_gpu = lambda: None  # step (a resumed state included): here the state moves one at a time
        # PyTorch's optimizer machinery (the step hooks) around a placeholder group, replaced by the inner's
        super().__init__([torch.empty(0)], inner.defaults)
        self.inner = inner
        self._share()
        self._init_host(inner)  # step_state_bytes: the most state one parameter brought to the device
        self._events: list[tuple[torch.cuda.Event, ...]] = []

    def _share(self) -> None:
        """This optimizer's groups, state and defaults are the inner's (again after a load replaced them)."""
        self.param_groups, self.state, self.defaults = self.inner.param_groups, self.inner.state, self.inner.defaults

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Load into the inner optimizer one parameter's state at a time (PyTorch's loader puts it on the
        parameter's device), each sent to host memory before the next: a resume never holds the whole state on
        the GPU either."""
        load_one_at_a_time(self.inner.load_state_dict, self.inner, state_dict, self.host, self.active)
        self._share()

    def __getstate__(self):
        raise TypeError("a StreamedOptimizer is not copied or pickled (its state lives in pinned host buffers): "
                        "save optimizer.state_dict(), which is the wrapped optimizer's own")

    def offload(self) -> int:
        """Move any state on the device to host memory (after a load); returns the bytes moved."""
        return self._send_all(self.inner) if self.active else 0

    def _mark(self) -> torch.cuda.Event | None:
        if not self.active:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @torch.no_grad()
    def step(self, closure=None):
        """Step every parameter with a gradient, one at a time (see the class). Each gradient is freed once its
        parameter steps: a second ``step()`` without a backward in between does nothing (the plain optimizer
        would apply the same gradients again). PyTorch's global step hooks fire for the wrapper and again for
        each parameter's inner step; hooks registered on this optimizer fire once."""
        if closure is not None:
            raise ValueError("train.offload_optimizer=stream steps one parameter at a time: it takes no closure")
        # smallest tensor first: the largest (an embedding), whose step takes the most temporaries, steps when
        # the other gradients are already freed (stable: ties keep the groups' order)
        params = sorted((p for g in self.param_groups for p in g["params"] if p.grad is not None),
                        key=lambda p: p.numel())
        grads = {p: p.grad for p in params}  # set aside: the inner step sees one gradient at a time
        for p in params:
            p.grad = None
        sent = 0
        try:
            for p in params:
                p.grad = grads.pop(p)
                state = self.state[p]
                marks = [self._mark()]
                self.host.bring(p, state)
                marks.append(self._mark())
                self.inner.step()
                marks.append(self._mark())
                moved = self.host.send(p, state)
                marks.append(self._mark())
                p.grad = None  # freed: the gradients shrink as the step goes
                sent += moved
                self.step_state_bytes = max(self.step_state_bytes, moved)
                if self.active:
                    self._events.append(tuple(marks))
        finally:  # a step that failed part-way leaves the gradients it did not reach where they were
            for p, grad in grads.items():
                p.grad = grad
        if self.active:
            torch.cuda.synchronize(self.device)  # the host copies are complete before anything reads them
            for start, brought, stepped, back in self._events:
                self._timings["optimizer_reload_s"] += start.elapsed_time(brought) / 1e3
                self._timings["optimizer_offload_s"] += stepped.elapsed_time(back) / 1e3
            self._events.clear()
            self._timings["optimizer_offload_gib"] = max(self._timings["optimizer_offload_gib"], sent / 2**30)
        return None
