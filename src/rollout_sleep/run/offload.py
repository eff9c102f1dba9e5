"""The optimizer's state in host memory: between steps (``train.offload_optimizer=true``, :class:`OptimizerOffload`)
or always, the step streaming it one parameter at a time (``stream``, :class:`StreamedOptimizer`).

``true`` gives the rollout the state's memory and keeps the state apart from the activations, but the step
itself holds all of it beside all the gradients. ``stream`` keeps the state in host memory for good: its step
moves one parameter's state to the GPU, steps that parameter alone, moves the state back and frees the
parameter's gradient, the copies on their own CUDA streams overlapping the steps (the next parameter's state comes
in, the last one's goes back, while one steps). The step's peak is then the gradients (fewer as it goes) plus up to
three parameters' states and one step's temporaries, instead of all gradients plus all state. Global gradient clipping and the non-finite
guard stay exact: every gradient exists when the step begins (an optimizer fused into the backward pass would
step each parameter before the last gradient, and so the global norm, is known).

Host copies are allocated once per state tensor and reused, pinned where the parameters are on CUDA. torchao's
quantized moments (tensor subclasses) are copied leaf by leaf (codes, block scales, code map: see
:func:`~rollout_sleep.run.optim.storage_tensors`), so their host copies are pinned too. Where the parameters
live on the host nothing moves (the streamed step still steps one parameter at a time).
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
# the streamed step's: its copies' own time (reload, offload: CUDA events on the copy streams, overlapped with the
# step), its wall time, and the copy time the step did not hide (the compute stream's waits for a state coming in,
# and the last copy back after the last step)
STREAM_METRICS = METRICS + ("optimizer_step_s", "optimizer_copy_wait_s")


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


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of host tensor ``t`` on ``device``, leaf by leaf for a tensor subclass (asynchronous from pinned
    memory: ordered on the current stream before the step that reads it)."""
    if is_traceable_wrapper_subclass(t):
        names, meta = t.__tensor_flatten__()
        leaves = {name: _to_device(getattr(t, name), device) for name in names}
        return type(t).__tensor_unflatten__(leaves, meta, t.size(), t.stride())
    return t.to(device, non_blocking=True)


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


class _Copies:
    """The streamed step's CUDA streams and timing events: a copy stream for each direction beside the compute
    stream (the current one when the step begins). ``None`` where nothing moves (the host) or the step runs
    serially: every copy then goes on the current stream."""

    def __init__(self, device: torch.device, copy_streams: tuple | None):
        self.compute = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self.h2d, self.d2h = copy_streams or (None, None)
        self.brought: list[tuple] = []  # (start, done) events around each state's copy to the device
        self.sent: list[tuple] = []  # (start, done) around each copy back
        self.waits: list[tuple] = []  # (before, after) the compute stream's wait for a brought state

    def mark(self, stream=None) -> torch.cuda.Event | None:
        """A timing event recorded on ``stream`` (the compute stream by default); ``None`` on the host."""
        if self.compute is None:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream if stream is not None else self.compute)
        return event


class StreamedOptimizer(_StateInHost, torch.optim.Optimizer):
    """``optimizer`` stepped one parameter at a time with its state in host memory
    (``train.offload_optimizer=stream``): :meth:`step` sets every gradient aside, then for each parameter,
    smallest first, gives its gradient back, brings its state to the device, steps ``optimizer`` (which skips
    parameters without a gradient), sends the state back and frees the gradient. The largest tensors step last,
    when the other gradients are freed, so their step's temporaries (torchao's: up to 25 bytes per element)
    never meet all the gradients. (With stochastic rounding the order changes which random draws each tensor
    takes, not what they keep in expectation.)

    With ``overlap=True`` (off by default until its CUDA test and probe have run on a GPU) the copies overlap the
    compute: while parameter ``i`` steps on the
    compute stream, a copy stream brings parameter ``i+1``'s state from pinned host memory and another sends
    parameter ``i-1``'s back, so the step costs about the largest of the three instead of their sum. The look-ahead
    is one tensor: at most three states are on the device at once (the one going out, the one stepping, the one
    coming in; smallest first, the last two are the largest), beside one step's temporaries. ``overlap=False``
    (the default) copies on the compute stream, in order with the steps (one state at a time).

    Accelerate prepares it like any optimizer. The param groups, the state and the defaults are ``optimizer``'s
    own, so :meth:`state_dict` is exactly the plain optimizer's (a checkpoint loads in every mode); PyTorch's step
    hooks registered here (the non-finite guard, the update check) fire once per step, with every gradient
    present, before anything moves. The wrapped optimizer is ``.inner``, not ``.optimizer``: the hooks find
    this one as the innermost. ``pop_timings()``, ``offload()`` and ``active`` as :class:`OptimizerOffload`'s;
    the timings also give the step's wall time (``optimizer_step_s``) and the copy time it did not hide
    (``optimizer_copy_wait_s``).

    >>> model = torch.nn.Linear(2, 2)
    >>> opt = StreamedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1))
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> opt.step()
    >>> [p.grad for p in model.parameters()], len(opt.state)  # gradients freed as the step went
    ([None, None], 2)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, overlap: bool = False):
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
        self.overlap = overlap
        self._share()
        self._init_host(inner)  # step_state_bytes: the most state on the device at once during a step
        self._timings = dict.fromkeys(STREAM_METRICS, 0.0)
        self._copy_streams: tuple | None = None  # (to the device, back): CUDA streams, made at the first step

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

    def pop_timings(self) -> dict[str, float]:
        out, self._timings = self._timings, dict.fromkeys(STREAM_METRICS, 0.0)
        return out if self.active else {}

    def _copy(self, copy, p: torch.Tensor, c: _Copies, stream, log: list) -> tuple[int, torch.cuda.Event | None]:
        """Queue ``copy`` (``host.bring`` or ``host.send``) of ``p``'s state on ``stream`` (a copy stream when
        overlapping, else ``None``: the current one), after the compute stream's work queued so far (the timing
        starts there); its (start, done) events go to ``log``. Returns the bytes and the event the compute stream
        waits for before using what came in (``None``: nothing moved, or nothing to wait for)."""
        if stream is not None:
            stream.wait_stream(c.compute)
        start = c.mark(stream)
        moved = copy(p, self.state[p], stream)
        done = c.mark(stream)
        if done is not None and moved:
            log.append((start, done))
        return moved, (done if stream is not None and moved else None)

    @torch.no_grad()
    def step(self, closure=None):
        """Step every parameter with a gradient, one at a time (see the class). Each gradient is freed once its
        parameter's step is queued (on the stream that made it: the allocator reuses it after the step only).
        A second ``step()`` without a backward in between does nothing (the plain optimizer would apply the same
        gradients again). PyTorch's global step hooks fire for the wrapper and again for each parameter's inner
        step; hooks registered on this optimizer fire once. Every copy back is complete when it returns."""
        if closure is not None:
            raise ValueError("train.offload_optimizer=stream steps one parameter at a time: it takes no closure")
        # smallest tensor first: the largest (an embedding), whose step takes the most temporaries, steps when
        # the other gradients are already freed (stable: ties keep the groups' order)
        params = sorted((p for g in self.param_groups for p in g["params"] if p.grad is not None),
                        key=lambda p: p.numel())
        grads = {p: p.grad for p in params}  # set aside: the inner step sees one gradient at a time
        for p in params:
            p.grad = None
        if self.active and self.overlap and self._copy_streams is None:  # made once, kept (not the pool's per step)
            self._copy_streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        c = _Copies(self.device if self.active else torch.device("cpu"), self._copy_streams if self.overlap else None)
        t0 = time.perf_counter()
        sent, went = 0, 0  # the bytes sent back in all, and the last parameter's (in flight while the next steps)
        def bring(q):
            return self._copy(self.host.bring, q, c, c.h2d, c.brought)

        coming = bring(params[0]) if params else (0, None)  # the first state's copy
        unstepped = [params[0]] if params else []  # brought, not stepped (put back if the step fails)
        try:
            for i, p in enumerate(params):
                p.grad = grads.pop(p)
                here, ready = coming
                nxt = params[i + 1] if i + 1 < len(params) else None
                if self.overlap and nxt is not None:  # the next state's copy, queued before this step: overlaps it
                    coming = bring(nxt)
                    unstepped.append(nxt)
                if ready is not None:  # this state's copy is done before its step reads it
                    before = c.mark()
                    c.compute.wait_event(ready)
                    c.waits.append((before, c.mark()))
                self.inner.step()
                unstepped = [q for q in unstepped if q is not p]
                moved, _ = self._copy(self.host.send, p, c, c.d2h, c.sent)
                p.grad = None  # freed: the gradients shrink as the step goes
                sent += moved
                # on the device at once: the state going back, the one that stepped, the one coming in
                ahead = coming[0] if self.overlap and nxt is not None else 0
                self.step_state_bytes = max(self.step_state_bytes,
                                            (went + moved + ahead) if self.overlap else max(moved, here))
                went = moved
                if not self.overlap and nxt is not None:  # serial: the next state's copy after this one's
                    coming = bring(nxt)
                    unstepped.append(nxt)
        except BaseException:  # a step that failed part-way puts the states it brought and did not step (or
            if self.active:  # failed in) back in their host copies, once no copy is in flight
                torch.cuda.synchronize(self.device)
            for p in unstepped:
                self.host.put_back(p, self.state[p])
            raise
        finally:  # and leaves the gradients it did not reach where they were
            for p, grad in grads.items():
                p.grad = grad
        if self.active:
            end = c.mark()
            torch.cuda.synchronize(self.device)  # the host copies are complete before anything reads them
            self._timings["optimizer_step_s"] += time.perf_counter() - t0
            self._timings["optimizer_reload_s"] += sum(a.elapsed_time(b) for a, b in c.brought) / 1e3
            self._timings["optimizer_offload_s"] += sum(a.elapsed_time(b) for a, b in c.sent) / 1e3
            if self.overlap:  # the compute stream's waits for a state coming in, and the last copy back's tail
                waited = sum(a.elapsed_time(b) for a, b in c.waits) / 1e3
                waited += max(0.0, end.elapsed_time(c.sent[-1][1]) / 1e3) if c.sent else 0.0
            else:  # every copy on the compute stream: none hidden
                waited = (sum(a.elapsed_time(b) for a, b in c.brought + c.sent)) / 1e3
            self._timings["optimizer_copy_wait_s"] += waited
            self._timings["optimizer_offload_gib"] = max(self._timings["optimizer_offload_gib"], sent / 2**30)
        return None
