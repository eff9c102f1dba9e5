"""The optimizer step one parameter at a time, smallest tensor first, each gradient freed once its parameter's
step is queued (``train.step_per_tensor``, :class:`PerTensorOptimizer`), with the state on the device or in host
memory between the per-tensor steps (``train.offload_optimizer=stream``: each tensor's brought in and sent back).

Why: a plain step holds all the gradients beside the state and the largest tensor's step temporaries (torchao's
8-bit step: 8 bytes per element of the embedding). Per tensor, smallest first, the embedding and the head step
last, beside their own gradients only: the step's peak drops below the backward pass's (all the gradients and one
micro-batch's activations). Global gradient clipping and the non-finite guard stay exact: every gradient exists
when the step begins (an optimizer fused into the backward pass would step each parameter before the last
gradient, and so the global norm, is known).
"""

from __future__ import annotations

import time

import torch

from .offload import METRICS, StateInHost, load_one_at_a_time, overlapped, torch_optimizer

# where the state lives between the per-tensor steps, and the settings that say so (and turn it off)
STATE_IN = {"device": ("train.step_per_tensor=true", "train.step_per_tensor=false"),
            "host": ("train.offload_optimizer=stream", "train.offload_optimizer=false")}
# the host state's step: its copies' own time (reload, offload: CUDA events on the copy streams, overlapped with the
# step), its wall time, and the copy time the step did not hide (the compute stream's waits for a state coming in,
# and the last copy back after the last step)
STREAM_METRICS = METRICS + ("optimizer_step_s", "optimizer_copy_wait_s")


class _Copies:
    """The host state's CUDA streams and timing events: a copy stream for each direction beside the compute
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


def state_in(train) -> str | None:
    """Where the per-tensor step keeps the state between tensors under the config's ``train`` section: ``"host"``
    (``offload_optimizer=stream``, which implies ``step_per_tensor``), ``"device"`` (``step_per_tensor=true``), or
    ``None``: the plain step."""
    if train.offload_optimizer == "stream":
        return "host"
    return "device" if train.step_per_tensor else None


class PerTensorOptimizer(StateInHost, torch.optim.Optimizer):
    """``optimizer`` stepped one parameter at a time (``train.step_per_tensor``): :meth:`step` sets every gradient
    aside, then for each parameter, smallest first, gives its gradient back, steps ``optimizer`` over that
    parameter alone and frees the gradient. The largest tensors step last, when the other gradients are freed, so
    their step's temporaries (torchao's: up to 25 bytes per element) never meet all the gradients. (With
    stochastic rounding, torchao's own step takes its random draws in the order the tensors step, so the order
    changes which draws each tensor takes, not what they keep in expectation; ``run.fused_adamw8bit``'s draws
    do not depend on the order.)

    ``state_in``: where the state lives between the per-tensor steps. ``"device"``: beside the parameters, as the
    plain optimizer keeps it; nothing moves. ``"host"`` (``train.offload_optimizer=stream``): in pinned host
    memory for good, each parameter's state brought to the device before its step and sent back after it, so the
    step holds a few tensors' state, not all of it (:class:`~rollout_sleep.run.offload.HostCopies`). With
    ``overlap`` (host only, and the default there: ``None`` means on with host state, off without) the copies
    overlap the compute: while parameter ``i`` steps on the compute stream, a copy stream brings parameter
    ``i+1``'s state from pinned host memory and another sends parameter ``i-1``'s back, so the step costs about
    the largest of the three instead of their sum. The look-ahead is one tensor: at most three states are on the
    device at once (the one going out, the one stepping, the one coming in; smallest first, the last two are the
    largest), beside one step's temporaries. A state sent back stays held until its copy is done (the allocator
    reuses its memory only then), and Python queues the steps faster than the GPU runs them, so before bringing a
    state the host waits until the one two back is home. ``overlap=False`` copies on the compute stream, in
    order with the steps (one state at a time).

    Accelerate prepares it like any optimizer. The param groups, the state and the defaults are ``optimizer``'s
    own, so :meth:`state_dict` is exactly the plain optimizer's (a checkpoint loads in every mode); PyTorch's step
    hooks registered here (the non-finite guard, the update check) fire once per step, with every gradient
    present, before anything moves. The wrapped optimizer is ``.inner``, not ``.optimizer``: the hooks find
    this one as the innermost. ``pop_timings()``, ``offload()`` and ``active`` as
    :class:`~rollout_sleep.run.offload.OptimizerOffload`'s (with the state on the device: nothing, ``False``); the
    timings also give the step's wall time (``optimizer_step_s``) and the copy time it did not hide
    (``optimizer_copy_wait_s``).

    >>> model = torch.nn.Linear(2, 2)
    >>> opt = PerTensorOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1))
    >>> model(torch.ones(1, 2)).sum().backward()
    >>> opt.step()
    >>> [p.grad for p in model.parameters()], len(opt.state)  # gradients freed as the step went
    ([None, None], 2)
    """

    def __init__(self, optimizer: torch.optim.Optimizer, state_in: str = "device", overlap: bool | None = None):
        if state_in not in STATE_IN:
            raise ValueError(f"state_in must be one of {', '.join(STATE_IN)}, got {state_in!r}")
        self.said, off = STATE_IN[state_in]
        overlap = overlapped(state_in, overlap)
        inner = torch_optimizer(optimizer, self.said, off)
        params = [p for g in inner.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError(f"{self.said} steps each parameter once: the optimizer lists a parameter twice (pass "
                             "model.parameters(), which lists a tied weight once)")
        if inner._optimizer_step_pre_hooks or inner._optimizer_step_post_hooks:  # each would see one gradient
            raise ValueError(f"{self.said}: step hooks registered on the optimizer it wraps would fire once per "
                             "parameter, each with that parameter's gradient alone (a non-finite guard there lets "
                             "the smaller tensors step before it sees a NaN in a larger one): register them on the "
                             "PerTensorOptimizer, after wrapping, where they fire once with every gradient")
        if state_in == "host" and hasattr(inner, "to_gpu"):  # bitsandbytes moves every parameter's state to its
            inner.to_gpu = lambda: None  # device at its first step (a resumed state included): here one at a time
        # PyTorch's optimizer machinery (the step hooks) around a placeholder group, replaced by the inner's
        super().__init__([torch.empty(0)], inner.defaults)
        self.inner = inner
        self.state_in = state_in
        self.overlap = overlap
        # bitsandbytes keys its per-parameter settings (the embeddings' 32-bit state) by position in the groups:
        # its groups are not narrowed to the parameter stepping
        self._narrow = not hasattr(inner, "get_config")
        self._share()
        self._init_host(inner)  # step_state_bytes: the most state on the device at once during a step
        self.active = self.active and state_in == "host"  # with the state on the device nothing moves
        self._timings = dict.fromkeys(STREAM_METRICS, 0.0)
        self._copy_streams: tuple | None = None  # (to the device, back): CUDA streams, made at the first step
        self._freed: list[torch.Tensor] = []  # the parameters whose gradients the last step freed

    def _share(self) -> None:
        """This optimizer's groups, state and defaults are the inner's (again after a load replaced them)."""
        self.param_groups, self.state, self.defaults = self.inner.param_groups, self.inner.state, self.inner.defaults

    def state_dict(self) -> dict:
        """The inner optimizer's (the plain one's), through the state-dict hooks registered here, as PyTorch runs
        a plain optimizer's."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state_dict = self.inner.state_dict()
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load into the inner optimizer (through the load hooks registered here, as PyTorch runs a plain
        optimizer's); with the state in host memory one parameter's state at a time (PyTorch's loader puts it on
        the parameter's device), each sent to host memory before the next: a resume never holds the whole state
        on the GPU either."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            state_dict = state_dict if result is None else result
        if self.state_in == "host":
            load_one_at_a_time(self.inner.load_state_dict, self.inner, state_dict, self.host, self.active)
        else:
            self.inner.load_state_dict(state_dict)
        self._share()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __getstate__(self):
        raise TypeError("a PerTensorOptimizer is not copied or pickled (with the state in host memory it lives in "
                        "pinned buffers): save optimizer.state_dict(), which is the wrapped optimizer's own")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """PyTorch's; ``set_to_none=False`` first gives the gradients the last step freed back as zeros, as the
        plain optimizer keeps them: a parameter without a gradient at the next backward then steps as it would
        there (its moments decay, its weight decays), not skipped."""
        if not set_to_none:
            for p in self._freed:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
        self._freed = []
        super().zero_grad(set_to_none)

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
        waits for before using what came in (``None``: nothing moved, or nothing to wait for). With the state on
        the device nothing is copied."""
        if self.state_in == "device":
            return 0, None
        if stream is not None:
            stream.wait_stream(c.compute)
        start = c.mark(stream)
        moved = copy(p, self.state[p], stream)
        done = c.mark(stream)
        if done is not None and moved:
            log.append((start, done))
        return moved, (done if stream is not None and moved else None)

    def _step_one(self, p: torch.Tensor, group: dict) -> None:
        """The inner optimizer's step of ``p`` (in ``group``) alone: the groups narrowed to it while it steps (the
        inner loop then visits one parameter, not every parameter of every group for each), restored after."""
        if not self._narrow:
            self.inner.step()
            return
        kept = [g["params"] for g in self.param_groups]
        try:
            for g in self.param_groups:
                g["params"] = [p] if g is group else []
            self.inner.step()
        finally:
            for g, params in zip(self.param_groups, kept):
                g["params"] = params

    @torch.no_grad()
    def step(self, closure=None):
        """Step every parameter with a gradient, one at a time (see the class). Each gradient is freed once its
        parameter's step is queued (on the stream that made it: the allocator reuses it after the step only).
        A second ``step()`` without a backward in between does nothing (the plain optimizer would apply the same
        gradients again). PyTorch's global step hooks fire for the wrapper and again for each parameter's inner
        step; hooks registered on this optimizer fire once. With the state in host memory every copy back is
        complete when it returns."""
        if closure is not None:
            raise ValueError(f"{self.said} steps one parameter at a time: it takes no closure (set "
                             f"{STATE_IN[self.state_in][1]} for an optimizer that needs one)")
        # smallest tensor first: the largest (an embedding), whose step takes the most temporaries, steps when
        # the other gradients are already freed (stable: ties keep the groups' order)
        group_of = {p: g for g in self.param_groups for p in g["params"] if p.grad is not None}
        params = sorted(group_of, key=lambda p: p.numel())
        grads = {p: p.grad for p in params}  # set aside: the inner step sees one gradient at a time
        self._freed = []
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
                    if len(c.sent) > 1:  # the host waits until the state two back is home: a state sent back is
                        c.sent[-2][1].synchronize()  # held for its copy (record_stream), and Python runs ahead
                    coming = bring(nxt)
                    unstepped.append(nxt)
                if ready is not None:  # this state's copy is done before its step reads it
                    before = c.mark()
                    c.compute.wait_event(ready)
                    c.waits.append((before, c.mark()))
                self._step_one(p, group_of[p])
                unstepped = [q for q in unstepped if q is not p]
                moved, _ = self._copy(self.host.send, p, c, c.d2h, c.sent)
                p.grad = None  # freed: the gradients shrink as the step goes
                self._freed.append(p)
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
                if self.state.get(p):
                    self.host.put_back(p, self.state[p])
                else:  # never stepped (the first step): no empty entry left for a state_dict to carry
                    self.state.pop(p, None)
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
