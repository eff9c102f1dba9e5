"""The engine a recipe config asks for, built in one place: :func:`build_engine` returns the
:class:`~rollout_sleep.engine.engine.Engine` with the keywords of :func:`engine_kwargs` (dtype, the load
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
    """The sampling seed of a rank's engine: ranks sample differently with an engine each, alike with one
    tensor-parallel engine (vLLM needs it)."""
    if cfg.engine.tensor_parallel_size > 1:
        return cfg.train.seed
    return cfg.train.seed + rank


def engine_kwargs(cfg: Any, model_path: str, *, kv_cache_bytes: int | None = None,
                  device: str | None = None) -> dict[str, Any]:
    """The keywords a run's :class:`~rollout_sleep.engine.engine.Engine` is built with. ``kv_cache_bytes``: the
    rank's KV cache (default ``engine.kv_cache_bytes``)."""
    e = cfg.engine
    kwargs: dict[str, Any] = dict(
        dtype=cfg.model.dtype, max_model_len=e.max_model_len,
        kv_cache_bytes=e.kv_cache_bytes if kv_cache_bytes is None else kv_cache_bytes, load_method=e.load_method,
        enforce_eager=e.enforce_eager, keep_trainer_cache=e.keep_trainer_cache,
        tensor_parallel_size=e.tensor_parallel_size)
    if (device or detect_device()) == "cuda":  # vLLM's share of the GPU
        kwargs["gpu_memory_utilization"] = e.gpu_memory_utilization
    if cfg.model.lora.rank:
        from rollout_sleep.lora.adapter import LoraSettings

        lo = cfg.model.lora
        kwargs.update(LoraSettings(lo.rank, lo.alpha, list(lo.targets)).engine_kwargs())
    if weightless(model_path):  # a config alone: vLLM draws the base (a LoRA run on CUDA views it)
        kwargs["load_format"] = "dummy"
    return kwargs


def build_engine(cfg: Any, model_path: str, *, rank: int = 0, kv_cache_bytes: int | None = None,
                 device: str | None = None, **llm_kwargs: Any) -> Any:
    """The :class:`~rollout_sleep.engine.engine.Engine` ``cfg`` (a :class:`~rollout_sleep.run.schema.RecipeConfig`)
    asks for on this ``rank``. ``llm_kwargs`` go to ``vllm.LLM`` as they are."""
    from rollout_sleep.engine.engine import Engine

    kwargs = {**engine_kwargs(cfg, model_path, kv_cache_bytes=kv_cache_bytes, device=device), **llm_kwargs}
    return Engine(model_path, seed=engine_seed(cfg, rank), **kwargs)
