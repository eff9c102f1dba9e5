"""The recipe's optimizers and what their state weighs, and moving that state off the GPU while vLLM rolls out.

``train.optimizer``: ``adamw`` (PyTorch's AdamW, fused on CUDA and for float16 parameters; its two moments take
the parameters' dtype, so bf16 weights carry 4 bytes of state per parameter, float32 weights 8) or ``adamw8bit`` (bitsandbytes'
``AdamW8bit``, imported only when asked: two uint8 moments with a float32 scale per 256-element block; tensors
under 4096 elements keep float32 moments, and so do the embeddings, as transformers' Trainer (and so TRL) sets
up its 8-bit AdamW for stability).

>>> optimizer_state_bytes("adamw", [(1000, 2)])  # 1000 bf16 parameters: two bf16 moments and a float32 step
4004
>>> optimizer_state_bytes("adamw8bit", [(4096, 2), (100, 2)])  # 2 x (4096 + 16 scales x 4), fp32 below 4096, maps
11168

:class:`OptimizerOffload` moves the state tensors to pinned host memory after each optimizer step (so the
rollout that follows has that memory) and back right before the next step (so they never sit beside the
training's activations), timing both copies. Where the parameters already live on the host it does nothing.
"""

from __future__ import annotations

import importlib.util
import logging
import time

import torch

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size default: smaller tensors keep 32-bit state
BNB_BLOCK = 256  # bitsandbytes' blockwise quantization: one float32 absmax per block per moment


def missing_package(kind: str) -> str | None:
    """What must be installed for optimizer ``kind`` and is not (``None``: nothing)."""
    if kind == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        return ("train.optimizer=adamw8bit needs bitsandbytes, which is not installed: pip install bitsandbytes "
                "(or pip install 'rollout-sleep[lean]'), or use train.optimizer=adamw")
    return None


def optimizer_state_bytes(kind: str, tensors, state32=()) -> int:
    """Bytes of optimizer state for parameters given as ``(numel, element_size)`` pairs, one per tensor;
    ``state32``: the element counts of tensors among them whose 8-bit state is kept in float32 (embeddings)."""
    total = 2 * 256 * 4 if kind == "adamw8bit" else 0  # bitsandbytes' two quantization maps, shared
    tensors = list(tensors)
    if kind == "adamw8bit":
        for numel in state32:
            size = next(sz for n, sz in tensors if n == numel)
            tensors.remove((numel, size))
            total += 2 * numel * 4
    for numel, size in tensors:
        if kind == "adamw":
            total += 2 * numel * size + 4  # two moments, and its float32 step counter
        elif kind == "adamw8bit":
            if numel < BNB_MIN_8BIT_SIZE:
                total += 2 * numel * 4
            else:
                total += 2 * numel + 2 * 4 * -(-numel // BNB_BLOCK)
        else:
            raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")
    return total


def hyperparameters(train) -> dict[str, float]:
    """The optimizer's settings from the config's ``train`` section, by param-group name: what
    :func:`build_optimizer` is built with, and what :func:`set_hyperparameters` puts back after a resume."""
    return {"lr": train.lr, "weight_decay": train.weight_decay}


def set_hyperparameters(optimizer, values: dict[str, float]) -> list[tuple[str, float, float]]:
    """Set ``values`` (param-group name -> value) in every param group of ``optimizer`` (a restored state
    brings back the values it was saved with: the config's must win). Returns ``(name, restored, new)`` for
    each one that changed.

    >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    >>> set_hyperparameters(opt, {"lr": 0.01, "weight_decay": 0.01})
    [('lr', 0.1, 0.01)]
    >>> opt.param_groups[0]["lr"]
    0.01
    """
    changed = {}
    for group in optimizer.param_groups:
        for name, value in values.items():
            old = group.get(name)
            if isinstance(old, torch.Tensor):  # a tensor lr (capturable / fused optimizers) stays a tensor
                if float(old) != value:
                    changed.setdefault(name, float(old))
                old.fill_(value)
            else:
                if old != value:
                    changed.setdefault(name, old)
                group[name] = value
    return [(name, old, values[name]) for name, old in changed.items()]


def build_optimizer(kind: str, params, *, lr: float, weight_decay: float, fused: bool | None = None,
                    model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    """The optimizer ``kind`` (see :data:`OPTIMIZERS`) over ``params`` (``fused``: PyTorch AdamW's). For
    ``adamw8bit``, ``model``'s embeddings keep 32-bit state (transformers' Trainer does the same)."""
    if kind == "adamw":
        params = list(params)
        if fused is None and any(p.dtype == torch.float16 for p in _tensors(params)):
            # PyTorch's unfused AdamW computes in the parameters' dtype: in float16 its eps (1e-8) rounds to 0,
            # so an element whose gradient is 0 becomes 0/0 = NaN at the first step. The fused kernels (CPU and
            # CUDA) compute in float32.
            fused = True
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
    if kind == "adamw8bit":
        problem = missing_package(kind)
        if problem:
            raise ImportError(problem)
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
        if model is not None:
            manager = bnb.optim.GlobalOptimManager.get_instance()
            for module in model.modules():
                if isinstance(module, torch.nn.Embedding):
                    manager.register_module_override(module, "weight", {"optim_bits": 32})
        return optimizer
    raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")


def _tensors(params: list):
    """The parameters of a list of parameters or of parameter groups (dicts with ``params``)."""
    for item in params:
        if isinstance(item, dict):
            yield from item["params"]
        else:
            yield item


def state_tensors(optimizer: torch.optim.Optimizer):
    """``(parameter, state dict, key, tensor)`` for every tensor in the optimizer's state."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps one
    for p, state in list(optimizer.state.items()):
        for key, value in list(state.items()):
            if isinstance(value, torch.Tensor):
                yield p, state, key, value


def resident_state_bytes(optimizer: torch.optim.Optimizer, device_type: str = "cuda") -> int:
    """Bytes of optimizer state on devices of ``device_type`` (each storage once: bitsandbytes shares its
    quantization maps)."""
    seen: dict[int, int] = {}
    for *_, t in state_tensors(optimizer):
        if t.device.type == device_type:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


class OptimizerOffload:
    """Keep ``optimizer``'s state in pinned host memory between steps: a step pre-hook copies it to the
    parameters' device right before the step, a post-hook copies it back to the host right after (before
    the rollout). Host buffers are allocated once and reused. ``pop_timings()`` gives this step's seconds and
    bytes. Idempotent: :meth:`offload` moves only what is on the device, :meth:`reload` only what is not.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = getattr(optimizer, "optimizer", optimizer)
        if not isinstance(self.optimizer, torch.optim.Optimizer):  # DeepSpeed's ZeRO optimizer: no step hooks
            raise ValueError(f"train.offload_optimizer moves a torch.optim.Optimizer's state, not a "
                             f"{type(self.optimizer).__name__}'s: with DeepSpeed set its own offload_optimizer "
                             "(zero_optimization.offload_optimizer.device=cpu) and train.offload_optimizer=false")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if any(hasattr(p, "full_tensor") for p in params):  # a DTensor's state cannot be swapped for host tensors
            raise ValueError("train.offload_optimizer does not move FSDP2's sharded (DTensor) optimizer state: use "
                             "FSDP's own CPU offload (fsdp_offload_params) and train.offload_optimizer=false")
        self.device = params[0].device if params else torch.device("cpu")
        self.active = self.device.type != "cpu"
        self._host: dict[tuple[int, str], torch.Tensor] = {}
        self._timings = {"optimizer_offload_s": 0.0, "optimizer_reload_s": 0.0, "optimizer_offload_gib": 0.0}
        if not self.active:
            logger.info("train.offload_optimizer: the parameters live on the host already; nothing to move")
            return
        self._handles = [self.optimizer.register_step_pre_hook(lambda *a: self.reload()),
                         self.optimizer.register_step_post_hook(lambda *a: self.offload())]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def offload(self) -> int:
        """Move the state to host memory; returns the bytes moved."""
        if not self.active:
            return 0
        self._sync()
        t0, moved = time.perf_counter(), 0
        for p, state, key, t in state_tensors(self.optimizer):
            if t.device.type == "cpu":
                continue
            slot = (id(p), key)  # parameters outlive a load_state_dict (a resume), state dicts do not
            host = self._host.get(slot)
            if host is None or host.shape != t.shape or host.dtype != t.dtype:
                host = self._host[slot] = torch.empty(t.shape, dtype=t.dtype, device="cpu",
                                                      pin_memory=self.device.type == "cuda")
            host.copy_(t, non_blocking=True)
            state[key] = host
            moved += t.numel() * t.element_size()
        self._sync()  # the copies are done before the device memory is reused
        self._timings["optimizer_offload_s"] += time.perf_counter() - t0
        self._timings["optimizer_offload_gib"] = max(self._timings["optimizer_offload_gib"], moved / 2**30)
        return moved

    def reload(self) -> int:
        """Move the state that :meth:`offload` moved back to the parameters' device; returns the bytes moved."""
        if not self.active:
            return 0
        t0, moved = time.perf_counter(), 0
        for p, state, key, t in state_tensors(self.optimizer):
            if self._host.get((id(p), key)) is t:  # ours (a host scalar of the optimizer's own stays)
                state[key] = t.to(self.device, non_blocking=True)
                moved += t.numel() * t.element_size()
        self._sync()
        self._timings["optimizer_reload_s"] += time.perf_counter() - t0
        return moved

    def pop_timings(self) -> dict[str, float]:
        """Seconds spent moving the state off and back since the last call, and the GiB moved."""
        out = dict(self._timings)
        self._timings = dict.fromkeys(out, 0.0)
        return out if self.active else {}

