"""The recipe's optimizers and what their state weighs.

``train.optimizer``: ``adamw`` (PyTorch's AdamW, fused on CUDA and for float16 parameters; its two moments take
the parameters' dtype, so bf16 weights carry 4 bytes of state per parameter, float32 weights 8), ``adamw8bit``
(bitsandbytes' ``AdamW8bit``, imported only when asked: two uint8 moments with a float32 scale per 256-element
block; tensors under 4096 elements keep float32 moments, and so do the embeddings, as transformers' Trainer (and
so TRL) sets up its 8-bit AdamW for stability) or ``adamw4bit`` (torchao's ``AdamW4bit``: two 4-bit moments
with a float32 scale per 128-element block).

``train.stochastic_rounding`` (:func:`stochastic_rounding_on`): bf16 weights stepped in place, with no float32
master copy, lose AdamW's small updates (an update under half of bf16's spacing near the weight rounds back
to it). Stochastic rounding rounds the float32 result up or down with the probability that keeps it in
expectation (measured at lr 1e-6: PyTorch's AdamW changed 0.04 % of the weights per step, torchao's with
rounding 0.26 %, with a mean |Δw| ~2500 times larger). With it every kind comes from torchao with
``bf16_stochastic_round=True``: ``adamw`` its ``_AdamW``, ``adamw8bit`` its ``AdamW8bit``, ``adamw4bit`` its
``AdamW4bit``. torchao quantizes a tensor's moments only from 4096 elements on and when its block size divides
them; other tensors (and all of ``_AdamW``'s) keep their moments in the parameters' dtype.

>>> optimizer_state_bytes("adamw", [(1000, 2)])  # 1000 bf16 parameters: two bf16 moments and a float32 step
4004
>>> optimizer_state_bytes("adamw8bit", [(4096, 2), (100, 2)])  # 2 x (4096 + 16 scales x 4), fp32 below 4096, maps
11168
>>> optimizer_state_bytes("adamw4bit", [(4096, 2), (100, 2)])  # 2 x (2048 + 32 x 4 + 16 x 4), bf16 below 4096
4888
>>> optimizer_state_bytes("adamw8bit", [(4096, 2)], stochastic_rounding=True)  # torchao: a 256-entry map per moment
10372

Moving the state to host memory (``train.offload_optimizer``) lives in :mod:`rollout_sleep.run.offload`.
"""

from __future__ import annotations

import functools
import importlib.util
import weakref

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

OPTIMIZERS = ("adamw", "adamw8bit", "adamw4bit")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size default: smaller tensors keep 32-bit state
BNB_BLOCK = 256  # bitsandbytes' blockwise quantization: one float32 absmax per block per moment
TORCHAO_MIN_QUANT_SIZE = 4096  # torchao quantizes a tensor's moments from this many elements on ...
TORCHAO_BLOCKS = {"adamw8bit": 256, "adamw4bit": 128}  # ... when its block (one float32 scale each) divides them
TORCHAO_MAPS = {"adamw8bit": 256, "adamw4bit": 16}  # float32 entries of the code map each quantized moment holds
TORCHAO_CLASSES = {"adamw": "_AdamW", "adamw8bit": "AdamW8bit", "adamw4bit": "AdamW4bit"}
TORCHAO_STEP_BYTES = {"adamw": 0, "adamw8bit": 8, "adamw4bit": 25}  # the step's buffers per element (see below)


def stochastic_rounding_on(setting: bool | None, weights_dtype: str | torch.dtype, in_place: bool) -> bool:
    """Whether the optimizer rounds its updates into the weights stochastically. ``setting``: the config's
    ``train.stochastic_rounding`` (``None``: auto, ``True``/``False``); ``in_place``: the caller's word that the
    trainer steps these weights in place with no float32 master copy (the one-copy mode, which trains vLLM's own
    weight memory). Auto turns it on only there, and only for bf16 weights (it rounds into bfloat16).

    >>> [stochastic_rounding_on(None, "bfloat16", in_place) for in_place in (True, False)]
    [True, False]
    >>> stochastic_rounding_on(None, torch.float32, True), stochastic_rounding_on(False, torch.bfloat16, True)
    (False, False)
    """
    if setting is None:
        return in_place and str(weights_dtype).removeprefix("torch.") == "bfloat16"
    return bool(setting)  # true with weights not in bf16: refused by the config (rollout_sleep.run.modes)


def run_stochastic_rounding(cfg, one_copy: bool = False) -> bool:
    """:func:`stochastic_rounding_on` for a recipe config: the one place that says whether this run's trainer
    rounds its bf16 updates stochastically. ``one_copy``: the trainer trains vLLM's weight memory
    (:mod:`rollout_sleep.run.one_copy`: no float32 master can exist), so ``null`` turns it on; a trainer with its
    own copy keeps the optimizers it had under ``null``."""
    return stochastic_rounding_on(cfg.train.stochastic_rounding, cfg.model.dtype, in_place=one_copy)


def optimizer_package(kind: str, stochastic_rounding: bool = False) -> str | None:
    """The package optimizer ``kind`` comes from: ``torchao`` (``adamw4bit``, and every kind with stochastic
    rounding), ``bitsandbytes`` (``adamw8bit`` without), ``None`` for PyTorch's own AdamW."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}")
    if stochastic_rounding or kind == "adamw4bit":
        return "torchao"
    return "bitsandbytes" if kind == "adamw8bit" else None


def fused_step_runs() -> bool:
    """Whether ``adamw8bit`` with stochastic rounding steps in :mod:`rollout_sleep.run.fused_adamw8bit`'s kernels
    on this machine (a CUDA device and Triton; a sharded trainer's DTensors take torchao's step still)."""
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


def optimizer_step_bytes(kind: str, numels, stochastic_rounding: bool = False, fused_step: bool = False) -> int:
    """GPU memory the optimizer step takes beyond its state, at its peak. torchao steps one tensor at a time
    through one compiled kernel graph, whose buffers scale with the tensor: the largest tensor (an embedding) sets
    it. Its 8-bit step holds the two moments in float32 (8 bytes per element); its 4-bit step also the two
    moments' int64 code indices and packed codes (25 bytes per element: measured on the H100 at Qwen3-14B, and
    read from the compiled graph's buffers); with plain moments it works in place, as PyTorch's fused AdamW and
    bitsandbytes' kernels do, and so does the 8-bit step in one kernel per tensor (``fused_step``:
    :func:`fused_step_runs`).

    >>> optimizer_step_bytes("adamw4bit", [4096, 1000])
    102400
    >>> optimizer_step_bytes("adamw8bit", [4096, 1000], stochastic_rounding=True)
    32768
    >>> optimizer_step_bytes("adamw8bit", [4096, 1000], stochastic_rounding=True, fused_step=True)
    0
    >>> optimizer_step_bytes("adamw", [4096, 1000])
    0
    """
    numels = list(numels)
    if optimizer_package(kind, stochastic_rounding) != "torchao" or not numels:
        return 0
    if fused_step and kind == "adamw8bit":
        return 0
    return TORCHAO_STEP_BYTES[kind] * max(numels)


def missing_package(kind: str, stochastic_rounding: bool = False) -> str | None:
    """What must be installed for optimizer ``kind`` (with or without stochastic rounding) and is not
    (``None``: nothing). Looks the package up without importing it."""
    package = optimizer_package(kind, stochastic_rounding)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    if package == "bitsandbytes":
        return ("train.optimizer=adamw8bit needs bitsandbytes, which is not installed: pip install bitsandbytes "
                "(or pip install 'rollout-sleep[lean]'), or use train.optimizer=adamw")
    why = "train.stochastic_rounding (on) takes" if stochastic_rounding else "train.optimizer=adamw4bit takes"
    other = "train.stochastic_rounding=false" if stochastic_rounding else "train.optimizer=adamw"
    return (f"{why} torchao's {TORCHAO_CLASSES[kind]}, and torchao is not installed: pip install torchao "
            f"(or pip install 'rollout-sleep[lean]'), or use {other}")


def optimizer_record(kind: str, stochastic_rounding: bool = False, weights_shared: bool = False) -> dict:
    """What a checkpoint records of the optimizer that saved its state: the class (``package.Class``, named
    without importing it), whether it rounded stochastically, and whether the trainer trained vLLM's weights
    (one copy: what turns ``train.stochastic_rounding=null`` on).

    >>> optimizer_record("adamw", stochastic_rounding=True, weights_shared=True)["class"]
    'torchao.optim._AdamW'
    """
    package = optimizer_package(kind, stochastic_rounding)
    name = {"torchao": f"torchao.optim.{TORCHAO_CLASSES[kind]}", "bitsandbytes": "bitsandbytes.optim.AdamW8bit",
            None: "torch.optim.AdamW"}[package]
    return {"class": name, "stochastic_rounding": bool(stochastic_rounding), "weights_shared": bool(weights_shared)}


def _said(record: dict) -> str:
    module, _, name = record["class"].rpartition(".")
    owner = {"torchao.optim": "torchao's", "bitsandbytes.optim": "bitsandbytes'", "torch.optim": "PyTorch's"}
    rounding = " with bf16 stochastic rounding" if record.get("stochastic_rounding") else ""
    copies = "one copy of the weights" if record.get("weights_shared") else "two copies of the weights"
    return f"{owner.get(module, module)} {name}{rounding} ({copies})"


def optimizer_mismatch(saved: dict | None, now: dict, checkpoint: str) -> str | None:
    """Why this run cannot load the optimizer state of ``checkpoint`` (``saved``: its :func:`optimizer_record`,
    ``None`` for a checkpoint from before it was recorded: not checked), or ``None``. Only the class matters:
    another class takes the state silently and fails later (PyTorch's AdamW steps torchao's quantized moments
    with an unimplemented operator; torchao refuses PyTorch's float lr at the first step). ``train.optimizer`` is
    fixed on resume; the class changes where ``train.stochastic_rounding`` (applied on resume) is changed, or
    where null follows another one-copy decision.

    >>> print(optimizer_mismatch(optimizer_record("adamw", True, True), optimizer_record("adamw"), "step_4"))
    ... # doctest: +ELLIPSIS
    checkpoint step_4 holds the state of torchao's _AdamW with bf16 stochastic rounding (one copy of the weights); ...
    """
    if not isinstance(saved, dict) or saved.get("class") in (None, now["class"]):
        return None
    if "stochastic_rounding" in saved and saved["stochastic_rounding"] != now["stochastic_rounding"] and \
            saved.get("weights_shared") == now["weights_shared"]:
        return (f"checkpoint {checkpoint} holds the state of {_said(saved)}; this run builds {_said(now)}, which "
                "cannot take that state: train.stochastic_rounding picks the optimizer's class here. Fix: resume with "
                f"train.stochastic_rounding={str(bool(saved['stochastic_rounding'])).lower()}, or start a new run in "
                "a new output_dir")
    return (f"checkpoint {checkpoint} holds the state of {_said(saved)}; this run builds {_said(now)}, which cannot "
            "take that state (it would fail at the first step, or step quantized moments it does not know). "
            "train.stochastic_rounding=null turns torchao's rounding on exactly where the trainer steps vLLM's own "
            "bf16 weights (one copy). Fix: resume as the run was trained ("
            + ("model.share_weights=null or true, on a CUDA GPU, one process" if saved.get("weights_shared") else
               "model.share_weights=false") + ")"
            + (f", keep its optimizer with train.stochastic_rounding={str(bool(saved['stochastic_rounding'])).lower()}"
               if "stochastic_rounding" in saved else "")
            + ", or start a new run in a new output_dir")


def optimizer_state_bytes(kind: str, tensors, state32=(), stochastic_rounding: bool = False) -> int:
    """Bytes of optimizer state for parameters given as ``(numel, element_size)`` pairs, one per tensor;
    ``state32``: the element counts of tensors among them whose 8-bit state bitsandbytes keeps in float32
    (embeddings; torchao has no such exception). ``stochastic_rounding``: the kind comes from torchao."""
    package = optimizer_package(kind, stochastic_rounding)
    tensors = list(tensors)
    if package == "torchao":
        block = TORCHAO_BLOCKS.get(kind)
        total = 0
        for numel, size in tensors:
            total += 4  # its float32 step (a host scalar, wherever the parameters are)
            if block is not None and numel >= TORCHAO_MIN_QUANT_SIZE and numel % block == 0:
                codes = numel if kind == "adamw8bit" else numel // 2  # 4-bit codes: two to a byte
                total += 2 * (codes + 4 * (numel // block) + 4 * TORCHAO_MAPS[kind])
            else:
                total += 2 * numel * size  # moments in the parameters' dtype
        return total
    total = 2 * 256 * 4 if package == "bitsandbytes" else 0  # bitsandbytes' two quantization maps, shared
    if package == "bitsandbytes":
        for numel in state32:
            size = next(sz for n, sz in tensors if n == numel)
            tensors.remove((numel, size))
            total += 2 * numel * 4
    for numel, size in tensors:
        if package is None:
            total += 2 * numel * size + 4  # two moments, and its float32 step counter
        elif numel < BNB_MIN_8BIT_SIZE:
            total += 2 * numel * 4
        else:
            total += 2 * numel + 2 * 4 * -(-numel // BNB_BLOCK)
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
            if isinstance(old, torch.Tensor):  # a tensor lr (capturable / fused optimizers, torchao's) stays one
                if float(old) != float(torch.tensor(value, dtype=old.dtype)):  # a float32 lr holds 1e-3 as 1.00000005e-3
                    changed.setdefault(name, float(old))
                old.fill_(value)
            else:
                if old != value:
                    changed.setdefault(name, old)
                group[name] = value
    return [(name, old, values[name]) for name, old in changed.items()]


def build_optimizer(kind: str, params, *, lr: float, weight_decay: float, fused: bool | None = None,
                    model: torch.nn.Module | None = None, stochastic_rounding: bool = False) -> torch.optim.Optimizer:
    """The optimizer ``kind`` (see :data:`OPTIMIZERS`) over ``params`` (``fused``: PyTorch AdamW's). For
    bitsandbytes' ``adamw8bit``, ``model``'s embeddings keep 32-bit state (transformers' Trainer does the same).
    ``stochastic_rounding``: torchao's kind with ``bf16_stochastic_round=True`` (bf16 parameters only; others
    are stepped as usual)."""
    problem = missing_package(kind, stochastic_rounding)  # also refuses an unknown kind
    if problem:
        raise ImportError(problem)
    package = optimizer_package(kind, stochastic_rounding)
    if package == "torchao":
        import torchao.optim

        cls = getattr(torchao.optim, TORCHAO_CLASSES[kind])
        if kind == "adamw8bit" and stochastic_rounding:  # the same optimizer, stepped by one kernel per tensor
            from .fused_adamw8bit import FusedAdamW8bit as cls
        optimizer = cls(params, lr=lr, weight_decay=weight_decay, bf16_stochastic_round=stochastic_rounding)
        if kind == "adamw8bit":
            _second_moments_without_zero(optimizer)
        return _eager_on_cpu(optimizer)
    if package == "bitsandbytes":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
        _second_moments_without_zero(optimizer)
        if model is not None:
            manager = bnb.optim.GlobalOptimManager.get_instance()
            for module in model.modules():
                if isinstance(module, torch.nn.Embedding):
                    manager.register_module_override(module, "weight", {"optim_bits": 32})
        return optimizer
    params = list(params)
    if fused is None and any(p.dtype == torch.float16 for p in _tensors(params)):
        # PyTorch's unfused AdamW computes in the parameters' dtype: in float16 its eps (1e-8) rounds to 0,
        # so an element whose gradient is 0 becomes 0/0 = NaN at the first step. The fused kernels (CPU and
        # CUDA) compute in float32.
        fused = True
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def _second_moments_without_zero(optimizer: torch.optim.Optimizer) -> None:
    """An 8-bit AdamW (torchao's, bitsandbytes') quantizes its second moments with no zero code: one under the
    map's smallest code rounds up to it, not to 0 (the zero-point fix of 4-bit Adam, Li et al. 2023, which
    torchao's AdamW4bit has). Why: a second moment under ~1.6e-7 of its block's largest rounded to 0 while the
    first moment kept its value, so at the next step with a zero gradient (a GRPO step whose rewards all tie) or a
    far smaller one such weights moved by ``lr * m / eps`` (measured: torchao's ~800 x lr on 0.1 % of a Linear's
    weights, the tiny recipe's linears up to 257 x lr; bitsandbytes' 0.50.2 CUDA step 733 x lr on a Linear's,
    713 x lr on an embedding-shaped tensor with 8-bit state: the recipe keeps its embeddings' in 32 bits). Set on
    each state as it is made, and on states loaded from a checkpoint saved before."""
    ref = weakref.ref(optimizer)  # weakly, as _eager_on_cpu
    if hasattr(optimizer, "name2qmap"):  # bitsandbytes: one unsigned map, copied into each state as its qmap2
        cls = type(optimizer)  # its own loader (PyTorch's hooks do not run), called unbound: no reference cycle

        def mend_maps() -> None:
            opt = ref()
            for q in [opt.name2qmap.get("udynamic"), *(s.get("qmap2") for s in opt.state.values())]:
                if q is not None and float(q[0]) == 0.0:  # sorted codes, 0 first: the smallest positive there
                    q[0] = q[1]

        def fill_qmap() -> None:
            cls.fill_qmap(ref())
            mend_maps()

        def load_state_dict(state_dict, *args, **kwargs) -> None:
            cls.load_state_dict(ref(), state_dict, *args, **kwargs)
            mend_maps()

        optimizer.fill_qmap, optimizer.load_state_dict = fill_qmap, load_state_dict
        mend_maps()
        return

    def buffer(p: torch.Tensor, signed: bool) -> torch.Tensor:
        out = type(ref())._new_buffer(ref(), p, signed)
        if not signed:
            _no_zero_code(out)
        return out

    def mend(opt: torch.optim.Optimizer) -> None:  # a state saved before this fix
        for state in opt.state.values():
            if "exp_avg_sq" in state:
                _no_zero_code(state["exp_avg_sq"])

    optimizer._new_buffer = buffer
    optimizer.register_load_state_dict_post_hook(mend)


def _no_zero_code(t: torch.Tensor) -> None:
    """A quantized second moment's code 0 (value 0) made its smallest positive value (a DTensor's local shard)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    if hasattr(local, "qmap") and not local.signed:
        local.qmap[0] = local.qmap[1]


def _eager_on_cpu(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` (torchao's) stepping eagerly where its parameters are on the CPU. torchao compiles its
    per-tensor step (``torch.compile``, one graph per shape and dtype) and has no switch to skip it; on the CPU
    each compile costs seconds (6-12 s at the first step), more than the small runs there save, so
    ``torch.compiler.set_stance("force_eager")`` runs the same function uncompiled. On CUDA it compiles.
    The wrapper holds the optimizer weakly: a dropped optimizer frees its state at once, not at the next cycle
    collection (15.5 GiB of 8-bit state at 8B)."""
    ref, step = weakref.ref(optimizer), type(optimizer).step

    @functools.wraps(step)
    def eager_step(*args, **kwargs):
        opt = ref()
        first = next((p for g in opt.param_groups for p in g["params"]), None)
        if first is None or first.device.type != "cpu":
            return step(opt, *args, **kwargs)
        with torch.compiler.set_stance("force_eager"):
            return step(opt, *args, **kwargs)

    optimizer.step = eager_step
    return optimizer


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


def storage_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors holding ``t``'s data: ``t`` itself, or a tensor subclass's inner tensors (torchao's
    quantized moments: codes, block scales and code map; a DTensor: its local shard), whose own storage a
    wrapper's ``untyped_storage()`` does not report. Only the inner tensors: torch 2.13's DTensor also names its
    device mesh."""
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    inner = [getattr(t, name) for name in names]
    return [leaf for x in inner if isinstance(x, torch.Tensor) for leaf in storage_tensors(x)]


def resident_state_bytes(optimizer: torch.optim.Optimizer, device_type: str = "cuda") -> int:
    """Bytes of optimizer state on devices of ``device_type`` (each storage once: bitsandbytes shares its
    quantization maps)."""
    seen: dict[int, int] = {}
    for *_, state in state_tensors(optimizer):
        for t in storage_tensors(state):
            if t.device.type == device_type:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
