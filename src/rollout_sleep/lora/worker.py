"""The worker side of :class:`~rollout_sleep.lora.adapter.AdapterSync`: functions run on vLLM's workers through
``collective_rpc`` to build a vLLM ``LoRAModel`` from in-memory tensors, install it in a slot and find the
slot's buffers. vLLM has no public API for an in-memory adapter, so these read its worker's adapter manager
(``lora_manager`` / ``_adapter_manager``): the one place in the project that does."""

from __future__ import annotations

from typing import Any

import torch


def adapter_manager(worker) -> Any:
    runner = worker.model_runner
    lm = getattr(runner, "lora_manager", None)
    if lm is None:  # another model runner: its worker-side adapter manager under another attribute
        lm = next((v for v in vars(runner).values() if type(v).__name__.endswith("WorkerLoRAManager")), None)
    if lm is None:
        raise RuntimeError("the engine has no LoRA manager: start it with enable_lora=True "
                           "(LoraSettings.engine_kwargs())")
    return lm


def naming_mapper(mapper):
    """The model's checkpoint→vLLM weight-name mapper reduced to what naming adapter modules needs: renames
    kept, stacked maps (``q_proj`` → ``qkv_proj``, ``gate_proj`` → ``gate_up_proj``) dropped, so that each
    projection's adapter keeps its own name and vLLM packs them into the fused module's slices itself (as its
    worker does for an adapter read from disk). vLLM names this ``get_rename_mapper`` (0.32) or
    ``get_unstacked_mapper`` (0.26); a mapper with neither has its stacked maps dropped here. The whole mapper
    would put q/k/v onto one ``qkv_proj`` module: the last wins and the packed slot cannot take it."""
    if mapper is None:
        return None
    for method in ("get_rename_mapper", "get_unstacked_mapper"):
        reduce = getattr(mapper, method, None)
        if callable(reduce):
            return reduce()
    if getattr(mapper, "orig_to_new_stacked", None):
        import copy

        mapper = copy.copy(mapper)
        mapper.orig_to_new_stacked = {}
    return mapper


def check_distinct_modules(tensors: dict[str, torch.Tensor], mapper) -> None:
    """Raise (before vLLM's adapter state is touched) when two adapter modules get one vLLM module name: vLLM
    would keep one of them and serve an adapter that is not the trainer's."""
    from vllm.lora.utils import parse_fine_tuned_lora_name

    where: dict[str, list[str]] = {}
    for name in tensors:
        if name.endswith(".lora_A.weight"):
            where.setdefault(parse_fine_tuned_lora_name(name, mapper)[0], []).append(name[:-len(".lora_A.weight")])
    merged = {vllm_name: peft for vllm_name, peft in where.items() if len(peft) > 1}
    if merged:
        vllm_name, peft = next(iter(merged.items()))
        raise RuntimeError(f"vLLM's weight-name mapper puts {len(peft)} adapter modules ({', '.join(peft)}) onto one "
                           f"module {vllm_name} ({len(merged)} such case(s)): the stacked maps of the model's "
                           "hf_to_vllm_mapper were not dropped (rollout_sleep.lora.worker.naming_mapper does not know "
                           "this vLLM's mapper)")


def build_lora_model(lm, lora_id: int, tensors: dict[str, torch.Tensor], config: dict):
    """On the worker: a vLLM ``LoRAModel`` of the trainer's adapter, built from in-memory tensors the way
    vLLM's worker builds one from a checkpoint (its PEFT helper, the model's renames, its LoRA dtype)."""
    import inspect

    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    patterns = [k for k in ("rank_pattern", "alpha_pattern") if config.get(k)]
    if patterns and not hasattr(PEFTHelper, "get_rank_and_scaling"):  # vLLM 0.26: one rank/alpha for all
        raise ValueError(f"the adapter sets {' and '.join(patterns)}, which this vLLM's LoRA ignores (one rank and "
                         "alpha for every module: it would serve another adapter): use one rank and alpha")
    helper = PEFTHelper.from_dict(dict(config))
    helper.validate_legal(lm.lora_config)
    mapper = naming_mapper(getattr(lm._adapter_manager.model, "hf_to_vllm_mapper", None))
    check_distinct_modules(tensors, mapper)
    kwargs = dict(device=str(lm.device), dtype=lm.lora_config.lora_dtype,
                  model_vocab_size=getattr(lm, "vocab_size", None), weights_mapper=mapper)
    accepted = inspect.signature(LoRAModel.from_lora_tensors).parameters  # versions differ in what they take
    kwargs = {k: v for k, v in kwargs.items() if k in accepted and v is not None}
    # vLLM scales lora_b in place (``optimize``): it must never hold the trainer's own tensors
    return LoRAModel.from_lora_tensors(lora_id, {k: v.detach().clone() for k, v in tensors.items()}, helper,
                                       **kwargs)


def install_adapter(worker, lora_id: int, tensors: dict[str, torch.Tensor], config: dict) -> list[int]:
    """On the worker: build a LoRAModel from in-memory tensors (vLLM's own path), replace any adapter held,
    and activate it in a slot (vLLM packs q/k/v and gate/up into the fused modules' slices as it adds it).
    Returns the adapter ids now held."""
    lm = adapter_manager(worker)
    am = lm._adapter_manager
    lora = build_lora_model(lm, lora_id, tensors, config)
    am.remove_all_adapters()
    am.add_adapter(lora)
    am.activate_adapter(lora_id)
    return sorted(am.list_adapters())


def adapter_slots(worker, lora_id: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """On the worker: the slot buffers holding adapter ``lora_id``: vLLM module name → one (A, B) pair of
    views per packed slice (q/k/v of ``qkv_proj``, gate/up of ``gate_up_proj``), each ``[max_rank, in]`` /
    ``[out, max_rank]``."""
    am = adapter_manager(worker)._adapter_manager
    index = list(am.lora_index_to_id).index(lora_id)
    out = {}
    for name, module in am.modules.items():
        a, b = getattr(module, "lora_a_stacked", None), getattr(module, "lora_b_stacked", None)
        if not isinstance(a, (tuple, list)) or not isinstance(b, (tuple, list)) or len(a) != len(b):
            continue
        if any(t.ndim != 4 for t in (*a, *b)):
            continue
        out[name] = [(ta[index, 0], tb[index, 0]) for ta, tb in zip(a, b)]
    return out


def packed_modules(worker) -> dict[str, list[str]]:
    am = adapter_manager(worker)._adapter_manager
    return {k: list(v) for k, v in (getattr(am, "packed_modules_mapping", None) or {}).items()}
