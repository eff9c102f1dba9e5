"""The engine contract: what :class:`~rollout_sleep.engine.engine.Engine` (vLLM in this process) and
:class:`~rollout_sleep.serve.remote.RemoteEngine` (a ``vllm serve`` over HTTP) both offer, and the named errors of
the calls one of them cannot take.

Callers (the manager, the recipe, ``verify``) program against :class:`RolloutEngine` and never ask an engine
what it has (no ``hasattr``). A method one implementation cannot offer raises :class:`UnsupportedOperation`
naming the class, the method and what to use instead; a closed engine refuses every call with
:class:`EngineClosedError`. Every operation of an engine runs under one lock (:func:`operation`): calls from
several threads run one after another, so a ``sleep`` never lands under a running ``generate`` (vLLM would
block it forever) and a load never changes the weights under one.

The conformance suite (``tests/engine/test_contract.py``) runs every method and state transition on each
implementation against real vLLM.

>>> as_prompts("1+1=")
['1+1=']
>>> as_prompts([1, 2, 3])
[[1, 2, 3]]
>>> as_prompts(["a", [4, 5]])
['a', [4, 5]]
>>> as_prompts({"prompt_token_ids": [4, 5]})
[[4, 5]]
"""

from __future__ import annotations

import contextlib
import functools
import operator
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from .state import EngineStateError

if TYPE_CHECKING:
    import torch

    from rollout_sleep.weights.verify import VerifyReport

    from .completion import Completion
    from .phases import CycleReport


class UnsupportedOperation(NotImplementedError):
    """A contract method (or one of its modes) that this implementation cannot offer; the message names the
    class, the method and what to use instead. Raised before anything is touched."""

    def __init__(self, engine: Any, method: str, why: str, instead: str):
        self.engine_class, self.method = type(engine).__name__, method
        super().__init__(f"{self.engine_class}.{method}: {why}. Instead: {instead}")


class EngineClosedError(EngineStateError):
    """The engine was closed: it refuses every call (build a new one)."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What every engine offers. The reports are :class:`~rollout_sleep.engine.phases.CycleReport`.

    State: ``state`` is ``"awake"``, ``"asleep(level=N)"`` or ``"closed"``; a call not allowed in the
    current state raises :class:`~rollout_sleep.engine.state.EngineStateError` and changes nothing.
    Memory figures: ``memory_before_gib`` / ``memory_loaded_gib`` are free GPU GiB (device-wide) before the
    engine started and once it was loaded, on CUDA; process RSS on CPU; ``None`` where this process cannot
    measure them (a server's memory).
    """

    model_path: str
    levels: tuple[int, ...]
    # vLLM runs in this process: weights go in as tensors and verify_weights reads them back. False (a server):
    # weights travel as a checkpoint directory it reads, and cannot be read back.
    in_process: bool

    @property
    def dtype(self) -> torch.dtype: ...
    @property
    def on_cuda(self) -> bool: ...
    @property
    def memory_before_gib(self) -> float | None: ...
    @property
    def memory_loaded_gib(self) -> float | None: ...
    @property
    def state(self) -> str: ...
    @property
    def is_asleep(self) -> bool: ...
    @property
    def sleep_level(self) -> int | None: ...
    @property
    def closed(self) -> bool: ...

    def generate(self, prompts: Any, sampling: Any = None, **sampling_kwargs: Any) -> list[Completion]:
        """Completions, ``n`` per prompt, in prompt order. ``prompts``: a string (one prompt), a list of token
        ids (one tokenized prompt), or a list of those."""

    def score(self, sequences: Any) -> list[list[float]]:
        """Each token's log-prob given its prefix (teacher-forced; the first token has none): compares two engines'
        weights without the sampling noise of greedy decoding."""

    def sleep(self, level: int = 2) -> CycleReport:
        """Level 2 discards weights and KV cache; level 1 offloads the weights."""

    def wake_up(self, weights: Any = None, *, reload_checkpoint: bool = False, method: str | None = None,
                strict: bool = True) -> CycleReport:
        """Weights → load → KV cache → reset the prefix cache. Level 2 needs ``weights`` (or
        ``reload_checkpoint=True``)."""

    def load_weights(self, weights: Any, *, method: str | None = None, strict: bool = True) -> CycleReport:
        """Replace an awake engine's weights, then reset its prefix cache."""

    def reset_prefix_cache(self) -> None:
        """Drop the cached prefixes (computed with earlier weights)."""

    def verify_weights(self, model: Any) -> VerifyReport:
        """The bitwise proof that the engine holds ``model``'s weights (cast to its dtype)."""

    def close(self) -> None:
        """Release the engine; every later call raises :class:`EngineClosedError`; closing twice is fine."""


def as_prompts(prompts: Any) -> list:
    """``prompts`` as a list of prompts: a string is one prompt (vLLM's ``LLM.generate`` would take it as one,
    but a loop over it would see characters), a list of ints one tokenized prompt, vLLM's own prompt dicts
    (``{"prompt": text}``, ``{"prompt_token_ids": ids}``) one prompt each, any other ordered iterable a prompt
    per item. What would be read wrong silently is refused with a ``TypeError`` naming it: bytes (their
    items are ints, they would pass for token ids), a dict with other keys (iterating it yields its keys,
    which would pass for text prompts), an unordered set (completions would not follow the caller's order),
    floating-point ids."""
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Mapping):
        return [_from_dict(prompts, "prompts")]
    _refuse_container(prompts, "prompts")
    if getattr(prompts, "ndim", None) == 0 or not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a string, a list of token ids, or a list of those; got "
                        f"{type(prompts).__name__}")
    items = list(prompts)
    if items and all(_is_token(t) for t in items):
        return [[operator.index(t) for t in items]]
    out: list = []
    for i, p in enumerate(items):
        if isinstance(p, str):
            out.append(p)
        elif isinstance(p, Mapping):
            out.append(_from_dict(p, f"prompt {i}"))
        else:
            _refuse_container(p, f"prompt {i}")
            ids = list(p) if isinstance(p, Iterable) and getattr(p, "ndim", 1) != 0 else None
            if ids is None or not all(_is_token(t) for t in ids):
                raise TypeError(f"prompt {i} must be a string or a list of token ids, got {p!r:.80}")
            out.append([operator.index(t) for t in ids])
    return out


def _from_dict(d: Mapping, what: str) -> str | list[int]:
    """A vLLM prompt dict as the prompt it holds: ``{"prompt": text}`` or ``{"prompt_token_ids": ids}``."""
    if len(d) == 1 and "prompt" in d and isinstance(d["prompt"], str):
        return d["prompt"]
    if len(d) == 1 and "prompt_token_ids" in d:
        ids = d["prompt_token_ids"]
        if not isinstance(ids, (str, bytes, bytearray, Mapping)) and isinstance(ids, Iterable):
            ids = list(ids)
            if all(_is_token(t) for t in ids):
                return [operator.index(t) for t in ids]
    raise TypeError(f"{what} is a dict with keys {sorted(map(str, d))}: the engines take vLLM's "
                    "{'prompt': <text>} or {'prompt_token_ids': <list of ints>} alone (other inputs such as "
                    "multi-modal data are not passed on); pass a string or a list of token ids")


def _refuse_container(p: Any, what: str) -> None:
    if isinstance(p, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} is {type(p).__name__}: its items are ints and would pass for token ids; decode "
                        "it to a string (b.decode()) or pass a list of token ids")
    if isinstance(p, (set, frozenset)):
        raise TypeError(f"{what} is a {type(p).__name__}: it has no order, so completions could not be matched "
                        "to prompts; pass a list")


def _is_token(t: Any) -> bool:
    """An integer token id: a Python / numpy int or a 0-d integer tensor (not a bool, a float or a string)."""
    if isinstance(t, (str, bytes, bool)) or getattr(t, "ndim", 0) != 0 or "bool" in str(getattr(t, "dtype", "")):
        return False
    try:
        operator.index(t)
    except TypeError:
        return False
    return True


def engine_lock(engine: Any) -> threading.RLock:
    """The engine's one lock (re-entrant: an operation may call another on the same thread)."""
    return engine.__dict__.setdefault("_operation_lock", threading.RLock())


@contextlib.contextmanager
def engine_operation(engine: Any, what: str) -> Iterator[None]:
    """One operation on ``engine``: under its lock (one at a time, whatever the thread), refused with
    :class:`EngineClosedError` once it is closed. For what works on an engine's vLLM from outside its class (an
    adapter copied into its LoRA slots) as much as for its own methods (:func:`operation`)."""
    with engine_lock(engine):
        if engine.closed:
            raise EngineClosedError(f"cannot {what}: this {type(engine).__name__} is closed; build a new one")
        yield


def operation(what: str) -> Callable:
    """Decorate an engine method: it runs under the engine's lock (one operation at a time, whatever the
    thread) and a closed engine refuses it with :class:`EngineClosedError`."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(self, *args: Any, **kwargs: Any) -> Any:
            with engine_operation(self, what):
                return fn(self, *args, **kwargs)

        return run

    return wrap


def closing(fn: Callable) -> Callable:
    """Decorate ``close``: under the engine's lock (it waits for a running operation), once (a second call
    does nothing); the engine counts as closed from then on, whatever ``fn`` raised."""

    @functools.wraps(fn)
    def run(self, *args: Any, **kwargs: Any) -> None:
        with engine_lock(self):
            if self.closed:
                return
            try:
                fn(self, *args, **kwargs)
            finally:
                self.mark_closed()

    return run
