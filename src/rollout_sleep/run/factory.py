"""The engine a recipe config asks for, built in one place: :func:`build_engine` returns an
:class:`~rollout_sleep.engine.engine.Engine`, or an :class:`~rollout_sleep.pool.pool.EnginePool` of
``engine.processes`` engines, each given the same keywords (:func:`engine_kwargs`: dtype, quantization, the load
route, LoRA, dummy weights, the trainer's cache...). The config was checked by
:func:`~rollout_sleep.run.config.load_config` (:mod:`rollout_sleep.run.modes`): every combination that reaches
here runs.

Example:
    >>> cfg = load_config("configs/tiny-cpu.yaml", ["engine.load_method=reload"])     # doctest: +SKIP
    >>> engine = build_engine(cfg, "runs/tiny-cpu/model", rank=0)                  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from .modes import detect_device, weightless


def engine_seed(cfg: Any, rank: int) -> int:
    """The sampling seed of a rank's first engine: ranks sample differently with an engine each, alike with
    one tensor-parallel engine (vLLM needs it); a pool's engine ``j`` takes this seed + ``j``."""
    if cfg.engine.tensor_parallel_size > 1:
        return cfg.train.seed
    return cfg.train.seed + rank * cfg.engine.processes


def kv_cache_bytes_per_engine(cfg: Any, model_path: str, kv_cache_bytes: int | None) -> int | None:
    """Each engine's KV cache given a rank's (``None``: the engine's own sizing): with ``k`` engines each holds a
    ``k``-th of the rank's sequences, and at least one sequence of ``engine.max_model_len`` (+25%)."""
    k = cfg.engine.processes
    if kv_cache_bytes is None or k == 1:
        return kv_cache_bytes
    from rollout_sleep.engine.memory import kv_cache_bytes_for

    longest = kv_cache_bytes_for(model_path, int((cfg.engine.max_model_len or 0) * 1.25), cfg.model.dtype)
    return max(-(-kv_cache_bytes // k), longest)


def engine_kwargs(cfg: Any, model_path: str, *, kv_cache_bytes: int | None = None,
                  device: str | None = None) -> dict[str, Any]:
    """The keywords every engine of a run is built with (an :class:`Engine`'s; a pool hands them to each of its
    engines). ``kv_cache_bytes``: the rank's KV cache (split among a pool's engines; default
    ``engine.kv_cache_bytes``)."""
    e, k = cfg.engine, cfg.engine.processes
    if kv_cache_bytes is None:
        kv_cache_bytes = e.kv_cache_bytes
    kwargs: dict[str, Any] = dict(
        dtype=cfg.model.dtype, max_model_len=e.max_model_len,
        kv_cache_bytes=kv_cache_bytes_per_engine(cfg, model_path, kv_cache_bytes), load_method=e.load_method,
        enforce_eager=e.enforce_eager, keep_trainer_cache=e.keep_trainer_cache, quantization=e.quantization,
        tensor_parallel_size=e.tensor_parallel_size)
    if (device or detect_device()) == "cuda":  # vLLM's share of the GPU, split among the rank's engines
        kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization / k
    if cfg.model.lora.rank:
        from rollout_sleep.lora.adapter import LoraSettings

        lo = cfg.model.lora
        kwargs.update(LoraSettings(lo.rank, lo.alpha, list(lo.targets)).engine_kwargs())
    if weightless(model_path):  # a config alone: vLLM draws the base (a LoRA run on CUDA views it)
        kwargs["load_format"] = "dummy"
    return kwargs


def build_engine(cfg: Any, model_path: str, *, rank: int = 0, kv_cache_bytes: int | None = None,
                 device: str | None = None, **llm_kwargs: Any) -> Any:
    """The engine ``cfg`` (a :class:`~rollout_sleep.run.schema.RecipeConfig`) asks for on this ``rank``: an
    :class:`~rollout_sleep.engine.engine.Engine`, or with ``engine.processes`` > 1 an
    :class:`~rollout_sleep.pool.pool.EnginePool` of that many engine processes on this rank's GPU. Both implement
    :class:`~rollout_sleep.engine.contract.RolloutEngine`. ``llm_kwargs`` go to ``vllm.LLM`` as they are."""
    kwargs = {**engine_kwargs(cfg, model_path, kv_cache_bytes=kv_cache_bytes, device=device), **llm_kwargs}
    seed, k = engine_seed(cfg, rank), cfg.engine.processes
    if k > 1:
        from rollout_sleep.pool.pool import EnginePool

        return EnginePool(model_path, engines=k, seed=seed, **kwargs)
    from rollout_sleep.engine.engine import Engine

    return Engine(model_path, seed=seed, **kwargs)
