"""The colocated vLLM engine: generate, sleep, and the memory-safe wake (weights → load → KV cache → reset).

``Engine`` owns one in-process ``vllm.LLM`` and a small state machine (awake ↔ asleep(level)) that refuses
the calls vLLM would get wrong silently: generating while asleep (on CPU vLLM blocks forever), waking from
level 2 without new weights (vLLM would generate from discarded memory), reloading "nothing" (vLLM would
reload the original checkpoint and drop the trained weights), sleeping twice, unknown levels.

On CUDA, sleep uses vLLM's sleep allocator: level 1 offloads the weights to host memory and drops the
KV cache, level 2 drops both, and the memory figures in each report show what was given back. On CPU vLLM
has no sleep allocator: ``sleep()`` still calls vLLM's ``sleep(level)``, which pauses its scheduler, but
no memory is released (reports show RSS, unchanged). The engine keeps the level-2 contract there too
(the weights count as discarded and must be reloaded), so the same code is tested on CPU that runs on GPU.

Example:
    >>> eng = Engine("/path/to/checkpoint")                                      # doctest: +SKIP
    >>> outs = eng.generate(["1+1="], max_tokens=8, temperature=0.0)             # doctest: +SKIP
    >>> eng.sleep(level=2)                                                       # doctest: +SKIP
    >>> report = eng.wake_up(weights=model.state_dict().items())                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import numbers
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import layout
from .weights import (TensorSpec, WeightMismatchError, check_checkpoint_dir, check_weights, read_checkpoint_spec,
                      tied_embeddings)

LEVELS = (1, 2)
METHODS = ("auto", "reload", "load_weights", "direct")
FINITE_CHECK_BYTES = 256 << 20  # a stream's tensors are checked for NaN/Inf with one device sync per this many bytes

logger = logging.getLogger(__name__)


class EngineStateError(RuntimeError):
    """A call that is not allowed in the engine's current state; the state is unchanged."""


class IncompleteWeightsError(EngineStateError):
    """The last weight load did not finish: the engine holds a mix of old and new weights."""


@dataclass
class Completion:
    """One sampled completion: token ids and the sampler's log-prob of each sampled token."""

    prompt_index: int
    prompt_token_ids: list[int]
    token_ids: list[int]
    logprobs: list[float] | None
    text: str
    finish_reason: str | None


@dataclass
class CycleReport:
    """Seconds per phase and memory figures of one sleep or wake (GiB: free GPU memory, or RSS on CPU)."""

    kind: str
    level: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    memory_gib: dict[str, float] = field(default_factory=dict)
    memory_kind: str = "cuda_free"
    cache_released: bool = False  # a wake that emptied PyTorch's cache first (see release_cached_memory)
    # with keep_trainer_cache on CUDA: whether PyTorch's cached free memory (reserved - allocated: the trainer's
    # cache) was still there after the call, measured around it; None where not asked or not CUDA
    trainer_cache_kept: bool | None = None

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}{k}_s": v for k, v in self.seconds.items()}
        out.update({f"{prefix}{self.memory_kind}_{k}_gib": v for k, v in self.memory_gib.items()})
        if self.kind == "wake":
            out[f"{prefix}cache_released"] = self.cache_released
        if self.trainer_cache_kept is not None:
            out[f"{prefix}trainer_cache_kept"] = self.trainer_cache_kept
        return out


class SleepState:
    """The awake / asleep(level) state shared by the in-process and the remote engine."""

    _level: int | None = None  # None while awake

    @property
    def state(self) -> str:
        return "awake" if self._level is None else f"asleep(level={self._level})"

    @property
    def is_asleep(self) -> bool:
        return self._level is not None

    @property
    def sleep_level(self) -> int | None:
        """The level the engine sleeps at, or ``None`` while awake."""
        return self._level


def release_cached_memory(needed_gib: float | None = None, margin_gib: float = 1.0) -> bool:
    """Hand PyTorch's cached free blocks (the trainer's) back to the driver before vLLM wakes: vLLM maps its
    weights and KV cache outside PyTorch's allocator, so blocks the cache keeps are memory it cannot map
    (seen on an H100: out of memory at wake after a 128-completion micro-batch, or a higher peak).

    With ``needed_gib`` (what the engine maps back on waking: what its last wake took) the cache is
    released only when the free memory falls short of it plus ``margin_gib``: releasing it at every wake
    made the 4B weights wake take 116 ms instead of ~32 ms on an H100. Returns whether it released.
    """
    if not torch.cuda.is_available():
        return False
    if needed_gib is not None and torch.cuda.mem_get_info()[0] / 2**30 >= needed_gib + margin_gib:
        return False
    torch.cuda.empty_cache()
    return True


@contextmanager
def _cache_kept():
    """Inside the block ``torch.cuda.empty_cache`` and ``torch.accelerator.empty_cache`` do nothing: vLLM's
    sleep ends with one and its wake (0.32) starts with one, which would hand the trainer's cached working
    set back to the driver only for the trainer to allocate it again (vLLM has no setting for it; whether
    the wake needs the room is decided before it, by :func:`release_cached_memory`). Process-wide while
    the block runs: a call from another thread is skipped too."""
    saved = [(mod, mod.empty_cache) for mod in (torch.cuda, getattr(torch, "accelerator", None))
             if mod is not None and hasattr(mod, "empty_cache")]
    for mod, _ in saved:
        mod.empty_cache = lambda *a, **k: None
    try:
        yield
    finally:
        for mod, fn in saved:
            mod.empty_cache = fn


def _cached_free_bytes() -> int:
    """Bytes PyTorch's allocator holds but no tensor uses: the trainer's cache (vLLM's weights and KV cache
    are live tensors, so they count as allocated, asleep or not)."""
    return torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


@contextmanager
def _keeping_cache(report: "CycleReport", keep: bool):
    """``_cache_kept`` when ``keep`` (on CUDA), and the truth in ``report.trainer_cache_kept``: whether the
    cached free memory PyTorch held before the block is still held after it (whatever path vLLM took;
    a tolerance of 5% or 64 MiB for blocks vLLM itself frees or reuses)."""
    if not (keep and report.memory_kind == "cuda_free"):
        yield
        return
    before = _cached_free_bytes()
    with _cache_kept():
        yield
    after = _cached_free_bytes()
    kept = after >= before - max(64 << 20, 0.05 * before)
    report.trainer_cache_kept = kept if report.trainer_cache_kept is None else report.trainer_cache_kept and kept
    if not kept:
        logger.warning("keep_trainer_cache: PyTorch's cached free memory fell from %.2f to %.2f GiB during the "
                       "%s (this vLLM version empties the cache some other way)", before / 2**30, after / 2**30,
                       report.kind)


def kv_cache_bytes_for(model_path: str | os.PathLike, tokens: int, dtype: torch.dtype | str = "auto",
                       block_size: int = 16) -> int:
    """Bytes of a KV cache holding ``tokens`` tokens of the checkpoint's model (full attention, K and V per
    layer), rounded up to whole blocks of ``block_size`` tokens; ``dtype="auto"``: the checkpoint's."""
    import json

    cfg = json.loads(Path(model_path, "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if dtype == "auto":
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    per_token = cfg["num_hidden_layers"] * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    return -(-tokens // block_size) * block_size * per_token


def fast_output_kwargs(sampling_kwargs: dict) -> dict:
    """``SamplingParams`` keyword arguments with vLLM's cheap output path where the caller left it open:
    flat log-probs (one list per request instead of a dict per token, where the version has them) and no
    detokenization (vLLM decodes every request at every step, and each log-prob token too, on the engine's
    thread when it runs in-process; one batched decode afterwards is far cheaper). Stop strings need
    vLLM's text, so they keep it."""
    from vllm import SamplingParams

    out = dict(sampling_kwargs)
    if "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ()):
        out.setdefault("flat_logprobs", True)
    if not out.get("stop"):
        out.setdefault("detokenize", False)
    return out


def _sampled_logprobs(logprobs: Any, token_ids: list[int]) -> list[float]:
    """The sampler's log-prob of each sampled token, from vLLM's per-token dicts or its flat lists."""
    if hasattr(logprobs, "start_indices"):  # FlatLogprobs
        if len(logprobs.logprobs) == len(token_ids) and logprobs.token_ids == token_ids:
            return list(logprobs.logprobs)  # logprobs=0: exactly the sampled tokens, one per position
        out = []
        for pos, tok in enumerate(token_ids):
            start, end = logprobs.start_indices[pos], logprobs.end_indices[pos]
            j = start if logprobs.token_ids[start] == tok else logprobs.token_ids.index(tok, start, end)
            out.append(logprobs.logprobs[j])
        return out
    return [step[tok].logprob for step, tok in zip(logprobs, token_ids)]


def _memory_gib() -> tuple[str, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return "cuda_free", torch.cuda.mem_get_info()[0] / 2**30
    import psutil

    return "cpu_rss", psutil.Process().memory_info().rss / 2**30


@contextmanager
def _timed(report: CycleReport, phase: str):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    report.seconds[phase] = report.seconds.get(phase, 0.0) + time.perf_counter() - t0


def _distributed_world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 1


def _sleep_mode_available() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def add_note(err: BaseException, note: str) -> None:
    """``err.add_note(note)`` (Python 3.11+; on 3.10 the note is kept in ``__notes__`` only)."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:
        err.__notes__ = [*getattr(err, "__notes__", []), note]


def _finite_probe(t: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor on ``t``'s device that is finite iff ``t`` is: its sum, accumulated in fp32 (fp64 for
    fp64). One read of the tensor, no temporary of its size, no sync. (A sum could overflow only for
    weights near 1e38, which are not sane weights either.)"""
    return t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _non_finite(items: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating tensors holding a NaN or Inf: one reduction per tensor on its device, stacked,
    then one sync per device (not one per tensor)."""
    probes: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    for name, t in items:
        if t.is_floating_point() and t.numel():
            names, sums = probes.setdefault(t.device, ([], []))
            names.append(name)
            sums.append(_finite_probe(t).double())
    bad = []
    for names, sums in probes.values():
        ok = torch.isfinite(torch.stack(sums))
        if not bool(ok.all()):
            bad += [n for n, good in zip(names, ok.tolist()) if not good]
    return bad


def _pair_problem(item: Any) -> str | None:
    """What is wrong with one ``(name, tensor)`` item of a load, or None: checked before vLLM sees it (a
    malformed item or a tensor without data raised inside vLLM's layerwise reload and broke the engine
    for every later load)."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        return (f"each weight must be a (name, tensor) pair; got {type(item).__name__}"
                + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
                + " (pass model.state_dict() / named_parameters() or a WeightStream)")
    name, tensor = item
    if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
        return (f"each weight must be a (name: str, tensor: torch.Tensor) pair; got ({type(name).__name__}, "
                f"{type(tensor).__name__}) (numpy arrays: torch.from_numpy)")
    if tensor.is_meta:
        return (f"weight {name!r} is on the meta device (no data): materialize the model first "
                "(to_empty(...) and load its weights)")
    return None


_TIED = ("model.embed_tokens.weight", "lm_head.weight")


def _tie_sample(t: torch.Tensor) -> torch.Tensor:
    """A few thousand evenly spread elements of ``t`` (a copy): enough to tell an untied head from the
    embedding without holding a second vocabulary-sized tensor."""
    flat = t.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 4096)].clone()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaN equal to NaN (a diverged tied embedding is still tied: the NaN check names it)."""
    return a.shape == b.shape and torch.allclose(a, b.to(a.device, a.dtype), rtol=0, atol=0, equal_nan=True)


def _untied_problem() -> str:
    return ("'lm_head.weight' differs from 'model.embed_tokens.weight', but the engine's model ties them "
            "(tie_word_embeddings=True): the trainer's model is untied, or its head was trained apart. Build the "
            "engine from a checkpoint with tie_word_embeddings=False, or keep the trainer's head tied")


def _non_finite_problem(name: str) -> str:
    return (f"non-finite values (NaN or Inf) in {name!r}: the trainer's weights diverged (check the loss, lower "
            "the learning rate, clip gradients); vLLM would generate garbage from them")


@dataclass
class _Prepared:
    """Weights validated by ``Engine._prepare``: ``kind`` is path / checked (in memory, fully checked) /
    spec (a stream whose names were checked) / stream (checked as it passes)."""

    kind: str
    weights: Any
    strict: bool
    method: str | None


class _Feed:
    """The tensors of one load on their way to vLLM, checked as they pass: names, shapes and dtypes (for a
    stream that did not declare them), duplicates, and NaN/Inf (one sync per ``FINITE_CHECK_BYTES``).

    It never raises into vLLM: on a broken source or a bad tensor it ends the stream, so vLLM finishes
    its layerwise reload and puts back what it did not receive (an exception mid-layer left vLLM's
    reload state half-built, and the next complete load failed with ``AttributeError: 'Parameter' object
    has no attribute 'weight_loader'``). :meth:`error_after_load` then says what went wrong.
    """

    def __init__(self, items: Iterable, *, check_names: bool, check_values: bool, spec: dict[str, TensorSpec],
                 optional: set[str], strict: bool, dtype: torch.dtype | None, tie_head: bool = False,
                 check_tie: bool = False):
        self.items, self.check_names, self.check_values = items, check_names, check_values
        self.tie_head = tie_head  # a tied model on CPU: give vLLM the head (the embedding) if the source did not
        self.check_tie = check_tie  # a tied model: a head given must equal the embedding
        self.tie_samples: dict[str, torch.Tensor] = {}
        self.spec, self.optional, self.strict, self.dtype = spec, optional, strict, dtype
        self.seen: set[str] = set()
        self.count = 0  # tensors handed to vLLM
        self.last: str | None = None
        self.source_error: BaseException | None = None
        self.problems: list[str] = []
        self.hint = ""

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        pending: list[tuple[str, torch.Tensor]] = []
        pending_bytes = 0
        source = iter(self.items)
        while True:
            try:
                item = next(source)
            except StopIteration:
                break
            except BaseException as err:  # the trainer's side broke mid-stream (Ctrl-C included: re-raised after)
                self.source_error = err
                break
            problem = _pair_problem(item)
            if problem:
                self.problems.append(problem)
                break
            name, tensor = item
            if name in self.seen:
                self.problems.append(f"weight {name!r} given twice in one load (vLLM counts each layer's "
                                     "elements: a repeat would finish a layer before all its tensors arrived)")
                break
            if self.check_names:
                try:
                    check_weights({name: (tuple(tensor.shape), tensor.dtype)}, self.spec, optional=self.optional,
                                  strict=False, dtype=self.dtype)
                except WeightMismatchError as err:
                    self.problems += err.problems
                    self.hint = err.hint
                    break
            if self.check_values and tensor.is_floating_point() and tensor.numel():
                # queued on the tensor's device before it is handed on: reads it while it is valid
                pending.append((name, _finite_probe(tensor).double()))
                pending_bytes += tensor.numel() * tensor.element_size()
            if self.check_tie and name in _TIED:
                self.tie_samples[name] = _tie_sample(tensor)
                if len(self.tie_samples) == 2 and not _same(*(self.tie_samples[n] for n in _TIED)):
                    self.problems.append(_untied_problem())
                    break
            self.seen.add(name)
            self.count += 1
            self.last = name
            if name == "model.embed_tokens.weight" and self.tie_head:
                embedding = tensor
            yield name, tensor
            if pending_bytes >= FINITE_CHECK_BYTES:
                if not self._all_finite(pending):
                    return
                pending, pending_bytes = [], 0
        if not self.problems and self.source_error is None and self._all_finite(pending) and self.tie_head \
                and "lm_head.weight" not in self.seen and "model.embed_tokens.weight" in self.seen:
            # vLLM's CPU kernels keep a packed copy of a tied head: without it the head stays stale (silently)
            self.seen.add("lm_head.weight")
            yield "lm_head.weight", embedding

    def _all_finite(self, pending: list[tuple[str, torch.Tensor]]) -> bool:
        if not pending:
            return True
        ok = torch.isfinite(torch.stack([p.to(pending[0][1].device) for _, p in pending]))
        if bool(ok.all()):
            return True
        self.problems += [_non_finite_problem(n) for (n, _), good in zip(pending, ok.tolist()) if not good]
        return False

    def error_after_load(self, spec: dict[str, TensorSpec], optional: set[str]) -> Exception | None:
        """The error to raise once vLLM has finished with the stream (None: the load was complete)."""
        if self.source_error is not None:
            err = self.source_error
            if not isinstance(err, Exception):  # KeyboardInterrupt / SystemExit: the user's stop, kept as it is
                add_note(err, f"raised by the weight stream after {self.count} tensor(s): the engine is marked "
                              "incomplete; the next complete load works")
                return err
            where = f"after {self.count} tensor(s)" + (f" (the last: {self.last!r})" if self.last else "")
            out = IncompleteWeightsError(
                f"the weight stream broke {where}: {type(err).__name__}: {err}. The engine is marked incomplete "
                "(part of it holds new weights) and refuses to generate until a complete load_weights(...) / "
                "wake_up(weights=...); the next complete load works")
            out.__cause__ = err
            return out
        if self.problems:
            return WeightMismatchError(self.problems, loaded=self.count, hint=self.hint)
        if self.strict:
            missing = sorted(set(spec) - self.seen - optional)
            if missing:
                return WeightMismatchError(
                    [f"missing weight {n!r} (shape {list(spec[n].shape)})" for n in missing], loaded=self.count,
                    hint="The stream ended early: a generator cut short or partly consumed before? With "
                         "strict=True every weight must come in one load (strict=False allows a subset).")
        return None


class Engine(SleepState):
    """An in-process vLLM engine with sleep mode and a checked sleep/wake/reload/reset cycle.

    Args:
        model: a local HF checkpoint directory (e.g. from :func:`rollout_sleep.checkpoints.make_checkpoint`).
        dtype: *optional*, vLLM's dtype (``"auto"`` = the checkpoint's).
        seed: *optional*, vLLM's seed.
        max_model_len: *optional*, longest prompt + completion.
        gpu_memory_utilization: *optional*, share of the GPU vLLM may take (CUDA).
        kv_cache_bytes: *optional*, KV cache size in bytes (default 256 MiB on CPU).
        load_method: *optional*, default way to push weights: ``"auto"``, ``"reload"``
            (``collective_rpc("reload_weights")``), ``"load_weights"`` (one batched call) or ``"direct"``
            (copy into vLLM's parameters; CUDA, TP=1). ``auto`` takes ``direct`` where it applies.
        keep_trainer_cache: *optional*, leave PyTorch's cached blocks (the trainer's working set) in place
            when sleeping, instead of vLLM's ``empty_cache`` at every sleep; a wake still releases them
            when vLLM would not fit beside them (see :func:`release_cached_memory`).
        llm_kwargs: passed to ``vllm.LLM`` as they are.
    """

    _wake_need_gib: float | None = None  # GPU memory a wake maps (measured at the last wake; None: release)
    keep_trainer_cache = False
    check_finite = True  # refuse weights holding NaN/Inf (one read of every tensor per load; False skips it)

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_bytes: int | None = None,
        enable_prefix_caching: bool = True,
        load_method: str = "auto",
        keep_trainer_cache: bool = False,
        **llm_kwargs: Any,
    ):
        # Weight pushes hand in-memory tensors to the worker: it must live in this process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM, EngineArgs

        if not Path(model, "config.json").exists():
            raise FileNotFoundError(f"{model!r} is not a checkpoint directory (no config.json)")
        self._describe(model, load_method)
        self.keep_trainer_cache = keep_trainer_cache
        kwargs: dict[str, Any] = dict(
            model=self.model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
            enable_sleep_mode=self.sleep_mode, enable_prefix_caching=enable_prefix_caching,
        )
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_bytes is None and not self.on_cuda:
            kv_cache_bytes = 256 << 20
        if kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        if "logprobs_mode" in {f.name for f in dataclasses.fields(EngineArgs)}:
            # sampled tokens' log-probs after temperature (what was sampled from; TRL asks the same)
            kwargs["logprobs_mode"] = "processed_logprobs"
        if _distributed_world() > 1 and "distributed_executor_backend" not in llm_kwargs:
            # One engine per trainer rank, inside the trainer's process group (as TRL's colocate mode does).
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_kwargs)
        t0 = time.perf_counter()
        llm = LLM(**kwargs)
        self._bind(llm, startup_seconds=time.perf_counter() - t0)

    def _describe(self, model_path: str | os.PathLike, load_method: str) -> None:
        """What the engine knows of its checkpoint and device before holding a ``vllm.LLM``."""
        self.model_path = str(Path(model_path).resolve())
        self.spec: dict[str, TensorSpec] = read_checkpoint_spec(self.model_path)
        self.tied = tied_embeddings(self.model_path)
        self.sleep_mode = _sleep_mode_available()
        self.on_cuda = torch.cuda.is_available()
        self.load_method = load_method
        self.memory_before_gib = _memory_gib()[1]

    def _bind(self, llm: Any, startup_seconds: float) -> None:
        """Take ``llm`` as this engine's vLLM, awake, with complete weights."""
        self.llm = llm
        self.startup_seconds = startup_seconds
        self.memory_loaded_gib = _memory_gib()[1]
        self.tokenizer = llm.get_tokenizer()
        self._level = None
        self._weights_complete = True
        self._incomplete_reason = ""
        self._engine_params: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._packed: dict[str, list[str]] = {}
        self._targets: dict[str, torch.Tensor] | None = None
        self._direct_ok: bool | None = None

    @classmethod
    def attach(cls, llm: Any, model_path: str | os.PathLike, load_method: str = "auto") -> "Engine":
        """Wrap an existing in-process ``vllm.LLM`` (built by another library, e.g. TRL) without rebuilding it.

        The other library keeps driving sleep and wake; use :meth:`push` to load weights into it.
        """
        self = cls.__new__(cls)
        self._describe(model_path, load_method)
        self._bind(llm, startup_seconds=0.0)
        return self

    def push(self, weights: Any, *, method: str | None = None, strict: bool = True) -> CycleReport:
        """Validate and load weights, then reset the prefix cache, without touching the sleep state.

        For integrations that call vLLM's ``sleep``/``wake_up`` themselves: the weights buffers must be
        awake. Use :meth:`wake_up` / :meth:`load_weights` otherwise.
        """
        prepared = self._prepare(weights, strict, method)
        report = CycleReport("push")
        with _timed(report, "load"):
            self._load(prepared)
        with _timed(report, "reset"):
            self._reset_prefix_cache()
        return report

    # ------------------------------------------------------------------ state
    @property
    def dtype(self) -> torch.dtype:
        return self.llm.llm_engine.model_config.dtype

    def _require_awake(self, what: str) -> None:
        if self._level is not None:
            raise EngineStateError(
                f"cannot {what}: the engine is {self.state}; call wake_up(...) first "
                "(vLLM would block or read discarded memory)")
        if not self._weights_complete:
            raise IncompleteWeightsError(
                f"cannot {what}: the last weight load was interrupted or incomplete ({self._incomplete_reason}), "
                "so the engine holds a mix of old and new weights; call load_weights(...) with a complete set first")

    # --------------------------------------------------------------- generate
    def generate(self, prompts: Iterable[str] | Iterable[list[int]], sampling: Any = None, *,
                 use_tqdm: bool = False, **sampling_kwargs: Any) -> list[Completion]:
        """Sample completions for text prompts or token-id prompts.

        Args:
            prompts: strings, or lists of token ids.
            sampling: *optional*, a ``vllm.SamplingParams``; otherwise ``sampling_kwargs`` build one
                (``n``, ``max_tokens``, ``temperature``, ...). Log-probs of the sampled tokens are on by default.

        Returns:
            A flat list of :class:`Completion` (``n`` per prompt, in prompt order).
        """
        from vllm import SamplingParams

        self._require_awake("generate")
        decode_here = False
        if sampling is None:
            sampling_kwargs.setdefault("logprobs", 0)
            decode_here = "detokenize" not in sampling_kwargs and not sampling_kwargs.get("stop")
            sampling = SamplingParams(**fast_output_kwargs(sampling_kwargs))
        elif sampling_kwargs:
            raise TypeError("pass either a SamplingParams or keyword arguments, not both")
        inputs = []
        for p in prompts:
            if isinstance(p, str):
                inputs.append(p)
            else:
                inputs.append({"prompt_token_ids": [int(t) for t in p]})
        outputs = self.llm.generate(inputs, sampling, use_tqdm=use_tqdm)
        result = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                lps = None if c.logprobs is None else _sampled_logprobs(c.logprobs, c.token_ids)
                result.append(Completion(i, list(out.prompt_token_ids), list(c.token_ids), lps, c.text,
                                         c.finish_reason))
        if decode_here and result:
            texts = self.tokenizer.batch_decode([c.token_ids for c in result], skip_special_tokens=True)
            for c, text in zip(result, texts):
                c.text = text.rstrip("\ufffd")  # as vLLM's incremental detokenizer: no incomplete UTF-8 tail
        return result

    def score(self, sequences: Iterable[list[int]]) -> list[list[float]]:
        """Log-prob of every token of each sequence given its prefix (the first token has none).

        Teacher-forced, so it compares two engines' weights without the sampling noise of greedy decoding.
        """
        from vllm import SamplingParams

        self._require_awake("score")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": list(map(int, s))} for s in sequences], params,
                                 use_tqdm=False)
        return [[step[tok].logprob for step, tok in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
                for o in outs]

    # ------------------------------------------------------------------ sleep
    def sleep(self, level: int = 2) -> CycleReport:
        """Put the engine to sleep. Level 2 discards weights and KV cache (GPU memory returned); level 1
        offloads the weights to host memory. On CPU the scheduler pauses and no memory is released."""
        if isinstance(level, bool) or not isinstance(level, numbers.Integral) or level not in LEVELS:
            raise ValueError(f"unknown sleep level {level!r}; vLLM supports levels {LEVELS}")
        level = int(level)
        if self._level is not None:
            raise EngineStateError(f"the engine is already {self.state}; wake it before sleeping again")
        report = CycleReport("sleep", level)
        report.memory_kind, report.memory_gib["before"] = _memory_gib()
        with _timed(report, "sleep"), _keeping_cache(report, self.keep_trainer_cache):
            self.llm.sleep(level=level)
        self._level = level
        report.memory_gib["asleep"] = _memory_gib()[1]
        if report.memory_kind == "cuda_free" and self._wake_need_gib is None:
            # what waking will map back, until a wake measures it: the memory this sleep freed (more, if
            # vLLM's empty_cache also released cached trainer blocks: then the first wake releases too)
            self._wake_need_gib = max(0.0, report.memory_gib["asleep"] - report.memory_gib["before"])
        return report

    # ------------------------------------------------------------------- wake
    def wake_up(self, weights: Any = None, *, reload_checkpoint: bool = False, method: str | None = None,
                strict: bool = True) -> CycleReport:
        """Wake in the memory-safe order: weights buffers → load → KV cache → reset the prefix cache.

        Args:
            weights: the new weights: an iterable or mapping of ``(name, tensor)`` in checkpoint names
                (the RL case), or a checkpoint directory. Required after a level-2 sleep.
            reload_checkpoint: *optional*, reload the engine's original checkpoint (explicit opt-in: in RL
                this throws the trained weights away).
            method / strict: see :meth:`load_weights`.

        Returns:
            A :class:`CycleReport` with ``wake_weights``, ``load``, ``wake_kv_cache`` and ``reset`` seconds.
        """
        if self._level is None:
            raise EngineStateError("the engine is already awake; use load_weights(...) to update its weights")
        if weights is not None and reload_checkpoint:
            raise ValueError("pass weights or reload_checkpoint=True, not both")
        if reload_checkpoint:
            weights = self.model_path
        if self._level == 2 and weights is None:
            raise EngineStateError(
                "waking from level 2 needs new weights: level 2 discarded them, and vLLM would generate from "
                "freed memory. Pass weights=... (the trainer's), or reload_checkpoint=True to reload the "
                f"original checkpoint {self.model_path}")
        # validate before waking: names, shapes, dtypes, values, the method
        prepared = self._prepare(weights, strict, method) if weights is not None else None
        report = CycleReport("wake", self._level)
        report.memory_kind, report.memory_gib["asleep"] = _memory_gib()
        free_before_map = None
        with _timed(report, "wake_weights"):
            if report.memory_kind == "cuda_free":
                report.cache_released = release_cached_memory(self._wake_need_gib)
                free_before_map = torch.cuda.mem_get_info()[0] / 2**30
            with _keeping_cache(report, self.keep_trainer_cache and not report.cache_released):
                self.llm.wake_up(tags=["weights"])
        load_error = None
        if prepared is not None:
            try:
                with _timed(report, "load"):
                    self._load(prepared)
            except BaseException as err:
                load_error = err
        try:
            # Whatever happened to the load, finish the wake so the engine is in a known state.
            with _timed(report, "wake_kv_cache"), _keeping_cache(report, self.keep_trainer_cache):
                awake = self.llm.wake_up(tags=["kv_cache"])
            self._level = None
            if awake is False:
                raise EngineStateError("vLLM reports it is not fully awake after waking weights and KV cache")
            with _timed(report, "reset"):
                self._reset_prefix_cache()
        except Exception as wake_error:
            if load_error is None:
                raise
            # the load's error is the one to see; the failed wake is attached to it
            add_note(load_error, f"finishing the wake after the failed load also failed: "
                                 f"{type(wake_error).__name__}: {wake_error} (the engine is {self.state})")
        if load_error is not None:
            raise load_error
        report.memory_gib["awake"] = _memory_gib()[1]
        if free_before_map is not None:  # what this wake took: the next wake's need
            report.memory_gib["before_map"] = free_before_map
            self._wake_need_gib = max(0.0, free_before_map - report.memory_gib["awake"])
        return report

    def load_weights(self, weights: Any, *, method: str | None = None, strict: bool = True) -> CycleReport:
        """Replace the weights of an awake engine, then reset its prefix cache.

        Args:
            weights: as in :meth:`wake_up`.
            method: *optional*, ``reload`` / ``load_weights`` / ``direct`` / ``auto`` (the engine's default).
            strict: *optional*, every tensor of the model must be given (a full sync). ``False`` allows
                updating a subset (``auto`` then takes ``load_weights`` on CUDA; on CPU ``reload``, which
                needs every part of a fused parameter it touches: q/k/v together, gate/up together).
        """
        if self._level is not None:
            raise EngineStateError(f"the engine is {self.state}; use wake_up(weights=...) instead")
        report = self.push(weights, method=method, strict=strict)
        report.kind = "load"
        return report

    def reset_prefix_cache(self) -> None:
        """Drop cached prefixes (computed with the previous weights)."""
        self._require_awake("reset the prefix cache")
        self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
        ok = self.llm.reset_prefix_cache()
        if ok is False:  # newer vLLM: False while blocks are still held by running requests
            raise EngineStateError("vLLM refused to reset the prefix cache (requests still hold blocks)")

    # ---------------------------------------------------------------- loading
    def _prepare(self, weights: Any, strict: bool, method: str | None = None) -> "_Prepared":
        """Validate what can be validated before the engine is touched: the method, and for tensors held in
        memory (a mapping or list) their names, shapes, dtypes and values; a stream that knows its spec
        (:class:`~rollout_sleep.sync.WeightStream`) is checked by name here and by value as it passes, any
        other iterable as it passes (and must not be empty)."""
        if method is not None and method not in METHODS or self.load_method not in METHODS:
            bad = method if method is not None and method not in METHODS else self.load_method
            raise ValueError(f"unknown load method {bad!r}; use {', '.join(METHODS)}")
        if isinstance(weights, (str, os.PathLike)):
            path = check_checkpoint_dir(weights, self.spec, optional=self._optional())
            if self.tied:
                self._check_tied_dir(path)
            return _Prepared("path", path, strict, None)
        resolved = self._resolve_method(method, strict)
        dtype = self.dtype if strict else None
        if isinstance(weights, Mapping):
            weights = list(weights.items())
        if isinstance(weights, (list, tuple)):
            offered = {}
            for item in weights:
                problem = _pair_problem(item)
                if problem:
                    raise WeightMismatchError([problem])
                name, tensor = item
                if name in offered:
                    raise WeightMismatchError([f"weight {name!r} given twice in one load"])
                offered[name] = (tuple(tensor.shape), tensor.dtype)
            check_weights(offered, self.spec, optional=self._optional(), strict=strict, dtype=dtype)
            bad = _non_finite(weights) if self.check_finite else []
            if bad:
                raise WeightMismatchError([_non_finite_problem(n) for n in bad])
            given = dict(weights)
            if self.tied and all(n in given for n in _TIED) and not _same(given[_TIED[0]], given[_TIED[1]]):
                raise WeightMismatchError([_untied_problem()])
            self._check_whole_groups([n for n, _ in weights], strict, resolved, loaded=None)
            return _Prepared("checked", weights, strict, resolved)
        if hasattr(weights, "spec") and callable(weights.spec):  # a stream that knows its contents
            check_weights(weights.spec(), self.spec, optional=self._optional(), strict=strict, dtype=dtype)
            self._check_whole_groups(list(weights.spec()), strict, resolved, loaded=None)
            return _Prepared("spec", weights, strict, resolved)
        if isinstance(weights, Iterable):
            it = iter(weights)
            try:
                first = next(it)
            except StopIteration:
                raise WeightMismatchError(["the weight stream is empty: nothing to load (a generator already "
                                           "consumed by an earlier load? build a new one for each load)"]) from None
            problem = _pair_problem(first)
            if problem:
                raise WeightMismatchError([problem])
            name, tensor = first  # a wrong name, shape or dtype shows at once: refused before anything is touched
            check_weights({name: (tuple(tensor.shape), tensor.dtype)}, self.spec, optional=self._optional(),
                          strict=False, dtype=dtype)
            return _Prepared("stream", itertools.chain([first], it), strict, resolved)
        raise TypeError(f"weights must be a checkpoint path, a mapping or an iterable of (name, tensor); "
                        f"got {type(weights).__name__}")

    @staticmethod
    def _check_tied_dir(path: Path) -> None:
        """A checkpoint with its own ``lm_head.weight`` for a tied engine: it must equal the embedding."""
        from safetensors import safe_open

        found = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                found.update({n: fh.get_tensor(n) for n in _TIED if n in fh.keys()})
        if len(found) == 2 and not _same(*(found[n] for n in _TIED)):
            raise WeightMismatchError([_untied_problem()])

    def _optional(self) -> set[str]:
        return {"lm_head.weight"} if self.tied else set()

    def _load(self, prepared: "_Prepared", method: str | None = None) -> None:
        """Load prepared weights. A stream is fed to vLLM through a :class:`_Feed`, which ends the stream
        early (never raising into vLLM, so its layerwise reload finishes and the next load starts clean)
        when the source breaks or a tensor is wrong; the error is raised here afterwards, with the engine
        marked incomplete."""
        self._check_loadable()  # before anything is written
        self._weights_complete = False
        self._incomplete_reason = "a load was interrupted"
        if prepared.kind == "path":
            self._targets = None
            self._load_path(prepared.weights)
            self._weights_complete = True
            return
        feed = _Feed(prepared.weights, check_names=prepared.kind == "stream",
                     check_values=prepared.kind != "checked" and self.check_finite,
                     spec=self.spec, optional=self._optional(), strict=prepared.strict,
                     dtype=self.dtype if prepared.strict else None, tie_head=self.tied and not self.sleep_mode,
                     check_tie=self.tied and prepared.kind != "checked")
        self._push(feed, prepared.method or self._resolve_method(method, prepared.strict))
        error = feed.error_after_load(self.spec, self._optional())
        if error is None and prepared.kind == "stream":
            try:
                self._check_whole_groups(feed.seen, prepared.strict, prepared.method or "", loaded=feed.count)
            except WeightMismatchError as err:
                error = err
        if error is not None:
            problems = getattr(error, "problems", None)
            self._incomplete_reason = (problems[0] + (f"; and {len(problems) - 1} more" if len(problems) > 1 else "")
                                       if problems else str(error).split(". ")[0] or
                                       f"the weight stream raised {type(error).__name__}")[:300]
            raise error
        self._weights_complete = True

    def _check_whole_groups(self, names: Iterable[str], strict: bool, method: str, loaded: int | None) -> None:
        """A subset pushed through vLLM's layerwise reload must hold every shard of each fused parameter it
        touches (q/k/v, gate/up): given only v_proj, the reload rebuilt qkv_proj with q and k wrong, silently."""
        if strict or method != "reload":
            return
        self._inspect()
        given, problems = set(names), []
        for name in sorted(given):
            module, _, leaf = name.rpartition(".")
            parent, _, sub = module.rpartition(".")
            for fused, shards in self._packed.items():
                if sub in shards:
                    missing = [f"{parent}.{s}.{leaf}" for s in shards if f"{parent}.{s}.{leaf}" not in given]
                    if missing and name == min(n for n in (f"{parent}.{s}.{leaf}" for s in shards) if n in given):
                        problems.append(f"{name!r} is part of vLLM's fused {parent}.{fused}, but {missing} were not "
                                        "given: vLLM reloads the fused parameter whole (the rest would be wrong). "
                                        "Give all its parts")
        if problems:
            raise WeightMismatchError(problems, loaded=loaded)

    def _resolve_method(self, method: str | None, strict: bool) -> str:
        method = method or self.load_method
        if method not in METHODS:
            raise ValueError(f"unknown load method {method!r}; use {', '.join(METHODS)}")
        if method == "auto":
            if self.on_cuda and self._direct_supported():
                return "direct"
            # on CPU only vLLM's layerwise reload writes the repacked linears (a subset: whole fused groups)
            return "reload" if strict or not self.on_cuda else "load_weights"  # _direct_supported logged why not direct
        if method in ("direct", "load_weights") and not self.on_cuda:
            raise ValueError(f"load method {method!r} needs CUDA: vLLM's CPU kernels repack linear weights, "
                             "only 'reload' writes them correctly there")
        if method == "direct" and not self._direct_supported():
            raise ValueError(f"load method 'direct' does not apply to this model ({self._check_direct()}); "
                             "use 'reload'")
        return method

    def _push(self, items: Iterable[tuple[str, torch.Tensor]], method: str) -> None:
        if self.tied:
            self._inspect()
            if not self._has_head:  # e.g. Gemma: vLLM computes logits with the embedding, its loader has no head
                items = ((n, t) for n, t in items if n != "lm_head.weight")
        if method == "reload":
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items),
                                                             "is_checkpoint_format": True})
        elif method == "load_weights":
            self.llm.apply_model(lambda model: model.load_weights(iter(items)))
        else:
            targets = self._direct_targets()
            with torch.no_grad():
                for name, tensor in items:
                    dst = targets.get(name)
                    if dst is not None:  # None: a tied head, held by the embedding
                        dst.copy_(tensor, non_blocking=True)
        if method != "direct":
            self._targets = None  # vLLM's reload may re-create parameters: rebuild the views next time

    def _load_path(self, path: Path) -> None:
        if self.tied and not self.sleep_mode:
            # vLLM's CPU path reload of a tied model keeps a stale packed LM head: stream the files instead,
            # with the head given explicitly.
            from safetensors import safe_open

            def stream() -> Iterator[tuple[str, torch.Tensor]]:
                for f in sorted(path.glob("*.safetensors")):
                    with safe_open(str(f), "pt") as fh:
                        for name in fh.keys():
                            t = fh.get_tensor(name)
                            yield name, t
                            if name == "model.embed_tokens.weight":
                                yield "lm_head.weight", t

            self._push(stream(), "reload")
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path),
                                                             "is_checkpoint_format": True})

    # ------------------------------------------------- the engine's own view
    def _inspect(self) -> None:
        if self._engine_params is None:
            self._engine_params, self._packed, self._has_head = self.llm.apply_model(layout.describe)[0]

    def _placements(self):
        self._inspect()
        return layout.placements(self.spec, self._packed, {n: s for n, (s, _) in self._engine_params.items()},
                                 self.tied)

    def _direct_targets(self) -> dict[str, torch.Tensor]:
        """Views into vLLM's parameters, one per checkpoint tensor (built once; sleep/wake keeps addresses)."""
        if self._targets is None:
            plan = {n: w for n, w in self._placements().items() if n in self.spec}  # a tied head: the embedding's
            self._targets = self.llm.apply_model(lambda model: layout.views(model, plan))[0]
        return self._targets

    def _direct_supported(self) -> bool:
        if self._direct_ok is None:
            why = self._check_direct()
            self._direct_ok = why is None
            if why is None:
                logger.info("load route: 'direct' maps every checkpoint tensor of %s exactly; 'auto' copies into "
                          "vLLM's parameters", self.model_path)
            else:
                logger.info("load route: 'direct' does not apply to %s (%s); 'auto' loads through vLLM's loader "
                          "('reload' / 'load_weights')", self.model_path, why)
        return self._direct_ok

    def _check_loadable(self) -> None:
        """Refuse a weight load that no route makes right on this platform."""
        if self.on_cuda:
            return
        if "_cpu_experts" not in self.__dict__:  # the model's layout does not change: look once
            self._cpu_experts = [n for n, w in self._placements().items() if w.expert is not None]
        experts = self._cpu_experts
        if experts:
            raise ValueError(
                "loading weights into a running mixture-of-experts model is not supported on vLLM CPU: its MoE "
                "kernel prepacks the stacked experts when the engine starts, and reload_weights leaves them "
                f"unpacked (the engine would silently compute garbage; e.g. {experts[0]!r}). Start a fresh engine "
                "from a saved checkpoint instead, or run on a GPU")

    def _check_direct(self) -> str | None:
        """Why the ``direct`` route cannot map this model's weights exactly (``None``: it can)."""
        cfg = self.llm.llm_engine.vllm_config
        if cfg.parallel_config.tensor_parallel_size != 1:
            return "tensor parallel > 1"
        if cfg.model_config.quantization is not None:
            return f"quantized weights ({cfg.model_config.quantization})"
        plan = self._placements()
        engine = {n: s for n, (s, _) in self._engine_params.items()}
        unplaced = sorted(set(self.spec) - self._optional() - set(plan))
        if unplaced:
            return f"{len(unplaced)} checkpoint tensor(s) have no known place in vLLM's layout, e.g. {unplaced[0]!r}"
        experts = [n for n, w in plan.items() if w.expert is not None]
        if experts:  # e.g. FlashInfer's MoE kernels reorder w1/w3 or pad after loading: only vLLM's loader knows
            return (f"{len(experts)} stacked MoE expert tensor(s) (vLLM's fused-MoE backends may re-layout them "
                    "after loading)")
        bad = layout.fits(plan, self.spec, engine)
        if bad:
            return f"{len(bad)} tensor(s) are stored in another layout (e.g. repacked), e.g. {bad[0]!r}"
        dtypes = {self._engine_params[w.param][1] for w in plan.values()}
        if any(not dt.is_floating_point for dt in dtypes):
            return "vLLM holds some weights in a non-float (packed) dtype"
        return None

    def run_on_model(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """Run ``fn(model)`` on vLLM's model in this process (tensor parallel rank 0) and return its result."""
        return self.llm.apply_model(fn)[0]

    def close(self) -> None:
        """Shut the engine down (vLLM does not give GPU memory back in-process; see the README)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        del llm
