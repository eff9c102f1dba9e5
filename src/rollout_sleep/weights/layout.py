"""vLLM's weight layout: where each checkpoint tensor lives inside the engine, in one place.

vLLM loads checkpoint-format names (``model.layers.0.self_attn.q_proj.weight``) but stores many of them
elsewhere:

- fused linears (``qkv_proj``, ``gate_up_proj``) declared by the model class's ``packed_modules_mapping``:
  the row-wise concatenation of their shards (weights and biases alike), in packed order;
- checkpoints that are already fused (Phi-3's ``qkv_proj``) load as they are;
- mixture-of-experts layers stack the experts: ``experts.{e}.gate_proj`` / ``up_proj`` (Mixtral ``w1`` /
  ``w3``) are the two halves of expert ``e`` of ``experts.w13_weight`` and ``down_proj`` (``w2``) is expert
  ``e`` of ``experts.w2_weight``;
- a tied LM head is the embedding;
- with tensor parallelism each rank holds a cut of each tensor (:func:`rank_part`);
- vLLM's CPU linears compute with a packed copy made at load time (:func:`effective`); its CPU MoE
  kernel prepacks the stacked experts in place, which cannot be read back (reported as not placed).

The ``direct`` loader writes through :func:`placements` and :func:`views`; ``verify`` reads through
:func:`placements`, :func:`rank_part` and :func:`effective`. A tensor that none of these rules places is
reported by name, never guessed.

Example:
    >>> spec = {"model.layers.0.self_attn.q_proj.bias": (8,), "model.layers.0.self_attn.k_proj.bias": (4,)}
    >>> plan = placements(spec, {"qkv_proj": ["q_proj", "k_proj", "v_proj"]},
    ...                   {"model.layers.0.self_attn.qkv_proj.bias": (16,)}, tied=False)
    >>> plan["model.layers.0.self_attn.k_proj.bias"]
    Placement(param='model.layers.0.self_attn.qkv_proj.bias', row=8, rows=4, expert=None)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .spec import EMBEDDING, HEAD

# Checkpoint names of an expert's projections, per role in vLLM's stacked ``w13`` (gate, up) / ``w2`` (down).
_EXPERT = re.compile(r"^(?P<prefix>.*)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.(?P<leaf>weight|bias)$")
_EXPERT_ROLES = {"gate_proj": ("w13", 0), "w1": ("w13", 0), "up_proj": ("w13", 1), "w3": ("w13", 1),
                 "down_proj": ("w2", 0), "w2": ("w2", 0)}


# transformers model types whose vLLM layout the project checked against what vLLM's own loader holds
# (tests/weights/test_families.py: each checkpoint tensor's view equals the tensor, for every family the model
# factory builds). Elsewhere a name and a shape that match prove nothing: vLLM's loader may hold a tensor
# reordered or transposed under the checkpoint's name and shape (Falcon's and Bloom's fused ``query_key_value``:
# per-head interleaved rows regrouped into q, k, v), so neither a view (``direct``, one copy) nor ``verify``'s
# comparison through :func:`placements` may be trusted there.
CHECKED_MODEL_TYPES = frozenset({"qwen3", "qwen2", "llama", "mistral", "gemma2", "gemma3_text", "phi3", "qwen3_moe",
                                 "mixtral"})


def unchecked_problem(model_type: str | None) -> str | None:
    """Why vLLM's layout of ``model_type`` cannot be trusted name by name (``None``: a checked type)."""
    if model_type in CHECKED_MODEL_TYPES:
        return None
    return (f"vLLM's layout of model type {model_type!r} is not one this project checked against vLLM's loader "
            f"(checked: {', '.join(sorted(CHECKED_MODEL_TYPES))}); its loader may hold a tensor reordered under the "
            "checkpoint's name and shape, as Falcon's and Bloom's fused query_key_value")


@dataclass(frozen=True)
class Placement:
    """Where a checkpoint tensor lives inside vLLM: the parameter, the expert index along its first dim
    (stacked MoE experts, else ``None``) and the rows ``[row, row + rows)`` of that (expert's) slice."""

    param: str
    row: int
    rows: int
    expert: int | None = None


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", x))


def placements(spec: Mapping[str, Any], packed: Mapping[str, list[str]], engine_params: Mapping[str, Any],
               tied: bool, embedding: str = EMBEDDING) -> dict[str, Placement]:
    """Map each checkpoint name of ``spec`` (name → shape or TensorSpec) to where vLLM holds it (TP=1
    layout; ``engine_params``: vLLM parameter name → shape). A tied ``lm_head.weight`` is placed at
    ``embedding`` (the parameter vLLM's head shares, :func:`tied_embedding`). Names no rule places are
    left out (the caller reports them)."""
    out: dict[str, Placement] = {}
    names = list(spec) + ([HEAD] if tied and HEAD not in spec else [])
    embed_rows = _shape(spec[embedding])[0] if embedding in spec else 0
    for name in names:
        rows = _shape(spec[name])[0] if name in spec else embed_rows
        if name in engine_params:
            out[name] = Placement(name, 0, rows)
            continue
        if tied and name == HEAD and embedding in engine_params:
            out[name] = Placement(embedding, 0, rows)
            continue
        where = _expert_placement(name, spec, engine_params) or _packed_placement(name, spec, packed, engine_params)
        if where is not None:
            out[name] = where
    return out


def named_parameters(vmodel: nn.Module) -> dict[str, nn.Parameter]:
    """vLLM's parameters by the names of a model without LoRA: with ``enable_lora`` vLLM wraps each
    adapted layer and the wrapped layer's parameters are ``<layer>.base_layer.<leaf>``; those are the base
    weights, named here as ``<layer>.<leaf>``. (The LoRA slot buffers are not parameters.)"""
    return {n.replace(".base_layer.", "."): p for n, p in vmodel.named_parameters()}


def named_modules(vmodel: nn.Module) -> dict[str, nn.Module]:
    """vLLM's modules by the names of a model without LoRA: a LoRA-wrapped layer's name gives the wrapped
    (base) layer, the one that holds the weights and the CPU kernel that computes with them."""
    out = dict(vmodel.named_modules())
    out.update({n[: -len(".base_layer")]: m for n, m in list(out.items()) if n.endswith(".base_layer")})
    return out


def tied_embedding(vmodel: nn.Module) -> str:
    """The name of the parameter vLLM's tied LM head shares (``model.embed_tokens.weight`` in Llama-style
    models, ``model.decoder.embed_tokens.weight`` in OPT, ``transformer.wte.weight`` in GPT-2)."""
    head = getattr(getattr(vmodel, "lm_head", None), "weight", None)
    found = next((n for n, p in named_parameters(vmodel).items() if head is not None and p is head), None)
    return found or EMBEDDING


def _packed_placement(name: str, spec: Mapping[str, Any], packed: Mapping[str, list[str]],
                      engine_params: Mapping[str, Any]) -> Placement | None:
    module, _, leaf = name.rpartition(".")
    parent, _, sub = module.rpartition(".")
    for fused, shards in packed.items():
        if sub in shards and fused != sub:
            fused_name = f"{parent}.{fused}.{leaf}"
            if fused_name not in engine_params:
                continue
            try:
                row = sum(_shape(spec[f"{parent}.{s}.{leaf}"])[0] for s in shards[: shards.index(sub)])
            except KeyError:  # a shard before this one is not in the checkpoint: its offset is unknown
                return None
            return Placement(fused_name, row, _shape(spec[name])[0])
    return None


def _expert_placement(name: str, spec: Mapping[str, Any], engine_params: Mapping[str, Any]) -> Placement | None:
    m = _EXPERT.match(name)
    if m is None or m["proj"] not in _EXPERT_ROLES:
        return None
    stack, half = _EXPERT_ROLES[m["proj"]]
    prefix = m["prefix"] + ".experts."
    suffix = f"{stack}_{m['leaf']}"
    found = [p for p in engine_params if p.startswith(prefix) and p.rpartition(".")[2] == suffix]
    if len(found) != 1:
        return None
    param, e, rows = found[0], int(m["e"]), _shape(spec[name])[0]
    shape = _shape(engine_params[param])
    if e >= shape[0]:  # expert parallelism / redundant experts: this rank does not hold expert e
        return None
    row = 0
    if half:  # up after gate: offset by the gate's rows
        gate = next((f"{m['prefix']}.experts.{e}.{g}.{m['leaf']}" for g in ("gate_proj", "w1")
                     if f"{m['prefix']}.experts.{e}.{g}.{m['leaf']}" in spec), None)
        if gate is None:
            return None
        row = _shape(spec[gate])[0]
    return Placement(param, row, rows, e)


def fits(plan: Mapping[str, Placement], spec: Mapping[str, Any], engine_params: Mapping[str, Any]) -> list[str]:
    """Names whose placed slice does not fit its vLLM parameter (shape of the slice vs the checkpoint's)."""
    bad = []
    for name, w in plan.items():
        if name not in spec:
            continue
        shape = _shape(engine_params[w.param])
        if w.expert is not None:
            shape = shape[1:]
        want = _shape(spec[name])
        if len(shape) != len(want) or shape[1:] != want[1:] or w.row + w.rows > shape[0]:
            bad.append(name)
    return bad


def filled_bytes(plan: Mapping[str, Placement],
                 engine_params: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, int]:
    """vLLM parameter → the bytes of it the checkpoint fills, from its start (a padded embedding: its real rows, the
    padding after them), each place once (a tied head is the embedding): what a trainer holding the weights once
    must cover exactly.

    >>> plan = {"e": Placement("embed", 0, 10), "lm_head.weight": Placement("embed", 0, 10)}
    >>> filled_bytes(plan, {"embed": ((16, 4), torch.float32)})  # 10 real rows of 16 padded ones, 4 floats each
    {'embed': 160}
    """
    out: dict[str, int] = {}
    seen = set()
    for where in plan.values():
        if (where.param, where.expert, where.row) in seen:
            continue
        seen.add((where.param, where.expert, where.row))
        shape, dtype = engine_params[where.param]
        row = torch.Size(shape[2:] if where.expert is not None else shape[1:]).numel()
        out[where.param] = out.get(where.param, 0) + where.rows * row * dtype.itemsize
    return out


def view(param: torch.Tensor, where: Placement) -> torch.Tensor:
    """The part of vLLM's (raw, TP=1) parameter that holds the checkpoint tensor placed at ``where``."""
    t = param.data if isinstance(param, nn.Parameter) else param
    if where.expert is not None:
        t = t[where.expert]
    return t.narrow(0, where.row, where.rows)


def views(vmodel: nn.Module, plan: Mapping[str, Placement]) -> dict[str, torch.Tensor]:
    """Writable views into vLLM's parameters, one per placed checkpoint name (the ``direct`` loader's
    targets; a tied head shares the embedding's view)."""
    params = named_parameters(vmodel)
    return {name: view(params[w.param], w) for name, w in plan.items()}


def describe(vmodel: nn.Module) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, list[str]], bool]:
    """vLLM's parameters (name → shape, dtype), its ``packed_modules_mapping``, and whether it has an
    ``lm_head`` at all (a tied head may be the embedding module; Gemma has none, and its loader rejects
    ``lm_head.weight``): all the layout needs."""
    return ({n: (tuple(p.shape), p.dtype) for n, p in named_parameters(vmodel).items()},
            {k: list(v) for k, v in (getattr(vmodel, "packed_modules_mapping", {}) or {}).items()},
            hasattr(vmodel, "lm_head"))


def repacked(module: nn.Module) -> bool:
    """vLLM's CPU linears (and LM head) compute with a packed copy of ``weight`` made at load time."""
    return hasattr(module, "cpu_linear") and type(module).__name__ != "VocabParallelEmbedding"


def effective(module: nn.Module, leaf: str, p: torch.Tensor) -> torch.Tensor:
    """The tensor a layer computes with, for its parameter ``leaf``. For vLLM's repacked CPU linears the
    weight is recovered exactly through the layer's own kernel (identity input: every product is w·1 or
    w·0); biases and everything else are read as they are."""
    if leaf == "weight" and repacked(module) and p.ndim <= 2:  # repacked: the parameter itself is empty
        k = p.shape[1] if p.numel() else getattr(module, "input_size_per_partition", None) or module.input_size
        eye = torch.eye(k, dtype=p.dtype, device=p.device)
        return module.cpu_linear(eye, p, None).t()
    return p


def rank_part(module: nn.Module, where: Placement, name: str, want: torch.Tensor,
              packed: Mapping[str, list[str]]) -> tuple[int, torch.Tensor] | None:
    """On a tensor-parallel engine: (row offset in this rank's parameter, the part of the full checkpoint
    tensor ``want`` that this rank holds), cut as vLLM's parallel layers cut it; ``None`` where this
    module's cut is not known here (stacked experts)."""
    if where.expert is not None:
        return None
    kinds = {c.__name__ for c in type(module).__mro__}
    rank = getattr(module, "tp_rank", 0)
    if hasattr(module, "shard_indices"):  # VocabParallelEmbedding / ParallelLMHead: a range of the vocabulary
        si = module.shard_indices
        return 0, want[si.org_vocab_start_index: si.org_vocab_end_index]
    if "RowParallelLinear" in kinds:  # input features split; the bias is whole
        n = module.input_size_per_partition
        return 0, want[:, rank * n: (rank + 1) * n] if want.ndim == 2 else want
    fused = where.param.rpartition(".")[0].rpartition(".")[2]  # the vLLM module's own name, e.g. qkv_proj
    subs = packed.get(fused) or []
    sub = name.split(".")[-2]
    if sub in subs and sub != fused:  # fused: this rank's slice of each shard, concatenated in packed order
        i = subs.index(sub)
        if "QKVParallelLinear" in kinds:
            hs, rep = module.head_size, getattr(module, "num_kv_head_replicas", 1)
            sizes = [module.num_heads * hs, module.num_kv_heads * hs, module.num_kv_heads * hs]
            starts = [rank * sizes[0], (rank // rep) * sizes[1], (rank // rep) * sizes[2]]
        else:  # MergedColumnParallelLinear
            sizes = [o // module.tp_size for o in module.output_sizes]
            starts = [rank * n for n in sizes]
        return sum(sizes[:i]), want[starts[i]: starts[i] + sizes[i]]
    if "ColumnParallelLinear" in kinds:
        if sub == fused and ("QKVParallelLinear" in kinds or "MergedColumnParallelLinear" in kinds):
            return None  # a checkpoint that is already fused: its shards are cut separately (not mapped here)
        n = module.output_size_per_partition
        return 0, want[rank * n: (rank + 1) * n]
    return 0, want  # replicated (norms)


class EngineLayout:
    """The layout of one vLLM model (inside ``apply_model``): where each checkpoint tensor is, and what the
    engine computes with there. Effective tensors are cached per vLLM parameter (one CPU unpacking each).

    Args:
        vmodel: vLLM's model (``worker.model_runner.model``).
        spec: the checkpoint's names → shapes (or TensorSpec).
        tied: the model ties its LM head to the embedding.
        sharded: the engine is tensor parallel (each rank compares its own cut).
    """

    def __init__(self, vmodel: nn.Module, spec: Mapping[str, Any], tied: bool, sharded: bool = False):
        self.params = named_parameters(vmodel)
        self.modules = named_modules(vmodel)
        self.packed = {k: list(v) for k, v in (getattr(vmodel, "packed_modules_mapping", {}) or {}).items()}
        self.plan = placements(spec, self.packed, {n: p.shape for n, p in self.params.items()}, tied,
                               tied_embedding(vmodel))
        self.sharded = sharded
        self._cache: tuple[str, torch.Tensor] | None = None

    def held(self, name: str, want: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | str:
        """(what the engine computes with for checkpoint tensor ``name``, the matching part of ``want``),
        or the reason it cannot be placed."""
        where = self.plan.get(name)
        if where is None:
            return "no vLLM parameter holds it under the known layouts"
        param_name = where.param
        if where.expert is not None and self.params[param_name].device.type == "cpu":
            return ("vLLM's CPU MoE kernel computes with a prepacked copy of the stacked experts, which cannot be "
                    "read back")
        owner, _, leaf = param_name.rpartition(".")
        if name == HEAD and "lm_head" in self.modules and param_name != HEAD:
            owner, leaf = "lm_head", "weight"  # tied: vLLM's head module may compute with its own packed copy
        module = self.modules.get(owner)
        key = f"{owner}.{leaf}"
        if self._cache is None or self._cache[0] != key:
            try:
                self._cache = (key, effective(module, leaf, self.params[param_name]) if module is not None
                               else self.params[param_name])
            except Exception as e:  # a layer whose held weight cannot be read back: named, not guessed
                self._cache = None
                return f"placed in {param_name}, but its held tensor could not be read ({type(e).__name__}: {e})"
        got = self._cache[1]
        if where.expert is not None:
            got = got[where.expert]
        row = where.row
        if self.sharded:
            part = rank_part(module, where, name, want, self.packed)
            if part is None:
                return "its tensor-parallel cut is not known (stacked experts or a pre-fused checkpoint)"
            row, want = part
        if got.ndim != want.ndim or got.shape[1:] != want.shape[1:] or row + want.shape[0] > got.shape[0]:
            return (f"placed in {param_name} (shape {list(got.shape)}) at row {row}, which does not fit a tensor "
                    f"of shape {list(want.shape)}")
        return got.narrow(0, row, want.shape[0]), want
