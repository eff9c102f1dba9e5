"""Recipe configuration: dataclasses, YAML files, and ``section.key=value`` overrides.

Unknown keys fail loudly, naming the key and the keys that exist.

>>> cfg = load_config(None, ["train.steps=3", "engine.sleep_level=1"])
>>> cfg.train.steps, cfg.engine.sleep_level
(3, 1)
>>> load_config(None, ["train.stepz=3"])
Traceback (most recent call last):
...
rollout_sleep.config.ConfigError: unknown key 'train.stepz'; train has: ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


KV_CACHE_SIZING = ("step", "gpu_share")


class ConfigError(ValueError):
    """A malformed config: unknown key, wrong type, unreadable file."""


@dataclass
class ModelConfig:
    path: str = "tiny"  # a local HF checkpoint, or a size from checkpoints.SHAPES (built with random weights)
    seed: int = 0  # seed of the random weights when ``path`` is a size
    dtype: str = "float32"  # trainer and engine dtype: float32 / bfloat16
    tie_word_embeddings: bool | None = None


@dataclass
class EngineConfig:
    gpu_memory_utilization: float = 0.35
    # KV cache size on GPU: "step" = what one step's sequences need (+25%), so vLLM maps back only that at
    # every wake; "gpu_share" = vLLM's own sizing from gpu_memory_utilization; kv_cache_bytes wins over both
    kv_cache: str = "step"
    kv_cache_bytes: int | None = None
    max_model_len: int | None = 1024
    sleep_level: int = 2
    load_method: str = "auto"
    verify_every: int = 1  # run verify after every N-th sync (0: never)
    enforce_eager: bool = False
    keep_trainer_cache: bool = True  # sleep without emptying PyTorch's cache (the trainer's; see Engine)
    # 1: an engine per rank (data-parallel rollouts); = the number of processes: one tensor-parallel engine
    # across all ranks (every rank sees the same completions and trains on its share of the groups)
    tensor_parallel_size: int = 1


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # or a local path (folder, .jsonl, .json, .parquet, .csv)
    prompt_column: str = "prompt"
    num_prompts: int | None = None


@dataclass
class TrainConfig:
    steps: int = 12
    prompts_per_step: int = 8
    generations: int = 8  # completions per prompt (the GRPO group)
    max_tokens: int = 8
    temperature: float = 1.0
    lr: float = 3e-3
    weight_decay: float = 0.0
    clip_eps: float = 0.2
    kl_coef: float = 0.0
    kl_bias_correction: bool = True  # TRL's use_bias_correction_kl (its default): the KL times the policy ratio
    # how token losses are summed, TRL's loss_type names and formulas: dapo (TRL's default) / grpo / dr_grpo / bnpo
    loss: str = "dapo"
    micro_batch: int = 64
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no / bf16 / fp16 (accelerate)
    gradient_checkpointing: bool = False
    # reweight the loss by the trainer/vLLM probability ratio (TRL's vllm_importance_sampling_* and defaults)
    sampling_correction: str = "sequence_mask"  # none / token_truncate / token_mask / sequence_truncate / ..._mask
    sampling_clip_min: float | None = None
    sampling_clip_max: float | None = 3.0
    seed: int = 0


@dataclass
class WandbConfig:
    mode: str = "offline"  # offline / online / disabled
    project: str = "rollout-sleep"
    run_name: str | None = None


@dataclass
class RecipeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    rewards: list[str] = field(default_factory=lambda: ["digits_format", "arithmetic_exact"])
    output_dir: str = "runs/grpo"
    save_every: int = 0  # save accelerate state every N steps (0: only at the end)
    save_final: bool = True  # save the state after the last step (benchmarks turn it off)
    resume: bool = True  # continue from the newest saved state in output_dir

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, current: Any, key: str) -> Any:
    if isinstance(value, str) and not isinstance(current, str):
        value = yaml.safe_load(value)  # "3" -> 3, "true" -> True, "[a, b]" -> list, "null" -> None
    if current is not None and value is not None:
        if isinstance(current, bool) and not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        if isinstance(current, (int, float)) and not isinstance(current, bool):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{key} must be a number, got {value!r}")
            value = type(current)(value) if isinstance(current, float) else value
        if isinstance(current, list) and not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
    return value


def _set(obj: Any, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"unknown key {dotted!r}; {where} has: {', '.join(names)}")
        if i == len(parts) - 1:
            current = getattr(obj, part)
            if dataclasses.is_dataclass(current):
                if not isinstance(value, dict):
                    raise ConfigError(f"{dotted} is a section; give it a mapping, got {value!r}")
                for k, v in value.items():
                    _set(current, k, v)
            else:
                setattr(obj, part, _coerce(value, current, dotted))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{'.'.join(parts[:i + 1])} is not a section (in {dotted!r})")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RecipeConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides, in that order."""
    cfg = RecipeConfig()
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config {str(path)!r}: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"config {str(path)!r} must be a mapping of sections, got {type(data).__name__}")
        for key, value in data.items():
            _set(cfg, key, value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value)
    if cfg.engine.kv_cache not in KV_CACHE_SIZING:
        raise ConfigError(f"engine.kv_cache must be one of {', '.join(KV_CACHE_SIZING)}, got {cfg.engine.kv_cache!r}")
    if cfg.engine.sleep_level not in (1, 2):
        raise ConfigError(f"engine.sleep_level must be 1 or 2, got {cfg.engine.sleep_level}")
    from .grpo import SAMPLING_CORRECTIONS

    if cfg.train.sampling_correction not in SAMPLING_CORRECTIONS:
        raise ConfigError(f"train.sampling_correction must be one of {', '.join(SAMPLING_CORRECTIONS)}, "
                          f"got {cfg.train.sampling_correction!r}")
    from .grpo import LOSS_TYPES

    if cfg.train.loss not in LOSS_TYPES:
        raise ConfigError(f"train.loss must be one of {', '.join(LOSS_TYPES)} (TRL's loss_type), "
                          f"got {cfg.train.loss!r}")
    if not cfg.train.temperature > 0:
        raise ConfigError(f"train.temperature must be > 0 (the trainer scores tokens at it), "
                          f"got {cfg.train.temperature}")
    if cfg.wandb.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"wandb.mode must be offline, online or disabled, got {cfg.wandb.mode!r}")
    return cfg
