"""The trainer's weights packed into one flat GPU buffer, shared with engine processes by one CUDA IPC handle.

vLLM's own ``ipc`` weight-transfer backend sends one IPC handle per tensor (hundreds per model, each opened
by the receiver at every update). Here the trainer's weights are cast and copied once into one ``uint8``
buffer (each tensor at a 256-byte aligned offset, in the engine's dtype); the buffer travels once to each
engine process as one handle, which keeps it mapped, and every later sync only repacks it in place. Each
engine then loads from views of the buffer (:meth:`PackedWeights.views`) with its usual checked routes.

The pack is a single pass over the trainer's weights that also does the cast (``copy_`` casts, so an fp32
trainer costs no more than a bf16 one), then one NaN/Inf probe over the buffer, once for all engines.

CUDA IPC needs CUDA: on CPU :meth:`PackedWeights.share` raises :class:`IPCUnavailableError` (load from a
checkpoint path there, or use an in-process :class:`~rollout_sleep.engine.engine.Engine`).

Example:
    >>> import torch
    >>> packed = PackedWeights.for_spec({"a": ((2, 3), torch.float32), "b": ((4,), torch.float32)})
    >>> packed.pack([("a", torch.ones(2, 3)), ("b", torch.arange(4.0))])
    >>> [(n, t.tolist()) for n, t in packed.views()][1]
    ('b', [0.0, 1.0, 2.0, 3.0])
    >>> packed.nbytes   # two slots, each aligned to 256 bytes
    512
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from rollout_sleep.engine.feed import finite_probe, non_finite, non_finite_problem
from rollout_sleep.weights.spec import WeightMismatchError

ALIGN = 256  # bytes: every slot starts at a multiple (vectorized copies, any dtype's alignment)
_ids = itertools.count()


class IPCUnavailableError(RuntimeError):
    """In-memory weights for engine processes need CUDA IPC, which needs a CUDA device."""


@dataclass(frozen=True)
class Slot:
    """Where one checkpoint tensor lives in the packed buffer: byte offset, shape and dtype."""

    name: str
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return int(torch.Size(self.shape).numel()) * self.dtype.itemsize


@dataclass(frozen=True)
class Shared:
    """What an engine receives: the buffer's id, its slots, and the buffer itself as a CUDA IPC ``handle``
    (``torch.multiprocessing``'s ``reduce_tensor``: sent once, then ``None`` while the engine keeps it mapped)
    or, for an engine in the same process, the ``local`` tensor."""

    buffer_id: int
    slots: tuple[Slot, ...] | None  # sent with the handle only: the engine keeps them with the mapped buffer
    handle: tuple | None = None
    local: torch.Tensor | None = None


def open_handle(handle: tuple) -> torch.Tensor:
    """The buffer behind an IPC ``handle``, mapped in this process on its current CUDA device (the sender's
    device index may differ: engine processes see only their own GPU)."""
    import inspect

    func, args = handle
    args = list(args)
    names = list(inspect.signature(func).parameters)
    if "storage_device" in names:
        args[names.index("storage_device")] = torch.cuda.current_device()
    return func(*args)


def require_ipc(device: torch.device | None = None) -> None:
    """Raise :class:`IPCUnavailableError` unless buffers on ``device`` (default: this process's) can be shared
    with other processes by CUDA IPC."""
    cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    if not cuda:
        raise IPCUnavailableError(
            "in-memory weights reach engine processes through one CUDA IPC buffer, which needs a CUDA device; "
            "on CPU load the engines from a checkpoint directory (wake_up(weights='path/to/checkpoint')) or use "
            "in-process engines (EnginePool.of([...]) / Engine)")


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.dtype == b.dtype and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


def slot_views(buffer: torch.Tensor, slots: Iterable[Slot]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` views of ``buffer`` (flat ``uint8``), one per slot."""
    out = []
    for s in slots:
        n = int(torch.Size(s.shape).numel())
        out.append((s.name, buffer.narrow(0, s.offset, s.nbytes).view(s.dtype)[:n].view(s.shape)))
    return out


def float_runs(slots: Iterable[Slot]) -> list[tuple[torch.dtype, int, int, list[str]]]:
    """``(dtype, start byte, end byte, names)`` of each run of consecutive floating slots of one dtype (the
    padding between them is zero, so a run reads as one flat tensor of that dtype).

    >>> s = [Slot("a", 0, (3,), torch.bfloat16), Slot("b", 256, (2,), torch.bfloat16), Slot("i", 512, (1,), torch.int64)]
    >>> [(d, a, b, n) for d, a, b, n in float_runs(s)]
    [(torch.bfloat16, 0, 260, ['a', 'b'])]
    """
    runs: list[tuple[torch.dtype, int, int, list[str]]] = []
    for s in slots:
        if not s.dtype.is_floating_point or s.nbytes == 0:
            runs.append(None)  # breaks a run
            continue
        last = runs[-1] if runs else None
        if last is not None and last[0] == s.dtype:
            runs[-1] = (s.dtype, last[1], s.offset + s.nbytes, last[3] + [s.name])
        else:
            runs.append((s.dtype, s.offset, s.offset + s.nbytes, [s.name]))
    return [r for r in runs if r is not None]


class PackedWeights:
    """One flat buffer holding every tensor of a weight spec (name → (shape, dtype)).

    Args:
        slots: the layout (see :meth:`for_spec`).
        device: *optional*, where the buffer lives (default: CUDA if available, else CPU).
    """

    def __init__(self, slots: list[Slot], device: torch.device | str | None = None, skip: Iterable[str] = ()):
        self.skip = frozenset(skip)  # names a pack passes over (a tied LM head: the engine's is the embedding)
        self.slots = tuple(slots)
        self.by_name = {s.name: s for s in self.slots}
        end = max((s.offset + s.nbytes for s in self.slots), default=0)
        self.nbytes = -(-end // ALIGN) * ALIGN
        device = torch.device(device) if device is not None else \
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        # zeroed: the padding between slots stays finite, so one probe can read a run of slots at once
        self.buffer = torch.zeros(self.nbytes, dtype=torch.uint8, device=device)
        self.buffer_id = next(_ids)
        self.sent_to: set[int] = set()  # receivers that hold the mapped buffer already
        self._views = slot_views(self.buffer, self.slots)
        self._runs = float_runs(self.slots)

    @classmethod
    def for_spec(cls, spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]], dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, skip: Iterable[str] = ()) -> "PackedWeights":
        """A buffer for ``spec`` (e.g. ``WeightStream.spec()``), every floating tensor in ``dtype`` if given;
        names in ``skip`` get no slot and are passed over by :meth:`pack`."""
        slots, offset = [], 0
        skip = frozenset(skip)
        for name, (shape, dt) in spec.items():
            if name in skip:
                continue
            dt = dtype if dtype is not None and dt.is_floating_point else dt
            slot = Slot(name, offset, tuple(int(d) for d in shape), dt)
            slots.append(slot)
            offset += -(-slot.nbytes // ALIGN) * ALIGN
        return cls(slots, device, skip)

    def views(self) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` views of the buffer, in spec order."""
        return list(self._views)

    def pack(self, weights: Iterable[tuple[str, torch.Tensor]], check_finite: bool = True) -> None:
        """Copy (and cast) ``weights`` into their slots; every slot must be filled, each once. The copies go
        out in a few ``_foreach_copy_`` batches; then, with ``check_finite``, one NaN/Inf probe per run of
        same-dtype slots (one, usually) and one device sync for all (engines may skip theirs)."""
        from rollout_sleep.engine.loader import copy_all

        seen: set[str] = set()
        views = dict(self._views)

        def pairs():
            for name, tensor in weights:
                if name in self.skip:
                    continue
                if name not in views:
                    raise WeightMismatchError([f"weight {name!r} has no slot in the packed buffer (not in the spec "
                                               "it was sized for)"])
                if name in seen:
                    raise WeightMismatchError([f"weight {name!r} given twice in one pack"])
                target = views[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise WeightMismatchError([f"weight {name!r} has shape {list(tensor.shape)}, its slot "
                                               f"{list(target.shape)}"])
                seen.add(name)
                if not _same_memory(tensor, target):  # an adopted parameter is its slot: nothing to copy
                    yield target, tensor.detach()

        copy_all(pairs())
        missing = [n for n in views if n not in seen]
        if missing:
            raise WeightMismatchError([f"missing weight {n!r} in the pack" for n in missing[:20]])
        if check_finite:
            bad = self.non_finite()
            if bad:
                raise WeightMismatchError([non_finite_problem(n) for n in bad])
        if self.buffer.is_cuda:
            torch.cuda.current_stream(self.buffer.device).synchronize()  # receivers read on their own streams

    def non_finite(self) -> list[str]:
        """Names of the slots holding a NaN or Inf: one min/max reduction per run of same-dtype floating slots
        (read straight from the buffer, no temporary of its size) and one sync; the slots are probed one by
        one only when a run is not finite (to name them)."""
        probes = []
        for dtype, start, end, _ in self._runs:
            flat = self.buffer.narrow(0, start, end - start).view(dtype)
            try:
                probes.extend(torch.aminmax(flat))
            except (RuntimeError, NotImplementedError):  # a dtype without min/max kernels: a sum is finite iff
                probes.append(finite_probe(flat))      # every element is (short of overflow near 1e38)
        if not probes:
            return []
        if bool(torch.isfinite(torch.stack([p.float() for p in probes])).all()):  # the one sync
            return []
        return non_finite(self._views)
    def adopt(self, params: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
        """Make each parameter's data its slot of the buffer (copied in once): later packs find it in place
        and copy nothing. Only plain tensors of the slot's shape, dtype and device are adopted (not FSDP /
        ZeRO shards, not a dtype the engines cast to). Returns the names adopted."""
        views, done = dict(self._views), []
        for name, p in params:
            v = views.get(name)
            if v is None or tuple(p.shape) != tuple(v.shape) or p.dtype != v.dtype or p.device != v.device or \
                    hasattr(p, "full_tensor") or hasattr(p, "ds_id") or not isinstance(p, torch.nn.Parameter):
                continue
            with torch.no_grad():
                v.copy_(p.data)
            p.data = v
            done.append(name)
        return done

    def share(self, receiver: int) -> Shared:
        """What to send to engine process ``receiver``: the buffer's IPC handle and layout the first time, its
        id alone after (a sync then pickles a few bytes, not hundreds of slots)."""
        require_ipc(self.buffer.device)
        handle = None
        if receiver not in self.sent_to:
            from torch.multiprocessing.reductions import reduce_tensor

            handle = reduce_tensor(self.buffer)
            self.sent_to.add(receiver)
        return Shared(self.buffer_id, self.slots if handle is not None else None, handle=handle)

    def local(self) -> Shared:
        """What an engine in this process receives: the buffer itself."""
        return Shared(self.buffer_id, self.slots, local=self.buffer)

    def release(self) -> None:
        """Drop the buffer (receivers must have dropped their mapping first; adopted parameters keep their
        memory, and the next buffer packs them by copy again)."""
        self.buffer = torch.empty(0, dtype=torch.uint8)
        self._views = []
        self.sent_to.clear()
