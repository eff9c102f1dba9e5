"""Trainer → engine: walk the trainer's parameters as users really hold them, stream them in bounded
buckets (the proof that the engine holds exactly them: :mod:`rollout_sleep.weights.verify`).

Supported trainer models: a plain ``nn.Module`` / ``PreTrainedModel``; wrapped by DDP / accelerate /
``torch.compile`` (unwrapped); FSDP2 (``fully_shard``: DTensor parameters gathered bucket by bucket);
DeepSpeed ZeRO-3 (partitioned parameters gathered bucket by bucket); PEFT LoRA (the merged weight is
pushed under the base name, the adapter stays unmerged in the trainer). Parameters that transformers
holds in another layout than its checkpoints (MoE experts fused in memory) are pushed under their
checkpoint names, as ``save_pretrained`` would write them. Buffers (rotary tables) are not weights vLLM
loads and are skipped with a reason.

Example:
    >>> stream = WeightStream(model, dtype=engine.dtype)         # doctest: +SKIP
    >>> engine.wake_up(weights=stream)                            # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .spec import EMBEDDING, HEAD, ties_head


_PEFT_PREFIX = "base_model.model."


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP / accelerate / ``torch.compile`` wrappers (``module.`` and ``_orig_mod.`` prefixes)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in (
                "DistributedDataParallel", "DataParallel", "DeepSpeedEngine"):
            model = model.module
        else:
            return model


def is_peft(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model (an adapter over a base model)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _full_shape(p: torch.Tensor) -> tuple[int, ...]:
    if hasattr(p, "ds_shape"):  # DeepSpeed ZeRO-3 partitioned parameter
        return tuple(p.ds_shape)
    return tuple(p.shape)  # DTensor reports its global shape


@dataclass
class _Entry:
    name: str  # checkpoint name pushed to vLLM (the in-memory name where ``outputs`` is set)
    param: torch.Tensor
    lora: nn.Module | None = None  # PEFT LoRA layer whose delta is added to ``param``
    outputs: dict[str, tuple[int, ...]] | None = None  # checkpoint names → shapes this parameter is saved as


def _tied_embedding(base: nn.Module, entries: list[_Entry]) -> _Entry | None:
    """The entry of the input embedding a tied head shares: found through the model's own
    ``get_input_embeddings`` (``model.embed_tokens`` / OPT's ``model.decoder.embed_tokens`` / GPT-2's
    ``transformer.wte``), else by Llama-style name."""
    try:
        weight = base.get_input_embeddings().weight
    except Exception:
        weight = None
    return next((e for e in entries if weight is not None and e.param is weight), None) or \
        next((e for e in entries if e.name == EMBEDDING), None)


def checkpoint_layout(model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """For parameters that transformers holds in another layout than its checkpoints (transformers 5 fuses
    MoE experts in memory: ``mlp.experts.gate_up_proj`` [experts, 2 x inter, hidden]), the checkpoint names
    and shapes each is saved as, from transformers' own conversion mapping (what ``save_pretrained``
    reverts). Empty for models saved as they are held."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # older transformers: no conversions, names are the checkpoint's
        return {}
    try:
        from transformers.core_model_loading import PrefixChange
    except ImportError:
        PrefixChange = ()  # noqa: N806
    try:
        try:
            conversions = get_model_conversion_mapping(model, add_legacy=False)
        except TypeError:  # a transformers without the legacy switch
            conversions = get_model_conversion_mapping(model)
    except Exception:  # not a transformers model
        return {}
    if not [c for c in conversions or () if not isinstance(c, PrefixChange)]:
        return {}
    out = {}
    for name, p in model.named_parameters():
        reverted = revert_weight_conversion(model, {name: torch.empty(_full_shape(p), device="meta")})
        if list(reverted) != [name]:
            out[name] = {n: tuple(t.shape) for n, t in reverted.items()}
    return out


class WeightStream:
    """The trainer's weights as ``(checkpoint name, tensor)`` pairs, gathered and cast bucket by bucket.

    Knows its names, shapes and dtypes before any gather (:meth:`spec`), so the engine validates a
    sync before touching its weights. Iterate it once per sync, on every rank (gathers are collective).

    Args:
        model: the trainer's model (plain, DDP/accelerate-wrapped, FSDP2, ZeRO-3 or PEFT).
        dtype: *optional*, cast to this dtype (the engine's) inside each bucket.
        bucket_bytes: *optional*, at most this many bytes gathered/cast at once (default 512 MiB).
        include_tied_head: *optional*, also push ``lm_head.weight`` of a tied model (vLLM's CPU kernels
            keep their own copy of the head; on GPU it is skipped by the engine).
        merge_adapters: *optional*, a PEFT model's LoRA delta merged into each base weight (``True``: an engine
            without LoRA) or the base weights alone (``False``: an engine that serves the adapter itself,
            :mod:`rollout_sleep.lora.adapter`).
    """

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None, bucket_bytes: int = 512 << 20,
                 include_tied_head: bool = True, merge_adapters: bool = True):
        self.model = unwrap(model)
        self.merge_adapters = merge_adapters
        self.dtype = dtype
        self.bucket_bytes = int(bucket_bytes)
        self.skipped: dict[str, str] = {}
        self.entries = self._walk(include_tied_head)
        self.peak_bucket_bytes = 0
        self._spec: dict | None = None
        self._buckets: list[list[_Entry]] | None = None

    def _walk(self, include_tied_head: bool) -> list[_Entry]:
        model = self.model
        peft = is_peft(model)
        entries: list[_Entry] = []
        modules = dict(model.named_modules())
        for name, p in model.named_parameters():
            if peft:
                if ".lora_" in name or ".original_module." in name:
                    continue
                module_name = name.rpartition(".")[0]
                lora = None
                if ".base_layer." in name:
                    owner = modules[module_name.rpartition(".")[0]]
                    lora = owner if self.merge_adapters and not getattr(owner, "merged", False) else None
                name = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
                if name.startswith(_PEFT_PREFIX):
                    name = name[len(_PEFT_PREFIX):]
                entries.append(_Entry(name, p, lora))
            else:
                entries.append(_Entry(name, p))
        if not peft:
            converted = checkpoint_layout(model)
            for e in entries:
                e.outputs = converted.get(e.name)
        for bname, _ in model.named_buffers():
            self.skipped[bname] = "buffer: not a checkpoint weight (vLLM computes it itself)"
        names = {e.name for e in entries}
        base = model.get_base_model() if peft else model
        config = getattr(base, "config", None)
        tied = ties_head(config)
        embedding = _tied_embedding(base, entries) if tied else None
        if embedding is not None and HEAD not in names:
            if include_tied_head:  # under the checkpoint's head name, whatever the embedding is called
                entries.append(_Entry(HEAD, embedding.param, None))
            else:
                self.skipped[HEAD] = f"tied to {embedding.name}"
        return entries

    def spec(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Checkpoint names → (full shape, dtype pushed), without gathering anything."""
        if self._spec is None:
            spec = {}
            for e in self.entries:
                for name, shape in (e.outputs or {e.name: _full_shape(e.param)}).items():
                    spec[name] = (shape, self.dtype or e.param.dtype)
            self._spec = spec
        return self._spec

    def buckets(self) -> list[list[_Entry]]:
        if self._buckets is None:
            self._buckets = self._make_buckets()
        return self._buckets

    def _make_buckets(self) -> list[list[_Entry]]:
        out, cur, size = [], [], 0
        for e in self.entries:
            nbytes = int(torch.Size(_full_shape(e.param)).numel()) * (self.dtype or e.param.dtype).itemsize
            if cur and size + nbytes > self.bucket_bytes:
                out.append(cur)
                cur, size = [], 0
            cur.append(e)
            size += nbytes
        if cur:
            out.append(cur)
        return out

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in self.buckets():
            with _gathered([e.param for e in bucket]):
                tensors, extra = [], 0
                for e in bucket:
                    t = self._materialize(e)
                    if not _shares_storage(t, e.param):
                        extra += t.numel() * t.element_size()
                    if e.outputs is None:
                        tensors.append((e.name, t))
                    else:  # checkpoint layout (per-expert tensors), as save_pretrained writes it
                        from transformers.core_model_loading import revert_weight_conversion

                        parts = revert_weight_conversion(self.model, {e.name: t})
                        tensors += [(n, parts[n]) for n in e.outputs]
                self.peak_bucket_bytes = max(self.peak_bucket_bytes, extra)
                yield from tensors
                del tensors

    def _materialize(self, e: _Entry) -> torch.Tensor:
        t = e.param.detach()
        if hasattr(t, "full_tensor"):  # FSDP2 / DTensor: gather the full tensor
            t = t.full_tensor()
        if e.lora is not None:
            t = _merged(e.lora, e.name.rpartition(".")[2], t)
        if self.dtype is not None and t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except Exception:
        return False


def _merged(layer: nn.Module, leaf: str, t: torch.Tensor) -> torch.Tensor:
    """The base layer's ``weight`` / ``bias`` (``t``) with the active adapters merged in, as PEFT's ``merge``
    computes it, without touching the layer: plain LoRA adds ``B @ A * scaling``; variants (DoRA) merge
    through PEFT's own ``merge_safe``; ``lora_bias`` adds ``lora_B``'s bias to the base bias."""
    for adapter in layer.active_adapters:
        if adapter not in getattr(layer, "lora_A", {}):
            continue
        if leaf == "bias":
            if getattr(layer, "lora_bias", {}).get(adapter):
                t = t + (layer.lora_B[adapter].bias * layer.scaling[adapter]).to(t.dtype)
            continue
        variant = getattr(layer, "lora_variant", {}).get(adapter)
        t = t + layer.get_delta_weight(adapter).to(t.dtype) if variant is None else \
            variant.merge_safe(layer, adapter, t).to(t.dtype)
    return t


class _gathered:
    """Gather ZeRO-3 partitioned parameters for the duration of a bucket (no-op otherwise)."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = [p for p in params if hasattr(p, "ds_id")]
        self.ctx = None

    def __enter__(self):
        if self.params:
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)

