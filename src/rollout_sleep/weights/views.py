"""A trainer whose parameters are the engine's own weight memory, and the proof that the weights are held once.

:func:`model_on_views` builds a transformers model on the meta device and binds every parameter to a given
tensor (a view into vLLM's parameters: rows of a fused ``qkv_proj`` / ``gate_up_proj``, the real rows of a
padded embedding), so nothing of the model is allocated twice. Frozen, it is a LoRA trainer's base; trainable,
the optimizer updates vLLM's weights in place and a sync moves nothing.

:func:`coverage_problems` is the one-copy invariant, checked from addresses alone (no tensor is read): every
byte of the engine's weights that the checkpoint fills lies under exactly one trainer parameter, and every
trainer parameter lies inside the engine's weights.

Example:
    >>> import torch
    >>> engine = {"w": (0, 16)}                           # one engine parameter: bytes [0, 16)
    >>> coverage_problems(engine, {"a": (0, 8), "b": (8, 16)}, {"w": 16})
    []
    >>> coverage_problems(engine, {"a": (0, 8), "b": (4, 16)}, {"w": 16})[0]
    'b overlaps a (bytes 4..8 of w are written twice)'
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .spec import EMBEDDING, HEAD, ties_head

Span = tuple[int, int]  # [start, end) byte addresses


def model_on_views(config, targets: Mapping[str, torch.Tensor], dtype: torch.dtype, *,
                   trainable: bool = False) -> nn.Module:
    """A transformers causal LM of ``config`` whose parameters are the given tensors (checkpoint name → tensor;
    a tied head may be left out: it is the embedding), built on the meta device so that nothing of the model
    is allocated; rotary tables are computed on the tensors' device. ``trainable``: the parameters require
    grad and the model is in train mode (an optimizer then writes into the given tensors)."""
    from transformers import AutoModelForCausalLM

    from .checkpoints import init_nonpersistent_buffers

    tied = ties_head(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    problems = []
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        view = targets.get(name)
        if view is None and name == HEAD and tied:
            view = targets.get(EMBEDDING)
        if view is None:
            problems.append(f"{name}: no tensor for it")
            continue
        if tuple(view.shape) != tuple(p.shape) or view.dtype != p.dtype:
            problems.append(f"{name}: given {tuple(view.shape)} {view.dtype}, the model wants "
                            f"{tuple(p.shape)} {p.dtype}")
            continue
        if trainable and not view.is_contiguous():
            problems.append(f"{name}: the view is not contiguous (an optimizer's fused kernels need it)")
            continue
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(view, requires_grad=trainable))
    if problems:
        raise ValueError("cannot build the trainer from vLLM's weights: " + "; ".join(problems[:8]))
    if tied:
        model.tie_weights()
    init_nonpersistent_buffers(model, next(iter(targets.values())).device)
    model.requires_grad_(trainable)
    return model.train() if trainable else model.eval()


def span(t: torch.Tensor) -> Span:
    """The bytes ``t`` spans in memory (contiguous tensors: exactly the ones it holds)."""
    start = t.data_ptr()
    return start, start + t.numel() * t.element_size()


def model_spans(model: nn.Module, *, trainable_only: bool = False) -> dict[str, Span]:
    """Each distinct parameter of ``model`` (a tied head once) → its span."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        out[name] = span(p)
    return out


def coverage_problems(engine: Mapping[str, Span], trainer: Mapping[str, Span],
                      expected: Mapping[str, int]) -> list[str]:
    """What breaks the one-copy invariant, from addresses alone (empty: the weights are held once).

    ``engine``: vLLM parameter → span; ``trainer``: trainer parameter → span; ``expected``: vLLM parameter →
    the bytes the checkpoint fills in it (a padded embedding's real rows; parameters left out need no cover).
    A trainer parameter outside every engine parameter is a second copy; two that overlap write the same
    weights twice; an engine parameter covered by fewer bytes than expected keeps stale weights."""
    problems: list[str] = []
    owners = sorted((lo, hi, name) for name, (lo, hi) in engine.items())
    starts = [lo for lo, _, _ in owners]
    covered: dict[str, int] = {}
    placed: list[tuple[int, int, str, str]] = []
    import bisect

    for name, (lo, hi) in trainer.items():
        i = bisect.bisect_right(starts, lo) - 1
        if i < 0 or not (owners[i][0] <= lo and hi <= owners[i][1]) or hi == lo:
            problems.append(f"{name} is not inside vLLM's weights (a second copy: the engine never sees its updates)")
            continue
        placed.append((lo, hi, name, owners[i][2]))
        covered[owners[i][2]] = covered.get(owners[i][2], 0) + hi - lo
    placed.sort()
    for (lo0, hi0, a, owner), (lo1, hi1, b, _) in zip(placed, placed[1:]):
        if lo1 < hi0:
            problems.append(f"{b} overlaps {a} (bytes {lo1 - engine[owner][0]}..{hi0 - engine[owner][0]} of "
                            f"{owner} are written twice)")
    for name, nbytes in expected.items():
        have = covered.get(name, 0)
        if have != nbytes:
            problems.append(f"{name}: the trainer covers {have} of its {nbytes} bytes (the rest would stay stale)")
    return problems
