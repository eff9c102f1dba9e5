"""FP8 rollouts from a bf16 trainer: vLLM's online FP8 and the same arithmetic on the trainer's side.

An engine started with ``quantization="fp8"`` on a bf16 checkpoint quantizes every linear layer when it
loads (vLLM 0.26, ``Fp8PerTensorOnlineLinearMethod.process_weights_after_loading``): the layer's whole
weight (a fused ``qkv_proj`` / ``gate_up_proj`` is ONE tensor, its shards share one scale) goes through
``ops.scaled_fp8_quant(weight, scale=None)``, a dynamic per-tensor quantization:

- ``scale = max|W| / 448`` in float32 (448: the largest ``float8_e4m3fn``),
- ``W_fp8 = float8_e4m3fn(fmax(-448, fmin(float32(W) * (1 / scale), 448)))`` (round to nearest even),

and stores ``weight`` transposed (an ``[in, out]`` view of ``[out, in]`` data) with ``weight_scale`` of
shape ``[1]``. Embeddings, the LM head and norms stay in the checkpoint's dtype. vLLM's layerwise reload
(``reload_weights``) rebuilds the bf16 parameters, loads them and runs the same processing again.

The ``direct`` route (:mod:`rollout_sleep.engine.loader`) and ``verify`` quantize the trainer's weights with
:func:`quantize`: vLLM's own kernel where the engine runs it (so the copy is what vLLM's loader would
make), else :func:`quantize_reference`, the formula above in PyTorch (tested bit for bit on CPU).

Example:
    >>> w = torch.tensor([[0.5, -2.0], [1.0, 0.25]], dtype=torch.bfloat16)
    >>> q, scale = quantize_reference(w)
    >>> bool(scale == torch.tensor([2.0]) / 448), q.dtype
    (True, torch.float8_e4m3fn)
    >>> q.float().tolist()
    [[112.0, -448.0], [224.0, 56.0]]
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448.0
QUANTIZATIONS = (None, "fp8")

logger = logging.getLogger(__name__)


def quantize_reference(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-tensor FP8 of a 2-D ``weight`` as vLLM's ``scaled_fp8_quant(w, scale=None)`` computes it:
    ``(W_fp8 [out, in], scale [1] float32)``; see the module docstring."""
    if weight.ndim != 2:
        raise ValueError(f"FP8 per-tensor quantization takes a 2-D weight, got shape {list(weight.shape)}")
    x = weight.float()
    amax = x.abs().amax() if x.numel() else torch.zeros((), device=x.device)
    scale = (amax / FP8_MAX).reshape(1)
    bound = torch.tensor(FP8_MAX, device=x.device)
    # fmin/fmax ignore NaN as the kernel's fminf/fmaxf do: an all-zero weight (0 * inf) gives 448, as there
    r = torch.fmax(torch.fmin(x * (1.0 / scale), bound), -bound)
    return r.to(FP8), scale


@functools.lru_cache(maxsize=None)
def _vllm_quant():
    """vLLM's ``scaled_fp8_quant`` (its CUDA kernel), or ``None`` where vLLM's custom ops do not import."""
    try:
        from vllm import _custom_ops as ops

        return ops.scaled_fp8_quant
    except Exception as e:  # no vLLM, or a build without custom ops
        logger.warning("vLLM's scaled_fp8_quant is not importable (%s); quantizing with the PyTorch formula", e)
        return None


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's quantization of ``weight``: vLLM's own kernel on CUDA where present (bit for bit what
    its loader stores), else :func:`quantize_reference`."""
    if weight.is_cuda:
        fn = _vllm_quant()
        if fn is not None:
            q, scale = fn(weight.contiguous(), scale=None)
            return q, scale.reshape(1)
    return quantize_reference(weight)


def fp8_problem() -> str | None:
    """Why this vLLM build cannot run an FP8 engine (``None``: it can). vLLM's CPU build (0.32) accepts
    ``quantization="fp8"`` and then fails inside its loader: its FP8 quant kernels are stubs."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        return "vLLM's CPU build has no FP8 weight kernels (its scaled_fp8_quant ops are stubs)"
    if not current_platform.is_cuda():
        return f"FP8 engines are driven on CUDA only here (this vLLM runs on {current_platform.device_type})"
    return None


def check_quantization(quantization: str | None, dtype: str | torch.dtype | None = None) -> None:
    """Refuse an engine quantization this project does not drive, before vLLM starts (``ValueError``)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown engine quantization {quantization!r}; use null (the checkpoint's dtype) or "
                         "'fp8' (vLLM's online FP8 of a bf16/fp16 checkpoint)")
    if quantization is None:
        return
    problem = fp8_problem()
    if problem:
        raise ValueError(f"quantization='fp8' is not available here: {problem}. Run FP8 rollouts on a CUDA GPU, "
                         "or leave quantization unset")
    name = str(dtype).replace("torch.", "") if dtype is not None else "auto"
    if name not in ("auto", "bfloat16", "float16", "half"):
        raise ValueError(f"quantization='fp8' quantizes a bf16/fp16 model (vLLM's FP8 kernels take bf16/fp16 "
                         f"activations); got dtype {name!r}. Use dtype bfloat16")


def is_fp8_linear(module: nn.Module) -> bool:
    """A linear layer holding a per-tensor FP8 weight (vLLM's online FP8)."""
    w, s = getattr(module, "weight", None), getattr(module, "weight_scale", None)
    return isinstance(w, torch.Tensor) and w.dtype == FP8 and w.ndim == 2 and isinstance(s, torch.Tensor) \
        and s.numel() == 1


def out_in(weight: torch.Tensor) -> torch.Tensor:
    """An FP8 linear's weight as ``[out, in]``: vLLM's FP8 GEMM kernels (CUTLASS, PyTorch's) hold it as the
    transposed ``[in, out]`` view of ``[out, in]`` data, which this undoes; a weight held ``[out, in]``
    (contiguous) is returned as it is."""
    transposed = weight.ndim == 2 and weight.shape[0] > 1 and weight.stride() == (1, weight.shape[0])
    return weight.t() if transposed else weight


@dataclass
class Group:
    """The checkpoint tensors one FP8 linear is quantized from: its vLLM parameter (``...weight``), the
    shard names in row order (one name for an unfused linear) and the weight's ``[out, in]`` shape."""

    param: str
    shards: list[str]
    shape: tuple[int, int]


def groups(vmodel: nn.Module, plan: Mapping, spec: Mapping) -> tuple[dict[str, Group], list[str]]:
    """The FP8 linears of vLLM's model and the checkpoint names each is quantized from: ``(checkpoint name →
    its Group, problems)``; ``plan`` is :func:`rollout_sleep.weights.layout.placements`, ``spec`` the checkpoint's
    names → shapes. A problem names a linear whose shards do not tile its weight exactly."""
    modules = dict(vmodel.named_modules())
    by_param: dict[str, list[tuple[int, int, str]]] = {}
    for name, where in plan.items():
        owner, _, leaf = where.param.rpartition(".")
        if leaf == "weight" and where.expert is None and is_fp8_linear(modules.get(owner, nn.Module())):
            by_param.setdefault(where.param, []).append((where.row, where.rows, name))
    out: dict[str, Group] = {}
    problems = []
    for param, rows in by_param.items():
        module = modules[param.rpartition(".")[0]]
        n, k = out_in(module.weight).shape
        rows.sort()
        tiled = [r for r, _, _ in rows] == [sum(x for _, x, _ in rows[:i]) for i in range(len(rows))] and \
            sum(x for _, x, _ in rows) == n
        cols = {tuple(spec[nm].shape if hasattr(spec[nm], "shape") else spec[nm])[1:] for _, _, nm in rows}
        if not tiled or cols != {(k,)}:
            problems.append(f"{param}: its checkpoint shards {[nm for _, _, nm in rows]} do not tile its FP8 "
                            f"weight [{n}, {k}]")
            continue
        g = Group(param, [nm for _, _, nm in rows], (n, k))
        out.update({nm: g for nm in g.shards})
    return out, problems


def engine_tensors(vmodel: nn.Module, param: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight as [out, in] fp8, weight_scale [1])`` of an FP8 linear: writable views of what it holds."""
    module = vmodel.get_submodule(param.rpartition(".")[0])
    return out_in(module.weight.data), module.weight_scale.data


class Assembler:
    """Collects the shards of each FP8 linear as a stream passes; :meth:`add` returns ``(group, [out, in]
    bf16 weight)`` once a linear's last shard arrived (``None`` before)."""

    def __init__(self, fp8_groups: Mapping[str, Group]):
        self.groups = fp8_groups
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> tuple[Group, torch.Tensor] | None:
        g = self.groups[name]
        got = self.pending.setdefault(g.param, {})
        got[name] = tensor
        if len(got) < len(g.shards):
            got[name] = tensor.detach().clone()  # held past its item: a ZeRO-3 gather frees it after its bucket
            return None
        del self.pending[g.param]
        parts = [got[n] for n in g.shards]
        return g, parts[0] if len(parts) == 1 else torch.cat(parts)

    def unfinished(self) -> list[str]:
        """FP8 linears some of whose shards were given but not all (their engine weights were not written)."""
        return sorted(self.pending)
