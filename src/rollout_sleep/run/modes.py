"""Which engine modes run together: the one table of combinations the recipe refuses (:data:`RULES`), each
with the keys it involves, why, and the fix. :func:`~rollout_sleep.run.config.load_config` applies it, so a
refused combination stops before anything is written or started.

The mode keys are marked in the schema (:func:`~rollout_sleep.run.schema.mode_keys`); a combination of
their values, the device (``cpu`` / ``cuda``) and the model (a size, a checkpoint, or a folder with a config
and no weights) either runs or is refused here (``tests/run/test_mode_combinations.py`` enumerates them all).

>>> from rollout_sleep.run.schema import RecipeConfig
>>> cfg = RecipeConfig()
>>> cfg.model.share_weights = True
>>> print(refusals(cfg, "cpu")[0])  # doctest: +ELLIPSIS
model.share_weights=true on CPU: vLLM's CPU build repacks its linear weights: the trainer cannot view them. Fix: ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Rule:
    """A refused combination: ``keys`` (dotted config keys; ``device``: the machine), the predicate over
    ``(config, device)``, ``why`` it cannot run, and the ``fix``."""

    keys: tuple[str, ...]
    refused: Callable[[Any, str], bool]
    why: str
    fix: str

    def message(self, cfg: Any, device: str) -> str:
        named = " with ".join(f"{k}={_show(value_of(cfg, k))}" for k in self.keys if k != "device")
        on = f" on {device.upper()}" if "device" in self.keys else ""
        return f"{named}{on}: {self.why}. Fix: {self.fix}"


def value_of(cfg: Any, key: str) -> Any:
    """The value of a dotted ``key`` in ``cfg``."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _show(value: Any) -> str:
    """A value as a key=value override writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def weightless(path: str) -> bool:
    """``model.path`` is a folder holding a config but no weights (``*.safetensors``)."""
    folder = Path(path).expanduser()
    return folder.is_dir() and not any(folder.glob("*.safetensors"))


# accelerate's distributed types that replace a model's parameters with buffers of their own, even in one process:
# a trainer on views of vLLM's weights (model.share_weights) cannot run under them
REPLACES_PARAMETERS = {"FSDP": "FSDP shards them into DTensors",
                       "DEEPSPEED": "DeepSpeed ZeRO flattens them into buffers of its own",
                       "MEGATRON_LM": "Megatron-LM shards them"}


def _lora(c) -> bool:
    return bool(c.model.lora.rank)


def _shared(c) -> bool:
    """``model.share_weights=true``: one copy asked for (``null`` falls back to two copies where it cannot be)."""
    return c.model.share_weights is True


RULES: tuple[Rule, ...] = (
    Rule(("model.lora.rank", "engine.tensor_parallel_size"), lambda c, d: _lora(c) and c.engine.tensor_parallel_size > 1,
         "each rank would hold a cut of the adapter; its sync and verify are tensor-parallel size 1 only",
         "engine.tensor_parallel_size=1 with model.lora"),
    Rule(("model.lora.rank", "train.kl_coef"), lambda c, d: _lora(c) and c.train.kl_coef > 0,
         "the reference would be the base with the adapter off, which is not built yet",
         "train.kl_coef=0 with model.lora (or model.lora.rank=0)"),
    Rule(("model.share_weights", "device"), lambda c, d: _shared(c) and d != "cuda",
         "vLLM's CPU build repacks its linear weights: the trainer cannot view them",
         "model.share_weights=null (two copies on CPU), or run on a CUDA GPU"),
    Rule(("model.share_weights", "model.lora.rank"), lambda c, d: _shared(c) and _lora(c),
         "one copy is for full-parameter training; a LoRA run already computes with a view of the engine's base",
         "model.share_weights=null with model.lora"),
    Rule(("model.share_weights", "engine.tensor_parallel_size"),
         lambda c, d: _shared(c) and c.engine.tensor_parallel_size > 1,
         "each tensor-parallel rank holds a shard of the weights, which the trainer's whole tensors cannot view",
         "model.share_weights=null, or engine.tensor_parallel_size=1"),
    Rule(("train.stochastic_rounding", "model.dtype"),
         lambda c, d: c.train.stochastic_rounding is True and c.model.dtype != "bfloat16",
         "stochastic rounding rounds each update into bfloat16 weights (torchao's bf16_stochastic_round): float32 "
         "weights keep the update as they are, and float16 ones it does not round",
         "model.dtype=bfloat16, or train.stochastic_rounding=null (on only where bf16 weights are stepped in place "
         "with no float32 master) or false"),
    Rule(("engine.load_method", "device"), lambda c, d: c.engine.load_method in ("direct", "load_weights") and d != "cuda",
         "vLLM's CPU kernels repack linear weights: only its layerwise reload writes them correctly there",
         "engine.load_method=auto or reload on CPU"),
    Rule(("engine.load_method", "engine.tensor_parallel_size"),
         lambda c, d: c.engine.load_method == "direct" and c.engine.tensor_parallel_size > 1,
         "the direct route copies whole tensors into one engine's parameters; a tensor-parallel rank holds shards",
         "engine.load_method=auto, reload or load_weights"),
    Rule(("model.path", "model.lora.rank", "model.share_weights", "engine.tensor_parallel_size", "device"),
         lambda c, d: weightless(c.model.path)
         and not ((_lora(c) or _shared(c)) and d == "cuda" and c.engine.tensor_parallel_size == 1),
         "the folder holds no weights (*.safetensors): only a run whose trainer views the engine's weights (LoRA, or "
         "model.share_weights=true) on CUDA with one in-process engine per rank starts from a config alone (vLLM "
         "draws random weights, load_format=dummy)",
         "give a checkpoint folder with its weights, or a size (model.path=tiny, qwen3-0.6b, ...) to build one"),
)


def refusals(cfg: Any, device: str) -> list[str]:
    """The messages of every rule ``cfg`` breaks on ``device`` (``"cpu"`` or ``"cuda"``)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return [rule.message(cfg, device) for rule in RULES if rule.refused(cfg, device)]


def detect_device() -> str:
    """``"cuda"`` where PyTorch sees a CUDA GPU (the recipe then runs its engines there), else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
