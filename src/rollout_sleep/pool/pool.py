"""Data-parallel rollouts on one device: ``k`` engines, each generating its share of the prompts.

A rollout of a small model is bound by vLLM's Python (scheduler, KV-block bookkeeping, output handling:
~6.7 ms per step for 128 sequences on one core), not by the GPU. :class:`EnginePool` runs ``k`` engine
processes on the one GPU (:mod:`rollout_sleep.pool.process`), splits the prompts into ``k`` contiguous
shares, lets the engines work at the same time and puts the completions back in prompt order. The trainer's
weights reach every engine through one packed buffer and one CUDA IPC handle (:mod:`rollout_sleep.pool.packing`):
one cast-and-copy pass over the trainer's weights, then each engine copies from views of the buffer.

The pool implements the engine contract (:class:`~rollout_sleep.engine.contract.RolloutEngine`), so
:class:`~rollout_sleep.run.manager.RolloutManager` drives it as it drives one engine;
:func:`~rollout_sleep.weights.verify.verify` checks every engine. ``EnginePool.of([...])`` wraps in-process
engines (CPU tests, one engine). On CPU, engine processes generate and load from checkpoint directories;
in-memory weights for them need CUDA IPC and raise :class:`~rollout_sleep.pool.packing.IPCUnavailableError`.

Example:
    >>> pool = EnginePool("ckpt", engines=2, kv_cache_bytes=4 << 30)           # doctest: +SKIP
    >>> outs = pool.generate(prompts, n=8, max_tokens=128, temperature=1.0)    # doctest: +SKIP
    >>> pool.sleep(level=2); train(model)                                      # doctest: +SKIP
    >>> report = pool.wake_up(weights=model)      # pack once, every engine loads  # doctest: +SKIP
    >>> verify(pool, model).raise_if_failed()                                  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from rollout_sleep.engine.contract import as_prompts, closing, operation
from rollout_sleep.engine.memory import memory_gib
from rollout_sleep.engine.state import SleepState
from rollout_sleep.weights.spec import TensorSpec, WeightMismatchError, check_weights, optional_names
from rollout_sleep.weights.stream import WeightStream

from .packing import PackedWeights, Shared, require_ipc
from .process import RESULT_TIMEOUT_S, EngineProcess, LocalMember
from .reports import PoolReport, PoolVerifyReport

logger = logging.getLogger(__name__)


def split(n: int, k: int) -> list[tuple[int, int]]:
    """``k`` contiguous ``[start, end)`` shares of ``n`` items, sizes differing by at most one (empty
    shares last when ``n < k``).

    >>> split(16, 3)
    [(0, 6), (6, 11), (11, 16)]
    >>> split(1, 2)
    [(0, 1), (1, 1)]
    """
    if k < 1:
        raise ValueError(f"need at least one share, got {k}")
    base, extra = divmod(n, k)
    out, start = [], 0
    for j in range(k):
        end = start + base + (1 if j < extra else 0)
        out.append((start, end))
        start = end
    return out


def _plain_pairs(stream: WeightStream) -> Any:
    """``stream`` itself, or, when every entry is a plain parameter (nothing to gather, merge, cast or split),
    its ``(name, parameter)`` pairs straight away (no per-tensor trip through the stream's gather machinery:
    the pack casts as it copies)."""
    entries = stream.entries
    if stream.dtype is None and all(e.outputs is None and e.lora is None and not hasattr(e.param, "full_tensor")
                                    and not hasattr(e.param, "ds_id") for e in entries):
        return [(e.name, e.param) for e in entries]  # (the pack detaches what it copies)
    return stream


class EnginePool(SleepState):
    """``engines`` engine processes on this process's GPU, generating data-parallel.

    Args:
        model: a checkpoint directory (every engine starts from it).
        engines: *optional*, how many engine processes (default 2).
        seed: *optional*, engine ``j`` samples with seed ``seed + j`` (their streams differ).
        gpu_memory_utilization: *optional*, each engine's share of the GPU (default: 90% of the memory free now,
            split ``engines`` ways). Pass ``kv_cache_bytes`` too: each engine's KV cache is then sized exactly
            (vLLM's own sizing profiles memory, which other engines starting at the same time disturb).
        stagger: *optional*, start the first engine alone (it fills vLLM's compile cache), then the others
            at once (default on CUDA with several engines; starts are then ~2 cold starts, not ``k``).
        start_timeout_s: *optional*, how long an engine may take to start.
        command_timeout_s: *optional*, how long one command (generate, sleep, wake, load, verify) may take on
            an engine process before :class:`~rollout_sleep.pool.process.EngineProcessError` names the
            engine, the command and the phase it is stuck in (default 1800 s).
        engine_kwargs: passed to each :class:`~rollout_sleep.engine.engine.Engine` (``dtype``, ``max_model_len``,
            ``kv_cache_bytes``, ``enforce_eager``, ...).
    """

    def __init__(self, model: str | os.PathLike, engines: int = 2, *, seed: int = 0,
                 gpu_memory_utilization: float | None = None, stagger: bool | None = None,
                 start_timeout_s: float = 900.0, command_timeout_s: float = RESULT_TIMEOUT_S,
                 **engine_kwargs: Any):
        if not isinstance(engines, int) or isinstance(engines, bool) or engines < 1:
            raise ValueError(f"engines must be a positive integer, got {engines!r}")
        from pathlib import Path

        if not Path(model, "config.json").exists():
            raise FileNotFoundError(f"{model!r} is not a checkpoint directory (no config.json)")
        on_cuda = torch.cuda.is_available()
        before = memory_gib()[1]  # device-wide on CUDA: what the k engines then take
        if gpu_memory_utilization is None and on_cuda:  # a share of what is free now (a trainer may hold some)
            free, total = torch.cuda.mem_get_info()
            gpu_memory_utilization = 0.9 * free / total / engines
        if gpu_memory_utilization is not None:
            engine_kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        members = [EngineProcess(str(Path(model).resolve()), j, dict(engine_kwargs, seed=seed + j),
                                 timeout_s=command_timeout_s) for j in range(engines)]
        t0 = time.perf_counter()
        try:
            stagger = on_cuda and engines > 1 if stagger is None else stagger
            first = members[:1] if stagger else members
            for group in (first, members[len(first):]):
                for m in group:
                    m.start()
                for m in group:
                    m.wait_ready(start_timeout_s)
        except BaseException:
            for m in members:
                m.request_close()
            for m in members:
                m.close(timeout=10)
            raise
        self._setup(members, members[0].info, startup_seconds=time.perf_counter() - t0)
        # off CUDA the engines' memory is other processes' RSS, which this one does not see
        self.memory_before_gib = before if on_cuda else None
        self.memory_loaded_gib = memory_gib()[1] if on_cuda else None

    @classmethod
    def of(cls, engines: Iterable[Any]) -> "EnginePool":
        """A pool over in-process :class:`~rollout_sleep.engine.engine.Engine` objects (awake, same checkpoint):
        the same split, ordering, packing and per-engine reports, the engines working one after the other."""
        engines = list(engines)
        if not engines:
            raise ValueError("EnginePool.of needs at least one engine")
        paths = {e.model_path for e in engines}
        if len(paths) != 1:
            raise ValueError(f"the engines of a pool must share one checkpoint; got {sorted(paths)}")
        self = cls.__new__(cls)
        members = [LocalMember(e, j) for j, e in enumerate(engines)]
        self._setup(members, members[0].commands.info(), startup_seconds=0.0)
        self.memory_before_gib, self.memory_loaded_gib = engines[0].memory_before_gib, engines[-1].memory_loaded_gib
        return self

    subject = "pool"
    levels = (0, 1, 2)  # as each engine's (0: the KV cache only)

    def _setup(self, members: list, info: dict, startup_seconds: float) -> None:
        self.members = members
        self.model_path: str = info["model_path"]
        self.dtype: torch.dtype = info["dtype"]
        self.tied: bool = info["tied"]
        self.spec: dict[str, TensorSpec] = info["spec"]
        self.sleep_mode: bool = info["sleep_mode"]
        self.on_cuda: bool = info["on_cuda"]
        self.quantization: str | None = info["quantization"]  # each engine's (None: model.dtype; "fp8")
        self.startup_seconds = startup_seconds
        self._level: int | None = info["level"]
        self._packed: PackedWeights | None = None
        self.last_generate_seconds: list[float] = []  # each engine's own generate time, last call

    # ------------------------------------------------------------------ state
    @property
    def engines(self) -> int:
        return len(self.members)

    def _fan_out(self, cmd: str, args_for: Any, members: list | None = None) -> list:
        """Submit ``cmd`` to every member (``args_for(j)`` → its arguments), then collect every result;
        the first error is raised once all have answered (no engine is left mid-command)."""
        members = self.members if members is None else members
        submitted, results, error = [], [], None
        for j, m in enumerate(members):
            try:
                m.submit(cmd, *args_for(j))
                submitted.append(m)
            except BaseException as err:
                error = error or err
        for m in submitted:
            try:
                results.append(m.result())
            except BaseException as err:
                error = error or err
                results.append(None)
        if error is not None:
            raise error
        return results

    def _refresh_state(self) -> None:
        """After a failed command, take the engines' own state (they may differ: the pool reports the worst)."""
        levels = []
        for m in self.members:
            try:
                m.submit("info")
                levels.append(m.result(timeout=60)["level"])
            except BaseException:
                levels.append(2)
        self._level = next((lv for lv in levels if lv is not None), None)

    # --------------------------------------------------------------- generate
    @operation("generate")
    def generate(self, prompts: Iterable[str] | Iterable[list[int]], sampling: Any = None,
                 **sampling_kwargs: Any) -> list:
        """Sample completions, each engine for a contiguous share of ``prompts``, all at once.

        Same arguments and result as :meth:`Engine.generate <rollout_sleep.engine.engine.Engine.generate>`: a flat
        list of completions, ``n`` per prompt, in prompt order (``prompt_index`` counts over all prompts).
        """
        prompts = as_prompts(prompts)
        self.require_awake("generate")
        shares = [s for s in split(len(prompts), self.engines) if s[1] > s[0]]
        members = self.members[:len(shares)]
        parts = self._fan_out("generate", lambda j: (prompts[shares[j][0]:shares[j][1]], sampling, sampling_kwargs),
                              members)
        self.last_generate_seconds = [seconds for seconds, _ in parts]
        out = []
        for (start, _), (_, part) in zip(shares, parts):
            for c in part:
                c.prompt_index += start
                out.append(c)
        return out

    # ------------------------------------------------------------- sleep/wake
    @operation("sleep")
    def sleep(self, level: int = 2) -> PoolReport:
        """Put every engine to sleep (each frees its own weights and KV cache)."""
        level = self.check_sleep(level)
        report = PoolReport("sleep", level)
        report.memory_kind, report.memory_gib["before"] = memory_gib()
        t0 = time.perf_counter()
        try:
            report.engines = self._fan_out("sleep", lambda j: (level,))
        except BaseException:
            self._refresh_state()
            raise
        self._level = level
        report.seconds["sleep"] = max(r.seconds.get("sleep", 0.0) for r in report.engines)
        report.wall_seconds = time.perf_counter() - t0
        report.memory_gib["asleep"] = memory_gib()[1]
        return report

    @operation("wake up")
    def wake_up(self, weights: Any = None, *, reload_checkpoint: bool = False, method: str | None = None,
                strict: bool = True) -> PoolReport:
        """Wake every engine with the same weights (see :meth:`Engine.wake_up
        <rollout_sleep.engine.engine.Engine.wake_up>`): in-memory weights (a model, a :class:`WeightStream`, a mapping
        or list of ``(name, tensor)``) are packed once into the shared buffer, then every engine loads from it;
        a checkpoint directory is read by every engine (the disk route, also on CPU)."""
        self.check_wake(weights, reload_checkpoint, awake_hint="use load_weights(...) to update its weights",
                        level2_hint="waking from level 2 needs new weights: pass weights=... (the trainer's), or "
                                    f"reload_checkpoint=True to reload the original checkpoint {self.model_path}")
        return self._deliver("wake", weights, (reload_checkpoint, method, strict))

    @operation("load weights")
    def load_weights(self, weights: Any, *, method: str | None = None, strict: bool = True) -> PoolReport:
        """Replace the weights of every (awake) engine, then reset their prefix caches."""
        self.check_awake_for_load()
        return self._deliver("load", weights, (method, strict))

    @operation("reset the prefix cache")
    def reset_prefix_cache(self) -> None:
        """Drop every engine's cached prefixes."""
        self.require_awake("reset the prefix cache")
        self._fan_out("reset", lambda j: ())

    def _deliver(self, cmd: str, weights: Any, rest: tuple) -> PoolReport:
        report = PoolReport(cmd, self._level)
        report.memory_kind, report.memory_gib["asleep" if cmd == "wake" else "before"] = memory_gib()
        t0 = time.perf_counter()
        if weights is None or isinstance(weights, (str, os.PathLike)):
            payload = [weights] * self.engines
        else:
            payload = self._pack(weights, strict=rest[-1], seconds=report.seconds)
        try:
            report.engines = self._fan_out(cmd, lambda j: (payload[j], *rest))
        except BaseException:
            self._refresh_state()
            raise
        self._level = None
        for r in report.engines:
            for k, v in r.seconds.items():
                report.seconds[k] = max(report.seconds.get(k, 0.0), v)
        report.wall_seconds = time.perf_counter() - t0
        report.memory_gib["awake"] = memory_gib()[1]
        return report

    # ----------------------------------------------------------------- weights
    def _source(self, weights: Any) -> tuple[Any, dict]:
        """(iterable of (name, tensor), its spec) for in-memory weights."""
        if isinstance(weights, nn.Module):
            weights = self._stream(weights)
        if isinstance(weights, WeightStream):
            return _plain_pairs(weights), weights.spec()
        if isinstance(weights, Mapping):
            weights = list(weights.items())
        if not isinstance(weights, (list, tuple)):
            if not isinstance(weights, Iterable):
                raise TypeError(f"weights must be a model, a WeightStream, a checkpoint path, a mapping or an "
                                f"iterable of (name, tensor); got {type(weights).__name__}")
            weights = list(weights)
        from rollout_sleep.engine.feed import pair_problem

        problems = [p for p in map(pair_problem, weights) if p]
        if problems:
            raise WeightMismatchError(problems[:1])
        return weights, {n: (tuple(t.shape), t.dtype) for n, t in weights}

    def _stream(self, model: nn.Module) -> WeightStream:
        """The :class:`WeightStream` of ``model``, kept from one sync to the next (walking a model costs ~300
        of transformers' conversion look-ups, several ms per sync) while each of its parameters is still the
        one its module holds (one dict look-up each). PEFT models get a new one at each sync (merging adapters
        depends on their state)."""
        from rollout_sleep.weights.stream import is_peft, unwrap

        cached = getattr(self, "_cached_stream", None)
        if cached is not None and cached[0]() is model and all(m._parameters.get(leaf) is p for m, leaf, p in cached[1]):
            return cached[2]
        stream = WeightStream(model, include_tied_head=False)
        base = unwrap(model)
        if not is_peft(base):
            import weakref

            try:
                owners = [(base.get_submodule(e.name.rpartition(".")[0]), e.name.rpartition(".")[2], e.param)
                          for e in stream.entries]
            except AttributeError:  # a name that is not a module path: no keeping
                return stream
            self._cached_stream = (weakref.ref(model), owners, stream)
        return stream

    def _pack(self, weights: Any, strict: bool, seconds: dict) -> list[Shared]:
        """Validate in-memory weights against the checkpoint (nothing is touched if they do not fit), pack
        them into the shared buffer (reused while the spec is the same), and what each member receives."""
        processes = [m for m in self.members if isinstance(m, EngineProcess)]
        if processes:
            require_ipc()  # before anything is read or allocated
        source, spec = self._source(weights)
        optional = optional_names(self.tied)
        check_weights(spec, self.spec, optional=optional, strict=strict)
        self._ensure_buffer(spec)
        t0 = time.perf_counter()
        self._packed.pack(source)
        seconds["pack"] = time.perf_counter() - t0
        return [self._packed.share(j) if isinstance(m, EngineProcess) else
                self._packed.local()
                for j, m in enumerate(self.members)]

    @operation("adopt the trainer's parameters")
    def adopt(self, model: nn.Module) -> list[str]:
        """Move the trainer's parameters into the shared buffer (each parameter's data becomes a view of its
        slot), so that a sync copies nothing on the trainer's side: the engines copy straight from the
        trainer's own memory. For plain (unsharded) parameters already in the engines' dtype; call it before
        building the optimizer and before DDP/FSDP wrapping. Returns the names adopted (the others are
        packed at each sync as usual)."""
        stream = self._stream(model)
        spec = stream.spec()
        optional = optional_names(self.tied)
        check_weights(spec, self.spec, optional=optional, strict=True)
        self._ensure_buffer(spec)
        done = self._packed.adopt((e.name, e.param) for e in stream.entries if e.outputs is None and e.lora is None)
        logger.info("%d of %d trainer parameters now live in the shared weight buffer", len(done), len(spec))
        return done

    def _ensure_buffer(self, spec: dict) -> None:
        """A packed buffer laid out for ``spec`` (the one in place if it already is)."""
        skip = optional_names(self.tied)  # a tied head is the embedding in vLLM
        keys = [(n, tuple(s), dt.is_floating_point) for n, (s, dt) in spec.items() if n not in skip]  # floats: one dtype
        if self._packed is None or self._packed_keys != keys:
            if self._packed is not None:
                self.release_buffer()
            self._packed = PackedWeights.for_spec(spec, dtype=self.dtype, skip=skip)
            self._packed_keys = keys

    @operation("release the weight buffer")
    def release_buffer(self) -> None:
        """Free the shared buffer (each engine unmaps it first); the next in-memory load packs a new one."""
        if self._packed is None:
            return
        self._fan_out("drop_buffer", lambda j: ())
        self._packed.release()
        self._packed = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @operation("verify weights")
    def verify_weights(self, model: nn.Module | WeightStream | Any) -> PoolVerifyReport:
        """The bitwise proof for every engine (what :func:`~rollout_sleep.weights.verify.verify` runs on a
        pool): the shared buffer is compared with the trainer's weights (cast to the engines' dtype), then
        each engine, at the same time, compares what it holds with the buffer. Without a buffer (engines
        loaded from disk) the trainer's weights are packed first."""
        self.require_awake("verify weights")
        t0 = time.perf_counter()
        if any(isinstance(m, EngineProcess) for m in self.members):
            require_ipc()
        source, spec = self._source(model)
        if self._packed is None:
            self._pack(source, strict=True, seconds={})
        views = dict(self._packed.views())
        report = PoolVerifyReport(ok=True, compared=0)
        with torch.no_grad():
            for name, tensor in source:
                if name in self._packed.skip:
                    continue
                held = views.get(name)
                if held is None or held.shape != tensor.shape:
                    report.ok = False
                    report.mismatched[f"buffer:{name}"] = float("inf")
                elif not torch.equal(held, tensor.to(held.device, held.dtype)):
                    report.ok = False
                    report.mismatched[f"buffer:{name}"] = \
                        (held.float() - tensor.to(held.device).float()).abs().max().item()
        shared = [self._packed.share(j) if isinstance(m, EngineProcess) else
                  self._packed.local()
                  for j, m in enumerate(self.members)]
        report.engines = self._fan_out("verify", lambda j: (shared[j],))
        for j, r in enumerate(report.engines):
            report.ok = report.ok and r.ok
            report.compared += r.compared
            report.max_abs_diff = max(report.max_abs_diff, r.max_abs_diff)
            report.mismatched.update({f"engine{j}:{n}": d for n, d in r.mismatched.items()})
            report.unplaced.update({f"engine{j}:{n}": why for n, why in r.unplaced.items()})
        report.seconds = time.perf_counter() - t0
        return report

    @closing
    def close(self) -> None:
        """Shut every engine down (engine processes exit and give their GPU memory back)."""
        processes = [m for m in getattr(self, "members", []) if isinstance(m, EngineProcess)]
        for m in processes:  # all shut down at once, then each is waited for
            m.request_close()
        for m in processes:
            m.close()
        self.members = []
        if getattr(self, "_packed", None) is not None:
            self._packed.release()
            self._packed = None

    def __enter__(self) -> "EnginePool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
