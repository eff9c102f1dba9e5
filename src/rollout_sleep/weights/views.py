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
    the bytes the checkpoint fills in it, from its start (a padded embedding's real rows, its padding after them;
    parameters left out need no cover). A trainer parameter outside every engine parameter is a second copy; two
    that overlap write the same weights twice; one in an engine parameter's padding trains bytes vLLM never
    reads; an engine parameter covered by other than the bytes expected keeps stale weights. An empty trainer
    parameter holds nothing (no copy, no cover)."""
    problems: list[str] = []
    owners = sorted((lo, hi, name) for name, (lo, hi) in engine.items())
    starts = [lo for lo, _, _ in owners]
    covered: dict[str, int] = {}
    placed: list[tuple[int, int, str, str]] = []
    import bisect

    for name, (lo, hi) in trainer.items():
        if hi == lo:
            continue
        i = bisect.bisect_right(starts, lo) - 1
        if i < 0 or not (owners[i][0] <= lo and hi <= owners[i][1]):
            problems.append(f"{name} is not inside vLLM's weights (a second copy: the engine never sees its updates)")
            continue
        owner_lo, owner = owners[i][0], owners[i][2]
        if owner in expected and hi - owner_lo > expected[owner]:
            problems.append(f"{name} lies past the {expected[owner]} bytes of {owner} the checkpoint fills (bytes "
                            f"{max(lo - owner_lo, expected[owner])}..{hi - owner_lo} are padding vLLM never reads)")
        placed.append((lo, hi, name, owner))
        covered[owner] = covered.get(owner, 0) + hi - lo
    placed.sort()
    reach, widest = None, None  # the furthest end so far, and whose: an overlap with any earlier parameter shows
    for lo, hi, name, owner in placed:
        if reach is not None and lo < reach:
            base = engine[owner][0]
            problems.append(f"{name} overlaps {widest} (bytes {lo - base}..{min(hi, reach) - base} of {owner} are "
                            "written twice)")
        if reach is None or hi > reach:
            reach, widest = hi, name
    for name, nbytes in expected.items():
        have = covered.get(name, 0)
        if have < nbytes:
            problems.append(f"{name}: the trainer covers {have} of its {nbytes} bytes (the rest would stay stale)")
        elif have > nbytes:
            problems.append(f"{name}: the trainer covers {have} bytes of it, the checkpoint fills {nbytes} (bytes "
                            "written twice, or padding trained)")
    return problems


# ------------------------------------------------------------------------------------- checkpoints of views
# A trainer on views holds several parameters in one storage (q/k/v rows of a fused qkv_proj, gate/up rows of a
# gate_up_proj; a padded embedding's real rows). safetensors, and accelerate's save_state on top of it, take
# tensors that share a storage for aliases of one another: save_state keeps the first name of each storage and
# drops the others (k_proj and v_proj, up_proj: never written), and safetensors' load_model refuses a model
# whose parameters do not each cover their whole storage. These two functions give such a model a checkpoint
# that holds every tensor, and load it back in place (into the engine's memory).

def _extent(t: torch.Tensor) -> tuple:
    return t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype


def _storage(t: torch.Tensor) -> tuple:
    return t.device, t.untyped_storage().data_ptr()


def _tensors(state: Mapping[str, object]) -> dict[str, torch.Tensor]:
    return {n: t for n, t in state.items() if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.numel()}


def whole_views(state: dict) -> list[str]:
    """Give each tensor of ``state`` (a state dict, changed in place) that shares its storage with another tensor
    of another extent a host copy of its own, so that a saver that drops aliases (accelerate's ``save_state``,
    safetensors) keeps it; names of one extent (a tied head) keep one copy between them, and stay aliases.
    Returns the names copied."""
    tensors = _tensors(state)
    by_storage: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        by_storage.setdefault(_storage(t), []).append(name)
    copied = []
    for names in by_storage.values():
        if len({_extent(tensors[n]) for n in names}) < 2:
            continue
        copies: dict[tuple, torch.Tensor] = {}
        for n in names:
            t = tensors[n]
            key = _extent(t)
            if key not in copies:
                copies[key] = torch.empty(t.shape, dtype=t.dtype, device="cpu").copy_(t.detach())
            state[n] = copies[key]
            copied.append(n)
    return copied


def partial_views(model: nn.Module) -> list[str]:
    """The names of ``model``'s state whose tensor does not cover its whole storage (a view: safetensors'
    ``load_model`` refuses such a model)."""
    return [n for n, t in _tensors(model.state_dict()).items()
            if t.data_ptr() != t.untyped_storage().data_ptr()
            or t.numel() * t.element_size() != t.untyped_storage().nbytes()]


def load_in_place(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy a saved state into ``model``'s tensors where they are (views stay views). Every tensor must be given,
    except an alias of a given one (a tied head); a name ``model`` does not have is refused. ``source`` names the
    file in messages."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    given = {_extent(own[n]) for n in state if n in own and isinstance(own[n], torch.Tensor)}
    missing = [n for n in missing if not (isinstance(own[n], torch.Tensor) and _extent(own[n]) in given)]
    if missing or unexpected:
        said = ([f"missing {len(missing)} tensor(s), e.g. {missing[:3]}"] if missing else []) + \
               ([f"{len(unexpected)} unknown tensor(s), e.g. {unexpected[:3]}"] if unexpected else [])
        raise RuntimeError(f"{source} does not hold this model's weights: {'; '.join(said)}. A checkpoint saved "
                           "before views were saved whole lacks the k/v/up rows of each fused tensor: resume from "
                           "one saved with this version, or start a new run")
