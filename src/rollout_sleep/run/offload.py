"""The optimizer's state in host memory: between steps (``train.offload_optimizer=true``, :class:`OptimizerOffload`)
or always (``stream``: the per-tensor step, :class:`~rollout_sleep.run.per_tensor.PerTensorOptimizer` with
``state_in="host"``, brings one parameter's state at a time through the host buffers here, :class:`HostCopies`).

``true`` gives the rollout the state's memory and keeps the state apart from the activations, but the step brings
all of it back (beside all the gradients, unless the step goes per tensor too: ``train.step_per_tensor``).
``stream`` keeps the state in host memory for good: the step holds up to three tensors' state at a time.

Host copies are allocated once per state tensor and reused, pinned where the parameters are on CUDA. torchao's
quantized moments (tensor subclasses) are copied leaf by leaf (codes, block scales, code map: see
:func:`~rollout_sleep.run.optim.storage_tensors`), so their host copies are pinned too. Where the parameters
live on the host nothing moves.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .optim import storage_tensors

logger = logging.getLogger(__name__)

METRICS = ("optimizer_offload_s", "optimizer_reload_s", "optimizer_offload_gib")


def overlapped(state_in: str, overlap: bool | None) -> bool:
    """Whether a per-tensor step with its state ``state_in`` (``"device"`` / ``"host"``) overlaps the state's copies
    with its compute: ``None`` (the default) on with host state, off without; overlap without host state refused."""
    if overlap and state_in != "host":
        raise ValueError("overlap overlaps the state's copies with the step: state_in='host' only")
    return state_in == "host" if overlap is None else bool(overlap)


def torch_optimizer(optimizer, said: str, off: str) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` that setting ``said`` (``train.offload_optimizer=true``, ...) wraps or moves
    (inside accelerate's wrapper), or a ``ValueError`` naming the setting and the fix (``off``: the setting that
    turns it off) where it cannot: DeepSpeed's ZeRO optimizer (no step hooks, its own step and offload) and FSDP2's
    DTensor parameters (their state cannot be swapped for host tensors, nor their step split by tensor)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
    if not isinstance(inner, torch.optim.Optimizer):
        raise ValueError(f"{said} needs a torch.optim.Optimizer, not a {type(inner).__name__}: with DeepSpeed set "
                         f"{off} (DeepSpeed's own offload: zero_optimization.offload_optimizer.device=cpu)")
    if any(hasattr(p, "full_tensor") for g in inner.param_groups for p in g["params"]):
        raise ValueError(f"{said} does not take FSDP2's sharded (DTensor) parameters: set {off} (FSDP's own CPU "
                         "offload: fsdp_offload_params)")
    return inner


def _device_of(optimizer: torch.optim.Optimizer) -> torch.device:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return params[0].device if params else torch.device("cpu")


def _nbytes(t: torch.Tensor) -> int:
    """The bytes holding ``t``'s data (a quantized moment's codes, scales and map, not its apparent size)."""
    return sum(x.numel() * x.element_size() for x in storage_tensors(t))


def _empty_like(t: torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    """An uninitialised tensor like ``t`` on ``device`` (pinned when ``pin``, on the host); a tensor subclass
    (torchao's quantized moments) rebuilt from leaves made so, so that each leaf is pinned (its own ``.to("cpu")``
    ignores pinning). On a GPU it is allocated on the current stream."""
    if is_traceable_wrapper_subclass(t):
        names, meta = t.__tensor_flatten__()
        leaves = {name: _empty_like(getattr(t, name), device, pin) for name in names}
        return type(t).__tensor_unflatten__(leaves, meta, t.size(), t.stride())
    return torch.empty_like(t, device=device, pin_memory=pin)


def _host_like(t: torch.Tensor, pin: bool) -> torch.Tensor:
    """An uninitialised host tensor like ``t``, pinned when ``pin`` (leaf by leaf: see :func:`_empty_like`)."""
    return _empty_like(t, torch.device("cpu"), pin)


def _on(stream):
    """``stream`` made current (a CUDA copy stream), or nothing changed (``None``: the current stream, or the host)."""
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    x, y = storage_tensors(a), storage_tensors(b)
    return type(a) is type(b) and len(x) == len(y) and all(
        u.shape == v.shape and u.dtype == v.dtype and u.stride() == v.stride() for u, v in zip(x, y))


class HostCopies:
    """One reusable host tensor per (parameter, state key): :meth:`send` copies a parameter's device state into
    them and puts them in its state dict, :meth:`bring` puts device copies of them back. Keyed by the
    parameter's id: parameters outlive a ``load_state_dict`` (a resume), state dicts do not.

    Both take a ``stream``: ``None`` copies on the current stream (in order with the step around it); a CUDA copy
    stream copies there, after it waits for the current (compute) stream's work queued so far, so the copy overlaps
    whatever the compute stream queues next. The caller orders the compute stream after a brought state's copy
    (``wait_event``) before stepping it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pin = device.type == "cuda"
        self._host: dict[tuple[int, str], torch.Tensor] = {}

    def resident(self, t: torch.Tensor) -> bool:
        """Whether state tensor ``t`` sits on the device, for :meth:`send` to move (a host tensor of the
        optimizer's own, torchao's step count, stays where it is)."""
        return t.device.type != "cpu"

    def send(self, p: torch.Tensor, state: dict, stream=None) -> int:
        """Copy ``p``'s state tensors that are on the device to host memory (asynchronously where pinned: the
        caller synchronizes before the host reads them); returns the bytes moved. On a copy ``stream`` the device
        tensors are marked used there (``record_stream``): once ``state`` lets go of them the caching allocator
        gives their memory to no other tensor before the copy is done."""
        moved = 0
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # after the step that wrote the state
        for key, t in list(state.items()):
            if not isinstance(t, torch.Tensor) or not self.resident(t) or self._host.get((id(p), key)) is t:
                continue
            slot = (id(p), key)
            host = self._host.get(slot)
            if host is None or not _same_layout(host, t):
                host = self._host[slot] = _host_like(t, self.pin)
            with _on(stream):
                for dst, src in zip(storage_tensors(host), storage_tensors(t)):
                    dst.copy_(src, non_blocking=True)
                    if stream is not None:
                        src.record_stream(stream)
            state[key] = host
            moved += _nbytes(t)
        return moved

    def bring(self, p: torch.Tensor, state: dict, stream=None) -> int:
        """Put device copies of what :meth:`send` moved back in ``p``'s state (a host scalar of the optimizer's
        own, torchao's step count, stays); returns the bytes moved. The device tensors are allocated on the
        current stream, the one that steps them; on a copy ``stream`` the copy into them waits for the current
        stream's work queued so far (whatever the allocator last gave their memory to)."""
        brought = {key: t for key, t in state.items()
                   if isinstance(t, torch.Tensor) and self._host.get((id(p), key)) is t}
        if not brought:
            return 0
        device = {key: _empty_like(t, self.device) for key, t in brought.items()}
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with _on(stream):
            for key, t in brought.items():
                for dst, src in zip(storage_tensors(device[key]), storage_tensors(t)):
                    dst.copy_(src, non_blocking=True)
        state.update(device)
        return sum(_nbytes(t) for t in brought.values())

    def put_back(self, p: torch.Tensor, state: dict) -> None:
        """Point ``p``'s state at its host copies again, dropping device copies :meth:`bring` made (a state
        brought and not stepped: the host copies still hold it). The caller has synchronized the copies."""
        for key, t in list(state.items()):
            host = self._host.get((id(p), key))
            if host is not None and t is not host and _same_layout(host, t):
                state[key] = host


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


class StateInHost:
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


class OptimizerOffload(StateInHost):
    """Keep ``optimizer``'s state in pinned host memory between steps (``train.offload_optimizer=true``): a step
    pre-hook copies it to the parameters' device right before the step, a post-hook copies it back to the host
    right after (before the rollout). ``pop_timings()`` gives this step's seconds and bytes. Idempotent:
    :meth:`offload` moves only what is on the device, :meth:`reload` only what is not.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = torch_optimizer(optimizer, "train.offload_optimizer=true", "train.offload_optimizer=false")
        self._init_host(self.optimizer)  # step_state_bytes: all of the state comes back for the step
        # a resume loads one parameter's state at a time, straight to host memory (see load_one_at_a_time): the
        # instance's own loader is wrapped (bitsandbytes replaces PyTorch's, and with it its load hooks)
        load = self.optimizer.load_state_dict
        self.optimizer.load_state_dict = lambda state_dict: load_one_at_a_time(load, self.optimizer, state_dict,
                                                                               self.host, self.active)
        if not self.active:
            logger.info("train.offload_optimizer: the parameters live on the host already; nothing to move")
            return
        self._handles = [self.optimizer.register_step_pre_hook(self._before_step),
                         self.optimizer.register_step_post_hook(self._after_step)]

    # a step hook must return None: PyTorch takes a pre-hook's other results as the step's new (args, kwargs)
    def _before_step(self, *_) -> None:
        self.reload()

    def _after_step(self, *_) -> None:
        self.offload()

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
