"""One copy of the weights (``model.share_weights``): the trainer's parameters are views of the engine's own weight
tensors, the optimizer updates them in place, the engine releases only its KV cache while the trainer runs
(sleep level 0), and a sync moves nothing: it maps the KV cache back and resets the prefix cache.

Where it applies is decided in two steps, each logged with its reason: :func:`before_engine` (what the config and
the launch say: CUDA, one process, one engine, no LoRA, a model type whose vLLM layout is checked) and
:func:`after_engine` (what vLLM built: every checkpoint tensor has an exact view,
:meth:`~rollout_sleep.engine.loader.Loader.why_not_direct`). ``null`` takes
the copy path where it does not apply; ``true`` refuses to start instead.

:class:`SharedWeights` is the invariant checked at every sync, from addresses alone: every byte of vLLM's weights
that the checkpoint fills lies under exactly one trainer parameter, and no trainer parameter lies elsewhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from rollout_sleep.run.modes import REPLACES_PARAMETERS
from rollout_sleep.weights.layout import unchecked_problem
from rollout_sleep.weights.views import (coverage_problems, load_in_place, model_on_views, model_spans, partial_views,
                                         span, whole_views)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision:
    """Whether the trainer trains the engine's weight memory, and why (or why not)."""

    on: bool
    why: str

    def describe(self) -> str:
        return (f"one copy of the weights: the trainer trains vLLM's weight memory ({self.why})" if self.on else
                f"two copies of the weights (the trainer's and vLLM's, synced each step): {self.why}")


def before_engine(cfg: Any, device: str, processes: int, distributed_type: str = "NO",
                  model_type: str | None = None) -> Decision:
    """What the config, the launch and the model's type decide before vLLM starts (``device``: ``cpu`` /
    ``cuda``; ``distributed_type``: accelerate's, e.g. ``NO``, ``MULTI_GPU``, ``FSDP``, ``DEEPSPEED``;
    ``model_type``: the checkpoint's transformers type, ``None`` where it is not known before vLLM reads it)."""
    if cfg.model.share_weights is False:
        return Decision(False, "model.share_weights=false")
    why = []
    if model_type is not None and (unchecked := unchecked_problem(model_type)):
        why.append(unchecked)
    if cfg.model.lora.rank:
        why.append("model.lora trains an adapter (its frozen base is held once already where vLLM's layout allows)")
    if device != "cuda":
        why.append("vLLM's CPU build repacks its linear weights (the trainer cannot view them)")
    if cfg.engine.tensor_parallel_size > 1:
        why.append("each tensor-parallel rank holds a shard of the weights")
    if processes > 1:
        why.append(f"the trainer runs in {processes} processes (DDP keeps a copy per rank, FSDP and ZeRO-3 shard "
                   "the weights their own way)")
    elif distributed_type in REPLACES_PARAMETERS:
        why.append(f"accelerate runs the trainer with {distributed_type}, which replaces its parameters "
                   f"({REPLACES_PARAMETERS[distributed_type]})")
    if why:
        return Decision(False, "; ".join(why))
    return Decision(True, "CUDA, one process, one engine")


def after_engine(decision: Decision, engine: Any) -> Decision:
    """The decision once vLLM holds the weights: every checkpoint tensor must have an exact view, and the engine
    must release its KV cache alone (vLLM's sleep allocator)."""
    if not decision.on:
        return decision
    why = engine.loader.why_not_direct()
    if why is None and not engine.sleep_mode:
        why = "vLLM has no sleep allocator here (the KV cache cannot be released alone)"
    if why is not None:
        return Decision(False, f"the trainer cannot view vLLM's weights exactly: {why}")
    return decision


def trainer_on_engine(engine: Any, *, gradient_checkpointing: bool = False, init_seed: int | None = None) -> torch.nn.Module:
    """A trainable transformers model whose parameters are views of ``engine``'s weight tensors (nothing of the
    weights is allocated). ``init_seed``: draw the weights in place first (an engine started from a config alone,
    ``load_format="dummy"``, holds vLLM's placeholder values), as a random checkpoint of that seed would hold them
    (of the size :func:`~rollout_sleep.weights.checkpoints.make_config_dir` recorded in the config)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(engine.model_path)
    model = model_on_views(config, engine.loader.direct_targets(), engine.dtype, trainable=True)
    if init_seed is not None:
        from rollout_sleep.weights.checkpoints import fill_random_, size_init_std

        size = (getattr(config, "rollout_sleep", None) or {}).get("size")
        fill_random_(model, config, seed=init_seed, std=size_init_std(size, config))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    engine.pin_weights("the trainer's parameters are views of them (model.share_weights)")
    return model


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model``'s current weights (a KL reference where the weights exist only as the trainer's
    views of the engine: a reference needs its own copy)."""
    targets = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model_on_views(model.config, targets, next(iter(targets.values())).dtype)


class OneCopyError(AssertionError):
    """The trainer no longer holds the engine's weights once: the engine would not see (some of) its updates."""


class SharedWeights:
    """The one-copy invariant of ``engine`` and ``model`` (vLLM's addresses are read once: sleeping at level 0
    never moves its weights). :meth:`check` costs a walk over the trainer's parameters, no tensor read."""

    def __init__(self, engine: Any, model: torch.nn.Module):
        self.engine_spans = engine.run_on_model(lambda m: {n: span(p) for n, p in m.named_parameters()})
        self.filled = engine.loader.filled_bytes()
        self.check(model)

    def problems(self, model: torch.nn.Module) -> list[str]:
        return coverage_problems(self.engine_spans, model_spans(model), self.filled)

    def check(self, model: torch.nn.Module) -> None:
        """Raise :class:`OneCopyError` naming what breaks the invariant."""
        problems = self.problems(model)
        if problems:
            raise OneCopyError(f"the trainer no longer trains vLLM's weight memory once ({len(problems)} problem(s): "
                               + "; ".join(problems[:4]) + "). Something replaced a parameter's tensor (a .to(), a "
                               "wrapper that copies parameters, a load_state_dict with assign=True): keep the "
                               "parameters in place, or set model.share_weights=false")


def keep_views_in_checkpoints(accelerator: Any) -> None:
    """Make ``accelerator``'s ``save_state`` / ``load_state`` hold a model whose parameters are views (one copy of
    the weights, or a LoRA trainer's shared base): several of its parameters share one storage (q/k/v rows of a
    fused ``qkv_proj``), and accelerate's safetensors save keeps one name per storage (k_proj, v_proj and up_proj
    were never written), while safetensors' ``load_model`` refuses parameters that do not cover their storage.
    Saving, each view gets a host copy of its own (:func:`~rollout_sleep.weights.views.whole_views`); loading,
    the saved tensors are copied into the views where they are (the engine's memory). A model of plain
    parameters is saved and loaded by accelerate as before."""

    def before_save(models, weights, output_dir):
        for state in weights:
            whole_views(state)

    def before_load(models, input_dir):
        from pathlib import Path

        done = []
        for i, model in enumerate(models):
            if not partial_views(model):
                continue
            ending = f"_{i}" if i > 0 else ""
            path = Path(input_dir) / f"model{ending}.safetensors"
            if path.exists():
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                path = Path(input_dir) / f"pytorch_model{ending}.bin"
                state = torch.load(path, map_location="cpu", weights_only=True)
            load_in_place(model, state, str(path))
            done.append(i)
        # accelerate loads the models left in the list, by position (model.safetensors, model_1.safetensors, ...):
        # those loaded here leave it from the end; one before a model left to accelerate stands in with nothing
        for i in sorted(done, reverse=True):
            if i == len(models) - 1:
                models.pop()
            else:
                models[i] = _Loaded()

    accelerator.register_save_state_pre_hook(before_save)
    accelerator.register_load_state_pre_hook(before_load)


class _Loaded(torch.nn.Module):
    """A model already loaded in place: accelerate's load of its file changes nothing."""

    def state_dict(self, *args, **kwargs):
        return {}

    def load_state_dict(self, state_dict, strict=True, assign=False):
        return torch.nn.modules.module._IncompatibleKeys([], [])
