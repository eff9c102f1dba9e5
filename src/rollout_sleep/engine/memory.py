"""What the GPU has free and what a wake needs: memory figures, handing PyTorch's cache back before a
wake (only when vLLM would not fit beside it), keeping it across vLLM's own ``empty_cache`` calls, and the
size of a KV cache in bytes."""

from __future__ import annotations

import json
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch

from .phases import CycleReport

logger = logging.getLogger(__name__)


def with_expandable_segments(conf: str) -> str:
    """PyTorch allocator settings ``conf`` with ``expandable_segments:True`` (the other settings kept: PyTorch
    resets every option absent from the string it is given).

    >>> with_expandable_segments("max_split_size_mb:512,expandable_segments:False")
    'max_split_size_mb:512,expandable_segments:True'
    """
    kept = [part for part in conf.split(",") if part.strip() and not part.strip().startswith("expandable_segments")]
    return ",".join(kept + ["expandable_segments:True"])


def enable_expandable_segments() -> bool:
    """From now on PyTorch's CUDA allocator grows its segments in place (``train.expandable_segments``): call it
    once vLLM's engine is built and only where it sleeps at level 0, since vLLM's sleep pool cannot allocate
    with them (PyTorch issue 147851). Returns whether it was set (not on CPU)."""
    import os

    if not torch.cuda.is_available():
        return False
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None) \
        or getattr(torch.cuda.memory, "_set_allocator_settings", None)
    if setter is None:
        raise RuntimeError(f"train.expandable_segments: this PyTorch ({torch.__version__}) cannot change its "
                           "allocator's settings at run time; set train.expandable_segments=false")
    conf = next((os.environ[v] for v in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF") if os.environ.get(v)), "")
    setter(with_expandable_segments(conf))
    return True


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
def cache_kept():
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


def cached_free_bytes() -> int:
    """Bytes PyTorch's allocator holds but no tensor uses: the trainer's cache (vLLM's weights and KV cache
    are live tensors, so they count as allocated, asleep or not)."""
    return torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


@contextmanager
def keeping_cache(report: CycleReport, keep: bool):
    """``cache_kept`` when ``keep`` (on CUDA), and the truth in ``report.trainer_cache_kept``: whether the
    cached free memory PyTorch held before the block is still held after it (whatever path vLLM took;
    a tolerance of 5% or 64 MiB for blocks vLLM itself frees or reuses)."""
    if not (keep and report.memory_kind == "cuda_free"):
        yield
        return
    before = cached_free_bytes()
    with cache_kept():
        yield
    after = cached_free_bytes()
    kept = after >= before - max(64 << 20, 0.05 * before)
    report.trainer_cache_kept = kept if report.trainer_cache_kept is None else report.trainer_cache_kept and kept
    if not kept:
        logger.warning("keep_trainer_cache: PyTorch's cached free memory fell from %.2f to %.2f GiB during the "
                       "%s (this vLLM version empties the cache some other way)", before / 2**30, after / 2**30,
                       report.kind)


BLOCK = 16  # vLLM's KV cache block on CUDA (its attention backends for the dense models here), in tokens


def kv_cache_bytes_for(model_path: str | os.PathLike, tokens: int, dtype: torch.dtype | str = "auto",
                       block_size: int = BLOCK) -> int:
    """Bytes of a KV cache holding ``tokens`` tokens of the checkpoint's model (full attention, K and V per
    layer), rounded up to whole blocks of ``block_size`` tokens; ``dtype="auto"``: the checkpoint's."""
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


FLOOR_BLOCK = 128  # the largest block of the attention backends vLLM commonly takes (its CPU build's)


def step_kv_cache_bytes(model_path: str | os.PathLike, sequences: int, longest: int, max_tokens: int,
                        context: int = 0, margin: float = 0.0, dtype: torch.dtype | str = "auto",
                        shards: int = 1, block: int = BLOCK) -> int:
    """Bytes of a KV cache for one step's ``sequences`` on one engine (``engine.kv_cache: step``): each as long as
    the ``longest`` prompt plus ``max_tokens``, plus one ``block`` of tokens (vLLM's 16 on CUDA: each sequence's
    last block part-filled, and the one block vLLM keeps as its null block), at least one sequence of ``context``
    tokens and the null block in blocks of up to 128 tokens (vLLM refuses to start with less, counted in its
    attention backend's blocks), plus ``margin`` of it (room for an attention backend with larger blocks:
    :func:`step_kv_cache_shortfall` tells after the start); split over ``shards`` tensor-parallel ranks."""
    floor = max(block, FLOOR_BLOCK)
    tokens = max(sequences * (longest + max_tokens + block), -(-context // floor) * floor + floor)
    return kv_cache_bytes_for(model_path, int(tokens * (1 + margin)), dtype, block) // shards


def step_kv_cache_shortfall(llm: Any, sequences: int, longest: int, max_tokens: int) -> str | None:
    """After vLLM started with a step-sized KV cache: why one step's ``sequences`` (each up to ``longest`` +
    ``max_tokens`` tokens, plus vLLM's null block) do not fit in the blocks it made, or ``None`` (they fit, or
    this vLLM does not say). Too few blocks are not wrong, only slower: the sequences that do not fit wait."""
    cache = getattr(getattr(getattr(llm, "llm_engine", None), "vllm_config", None), "cache_config", None)
    size, blocks = getattr(cache, "block_size", None), getattr(cache, "num_gpu_blocks", None)
    if not size or not blocks:
        return None
    need = sequences * -(-(longest + max_tokens) // size) + 1
    if blocks >= need:
        return None
    margin = max(math.ceil(100 * (need * size / (sequences * (longest + max_tokens + BLOCK)) - 1)) / 100, 0.01)
    fix = (f"Set engine.kv_cache_margin={margin:g}" if margin <= 10 else
           f"Set engine.kv_cache_bytes to hold {need * size} tokens (engine.kv_cache_margin would need {margin:g}, "
           "over its limit of 10)")
    return (f"engine.kv_cache=step: vLLM made {blocks} blocks of {size} tokens, and one step needs up to {need} "
            f"({sequences} sequences of up to {longest + max_tokens} tokens, and the null block): the sequences that "
            f"do not fit wait for blocks, and generate is slower. {fix} (this attention backend's blocks are larger "
            f"than the {BLOCK} tokens the size assumed)")


def sleep_mode_available() -> bool:
    """Whether this machine's vLLM build has sleep mode, the allocator that gives memory back at sleep (CUDA:
    yes; the CPU build: no, and it refuses ``enable_sleep_mode``)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def memory_gib() -> tuple[str, float]:
    """(kind, GiB): free GPU memory (``cuda_free``), or this process's RSS on CPU (``cpu_rss``)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return "cuda_free", torch.cuda.mem_get_info()[0] / 2**30
    import psutil

    return "cpu_rss", psutil.Process().memory_info().rss / 2**30


class WakeBudget:
    """The GPU memory a wake maps back (weights and KV cache), from the engine's sleeps and wakes: a wake
    hands PyTorch's cached blocks back first only when free memory falls short of it
    (:func:`release_cached_memory`). Unknown (``None``) until the first sleep on CUDA."""

    def __init__(self) -> None:
        self.need_gib: float | None = None

    def after_sleep(self, report: CycleReport) -> None:
        if report.memory_kind == "cuda_free" and self.need_gib is None:
            # what waking will map back, until a wake measures it: the memory this sleep freed (more, if
            # vLLM's empty_cache also released cached trainer blocks: then the first wake releases too)
            self.need_gib = max(0.0, report.memory_gib["asleep"] - report.memory_gib["before"])

    def before_wake(self, report: CycleReport, always: bool = False) -> float | None:
        """Release PyTorch's cache if the wake needs the room, or ``always`` (``report.cache_released``); returns
        the free GiB before vLLM maps anything (``None`` off CUDA)."""
        if report.memory_kind != "cuda_free":
            return None
        report.cache_released = release_cached_memory(None if always else self.need_gib)
        return torch.cuda.mem_get_info()[0] / 2**30

    def after_wake(self, report: CycleReport, free_before_map: float | None) -> None:
        if free_before_map is not None:  # what this wake took: the next wake's need
            report.memory_gib["before_map"] = free_before_map
            self.need_gib = max(0.0, free_before_map - report.memory_gib["awake"])


class PhasePeaks:
    """Peak GPU memory per named phase (CUDA; inert elsewhere): device-wide, as ``base_free`` minus the least free
    memory a thread sees (sampled every ``period_s`` while started, and at each phase's edges), so vLLM's
    allocations outside PyTorch count; and PyTorch's allocator peak within the phase (``reset_peak_memory_stats``
    at its start; ``run_allocated_peak`` keeps the peak over the whole run for the caller)."""

    def __init__(self, base_free: int | None = None, period_s: float = 0.01):
        import threading

        self.active = torch.cuda.is_available()
        self.device = torch.cuda.current_device() if self.active else None  # the thread asks about this rank's GPU
        self.base_free = base_free if base_free is not None or not self.active else torch.cuda.mem_get_info()[0]
        self.period = period_s
        self.used: dict[str, int] = {}
        self.allocated: dict[str, int] = {}
        self.allocated_at_start: dict[str, int] = {}
        self.run_allocated_peak = 0
        self._phase: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True, name="rollout-sleep-phase-peaks")

    def start(self) -> "PhasePeaks":
        if self.active:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self.active:
            self.run_allocated_peak = max(self.run_allocated_peak, torch.cuda.max_memory_allocated())

    def _sample(self) -> None:
        phase = self._phase
        if phase is not None:
            used = self.base_free - torch.cuda.mem_get_info(self.device)[0]
            self.used[phase] = max(self.used.get(phase, used), used)

    def _poll(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    @contextmanager
    def phase(self, name: str):
        """Attribute the block's memory to ``name`` (its peaks are the maxima over every block of that name)."""
        if not self.active or self._stop.is_set():
            yield
            return
        torch.cuda.synchronize()
        self.run_allocated_peak = max(self.run_allocated_peak, torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        self.allocated_at_start[name] = torch.cuda.memory_allocated()
        self._phase = name
        self._sample()
        try:
            yield
        finally:
            torch.cuda.synchronize()
            self._sample()
            self._phase = None
            peak = torch.cuda.max_memory_allocated()
            self.allocated[name] = max(self.allocated.get(name, 0), peak)
            self.run_allocated_peak = max(self.run_allocated_peak, peak)


def release_kv_only(llm: Any, *, pause: Callable | None = None, reset: Callable | None = None) -> None:
    """Level 0 on CUDA: release ``llm``'s KV cache and nothing else (the weights stay where a trainer views them).
    vLLM 0.32 on does this itself (a pause, then a discard of its KV-cache memory; 0.34's extensible KV cache lies
    outside the sleep allocator, where an unmap of the tag would free nothing); 0.26 has no such call: the prefix
    cache is reset (``reset``), then each worker unmaps the tag. ``pause``: ``llm.sleep`` where a caller replaced
    it."""
    if hasattr(llm, "release_kv_cache_memory"):
        (pause or llm.sleep)(level=0)
        llm.release_kv_cache_memory()
    else:
        (reset or llm.reset_prefix_cache)()  # the cached blocks are about to be unmapped
        llm.collective_rpc(release_kv_cache)


def map_kv_only(llm: Any, *, wake: Callable | None = None) -> bool:
    """Undo :func:`release_kv_only`; whether vLLM is fully awake (its scheduler resumed). ``wake``: ``llm.wake_up``
    where a caller replaced it."""
    if hasattr(llm, "release_kv_cache_memory"):
        return (wake or llm.wake_up)(tags=["kv_cache"])
    llm.collective_rpc(map_kv_cache)
    return True


def release_kv_cache(worker: Any) -> int:
    """On a worker (vLLM 0.26, which has no call for it: :func:`release_kv_only`): unmap the KV cache's memory
    (vLLM's sleep allocator, tag ``kv_cache``) and nothing else; the weights stay mapped. vLLM's own ``sleep`` releases every allocation (level 1 copies the weights to
    host memory first), which would pull the memory from under a trainer that views the weights. Returns
    the bytes released."""
    from vllm.device_allocator.cumem import CuMemAllocator, unmap_and_release

    allocator = CuMemAllocator.get_instance()
    torch.cuda.synchronize()
    released = 0
    for data in allocator.pointer_to_data.values():
        if data.tag != "kv_cache" or getattr(data, "is_asleep", False):
            continue
        unmap_and_release(data.handle)
        if hasattr(data, "is_asleep"):
            data.is_asleep = True
        released += data.handle[1]
    return released


def map_kv_cache(worker: Any) -> None:
    """On a worker: map the KV cache's memory back (its contents are gone: the prefix cache is reset after)
    through the worker's own ``wake_up``, which also re-initializes what the model runner keeps in that memory
    (vLLM 0.26's V2 runner: its block-table layout tensors; without it the first generate hits an illegal memory
    access)."""
    if hasattr(worker, "wake_up"):
        worker.wake_up(tags=["kv_cache"])
        return
    from vllm.device_allocator.cumem import CuMemAllocator

    CuMemAllocator.get_instance().wake_up(tags=["kv_cache"])
