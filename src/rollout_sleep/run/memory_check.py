"""A recipe run's memory, around :mod:`rollout_sleep.run.memory_plan` (which is arithmetic only): the plan's
inputs read from the run's config and process layout, the check before vLLM starts, the re-check once the
engine's start is measured, and the plan against what the first steps measured.

Exact on any device: the trainer's weights, its optimizer state and the gradients left at a rollout. On CUDA
also: each phase's device-wide peak, the engine's memory awake and asleep, the activations."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from rollout_sleep.engine.memory import cached_free_bytes
from rollout_sleep.weights.stream import local_shard

from . import memory_plan
from .memory_plan import GIB, MemoryPlan
from .optim import fused_step_runs, resident_state_bytes, run_stochastic_rounding
from .per_tensor import state_in

MEASURED_STEPS = 2  # the plan is compared with steps 1-2: the optimizer's state appears at step 1's update


def trainer_shards(processes: int, distributed_type: str, zero_stage: int = 0) -> tuple[int, int, int]:
    """How many ways the trainer's (weights, gradients, optimizer state) are split across ranks."""
    if distributed_type == "FSDP":
        return processes, processes, processes
    if distributed_type == "DEEPSPEED":
        return tuple(processes if zero_stage >= s else 1 for s in (3, 2, 1))
    return 1, 1, 1


def plan_run(cfg: Any, model_path: str, *, processes: int, shards: tuple[int, int, int], longest_prompt: int,
             kv_bytes: int | None, reward_bytes: int, base_shared: bool,
             weights_shared: bool = False, distributed_type: str = "NO",
             base_free: int | None = None) -> tuple[MemoryPlan, int | None]:
    """The per-phase plan of a run (``cfg``: a :class:`~rollout_sleep.run.schema.RecipeConfig`) before vLLM
    starts, and the free GPU memory it was planned against (``None`` off CUDA). ``distributed_type``:
    accelerate's; under FSDP or DeepSpeed the plan offers no knob of the optimizer step (they own it).
    ``base_free``: the free GPU memory measured before vLLM started, for a plan made again once it holds its
    memory (measured then, vLLM's weights and KV cache would count twice: gone from the budget, and planned);
    ``None``: measured here."""
    t, tp = cfg.train, cfg.engine.tensor_parallel_size
    cuda = torch.cuda.is_available()
    notes, total = [], 0
    if cuda:
        torch.cuda.empty_cache()  # blocks cached while the checkpoint was built are not the run's
        free, total = torch.cuda.mem_get_info()
        base_free = free if base_free is None else base_free
    else:
        base_free = None
    budget = int(t.memory_budget_gib * GIB) if t.memory_budget_gib is not None else base_free
    if budget is None:
        notes.append("no GPU: the plan is printed, not checked (train.memory_budget_gib checks it against a budget)")
    # without a GPU nothing moves, unless the plan previews a GPU's budget (train.memory_budget_gib)
    offload = t.offload_optimizer if cuda or t.memory_budget_gib is not None else False
    if t.offload_optimizer and not offload:
        notes.append("train.offload_optimizer: the parameters live in host memory already; nothing moves")
    elif offload == "stream":
        notes.append("train.offload_optimizer=stream: the optimizer state lives in host memory; the step brings "
                     "one tensor's state to the GPU at a time, smallest first, and frees each gradient after its "
                     "tensor steps. Training's total: the larger of gradients + activations and, at the tensor "
                     "where it peaks, gradients_at_step (still held) + optimizer_state (that tensor's, the next "
                     "one's coming in and the previous one's going back: the copies overlap the step) + "
                     "optimizer_step")
    if t.step_per_tensor and offload != "stream":
        notes.append("train.step_per_tensor: the step goes one tensor at a time, smallest first, and frees each "
                     "gradient after its tensor steps. Training's total: optimizer_state + the larger of gradients + "
                     "activations and, at the tensor where it peaks, gradients_at_step (still held) + optimizer_step")
    b = torch.empty((), dtype=getattr(torch, cfg.model.dtype)).element_size()
    shape = memory_plan.ModelShape.from_checkpoint(model_path)
    sequences = t.prompts_per_step // processes * t.generations  # a rank's completions per step
    inputs = memory_plan.PlanInputs(
        shape, dtype_bytes=b, optimizer=t.optimizer, stochastic_rounding=run_stochastic_rounding(cfg, weights_shared),
        offload_optimizer=offload, step_per_tensor=state_in(t) is not None,
        owns_step=distributed_type in ("FSDP", "DEEPSPEED"),
        micro_batch=min(t.micro_batch, sequences), seq_len=longest_prompt + t.max_tokens,
        completion_len=t.max_tokens, gradient_checkpointing=t.gradient_checkpointing,
        autocast=t.mixed_precision != "no" and b == 4, reference_model=t.kl_coef > 0,
        reward_model_bytes=reward_bytes, kv_cache_bytes=kv_bytes if kv_bytes is not None else 0,
        shards=shards, engine_shards=tp, weights_shared=weights_shared,
        fused_head=fused_head(model_path, shards, cfg.model.lora),
        # a preview of a GPU's budget (train.memory_budget_gib) without one: PyTorch's CUDA builds bring Triton
        fused_step=(fused_step_runs() if cuda else t.memory_budget_gib is not None)
        and distributed_type not in ("FSDP", "DEEPSPEED"))
    lora = cfg.model.lora
    if lora.rank:  # only the adapter trains; the base is vLLM's (a view) on CUDA, the trainer's own elsewhere
        from transformers import AutoConfig

        numels = memory_plan.lora_adapter_numels(AutoConfig.from_pretrained(model_path), lora.rank, list(lora.targets))
        inputs = dataclasses.replace(inputs, base_shared=base_shared, adapter_numels=numels)
    if kv_bytes is None and cuda:  # vLLM's own sizing: its share of the GPU less its weights and workspace
        engine = int(cfg.engine.gpu_memory_utilization * total)
        kv = engine - shape.params * b // tp - memory_plan.estimate_engine_workspace(shape, b)
        inputs = dataclasses.replace(inputs, kv_cache_bytes=max(0, kv))
        notes.append(f"engine.kv_cache=gpu_share: vLLM takes {cfg.engine.gpu_memory_utilization} of "
                     f"{total / GIB:.1f} GiB, the KV cache what its weights and workspace leave")
    elif kv_bytes is None:
        inputs = dataclasses.replace(inputs, kv_cache_bytes=256 << 20)  # the engine's CPU default
    return memory_plan.plan_memory(inputs, budget, int(t.memory_headroom_gib * GIB), tuple(notes)), base_free


def fused_head(model_path: str, shards: tuple[int, int, int], lora) -> bool:
    """Whether the trainer will take the fused LM head (``grpo.logprobs.fused_head_problem``), as far as the plan can
    tell before the model exists: the checkpoint's family and config allow it, the weights are not sharded
    (FSDP, ZeRO-3) and LoRA does not target the head."""
    from transformers import AutoConfig

    from rollout_sleep.grpo.logprobs import FUSED_HEAD, fused_config_problem

    targets = [lora.targets] if isinstance(lora.targets, str) else list(lora.targets)
    if not FUSED_HEAD or shards[0] > 1 or (lora.rank and any("lm_head" in t for t in targets)):
        return False
    try:
        return fused_config_problem(AutoConfig.from_pretrained(model_path)) is None
    except (OSError, ValueError):  # no config the plan can read: count the logits
        return False


def enforce(plan: MemoryPlan, mode: str, warn: Callable[[str], Any], when: str = "") -> None:
    """``mode`` ``refuse``: raise :class:`~rollout_sleep.run.memory_plan.MemoryPlanError` naming every phase that
    does not fit; ``warn``: say so through ``warn`` and go on."""
    found = memory_plan.problems(plan)
    if not found:
        return
    if mode == "refuse":
        raise memory_plan.MemoryPlanError([f"{p} ({when})" if when else p for p in found])
    for p in found:
        warn(f"warning (train.memory_plan=warn, running anyway): the memory plan does not fit: {p}")


def with_engine_measured(plan: MemoryPlan, engine_taken: int) -> MemoryPlan:
    """The plan again with the memory vLLM took at its start (weights, KV cache, workspace) in place of the
    estimated workspace: a misfit then stops the run before the trainer's model loads."""
    r = plan.phases["rollout"]
    workspace = max(0, engine_taken - r["engine_weights"] - r["kv_cache"])
    note = (f"engine workspace measured at its start: {workspace / GIB:.2f} GiB (estimated "
            f"{r['engine_workspace'] / GIB:.2f})")
    return memory_plan.plan_memory(dataclasses.replace(plan.inputs, engine_workspace_bytes=workspace),
                                   plan.budget_bytes, plan.headroom_bytes, plan.notes + (note,))


class Resident:
    """What the trainer holds as each rollout starts (the largest seen): gradients (freed after each step: 0),
    optimizer state and, on CUDA, PyTorch's cached free blocks (device-wide, not in the plan)."""

    def __init__(self) -> None:
        self.bytes: dict[str, int] = {}

    def note(self, model: torch.nn.Module, optimizer: Any, device_type: str) -> None:
        grads = sum(local_shard(p.grad).numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        now = {"gradients": grads, "optimizer_state": resident_state_bytes(optimizer, device_type),
               "pytorch_cached_free": cached_free_bytes() if torch.cuda.is_available() else 0}
        self.bytes.update({k: max(v, self.bytes.get(k, 0)) for k, v in now.items()})

    def note_before_wake(self) -> None:
        """PyTorch's cached free blocks as training left them, before a wake (which may release them:
        ``engine.keep_trainer_cache``); on CUDA only."""
        if torch.cuda.is_available():
            key = "pytorch_cached_free_before_wake"
            self.bytes[key] = max(cached_free_bytes(), self.bytes.get(key, 0))


def measured_gib(model: torch.nn.Module, optimizer: Any, device_type: str, resident: Resident, *,
                 offloaded_gib: float | None = None, peaks: Any = None, engine_taken: int | None = None,
                 engine_freed_gib: float | None = None, activations: bool = True,
                 weights_shared: bool = False) -> dict[str, dict[str, float]]:
    """Per phase, what the run measured (GiB), in the plan's component names. ``offloaded_gib``: the optimizer
    state on the device during a step when it lives in host memory otherwise (``train.offload_optimizer``: true,
    the whole state; stream, the most the step held at once: up to three parameters'); ``peaks``: a started
    :class:`~rollout_sleep.engine.memory.PhasePeaks` (stopped here); ``engine_taken``: bytes vLLM took at its start; ``engine_freed_gib``: what its sleep gave
    back; ``activations``: measure them (not while the optimizer state moves in and out); ``weights_shared``: the
    trainer's parameters are views of the engine's weights (counted there, not again)."""
    weights = 0 if weights_shared else sum(local_shard(p).numel() * p.element_size() for p in model.parameters())
    state = resident_state_bytes(optimizer, device_type) if offloaded_gib is None else int(offloaded_gib * GIB)
    held = resident.bytes
    rollout = {"trainer_weights": weights / GIB, "gradients": held["gradients"] / GIB,
               "optimizer_state": held["optimizer_state"] / GIB}
    if torch.cuda.is_available():
        rollout["pytorch_cached_free"] = held["pytorch_cached_free"] / GIB
        if "pytorch_cached_free_before_wake" in held:
            rollout["pytorch_cached_free_before_wake"] = held["pytorch_cached_free_before_wake"] / GIB
    training = {"trainer_weights": weights / GIB, "optimizer_state": state / GIB}
    if peaks is not None and peaks.active:
        peaks.stop()
        rollout["total"] = peaks.used.get("rollout", 0) / GIB
        training["total"] = peaks.used.get("training", 0) / GIB
        if engine_taken is not None:
            rollout["engine"] = engine_taken / GIB
            if engine_freed_gib is not None:
                training["engine_asleep"] = engine_taken / GIB - engine_freed_gib
        if activations and "training" in peaks.allocated:
            grads = sum(local_shard(q).numel() * q.element_size() for q in model.parameters() if q.requires_grad)
            training["activations"] = (peaks.allocated["training"] - peaks.allocated_at_start["training"] - grads) / GIB
    return {"rollout": rollout, "training": training}


def cuda_peak(floor: int = 0) -> dict:
    """PyTorch's allocator peak GPU memory so far (the trainer's tensors, and the vLLM tensors it books), at
    least ``floor`` (a peak kept across ``reset_peak_memory_stats``)."""
    if not torch.cuda.is_available():
        return {}
    return {"cuda_peak_allocated_gib": max(torch.cuda.max_memory_allocated(), floor) / 2**30}
