"""One copy of the base on the GPU: a LoRA trainer whose frozen base parameters are views of the colocated
engine's weight tensors (CUDA, TP=1), built directly (:func:`trainer_from_engine`) or by rebinding a trainer
that loaded its own base (:func:`share_base`), and the proof (:func:`shares_storage_with_engine`)."""

from __future__ import annotations

import torch
from torch import nn

from rollout_sleep.weights.spec import EMBEDDING, HEAD

from rollout_sleep.weights.views import model_on_views

from .adapter import LoraSettings


def trainer_from_engine(engine, settings: LoraSettings, *, gradient_checkpointing: bool = False) -> nn.Module:
    """A PEFT model whose frozen base parameters are views of the engine's weight tensors (CUDA, TP=1): the
    base is held once on the GPU. Only the adapter (created by PEFT on the GPU) is the trainer's own.

    The model is built on the meta device from the checkpoint's config, then every base parameter is bound to
    the part of vLLM's parameter that holds it (fused ``qkv_proj`` / ``gate_up_proj`` rows are contiguous
    slices; a tied head is the embedding). Rotary tables are computed on the GPU. Raises where a parameter
    has no exact view (``engine.loader.why_not_direct()`` names why)."""
    from transformers import AutoConfig

    if not engine.on_cuda:
        raise ValueError("sharing the base with vLLM needs CUDA: vLLM's CPU kernels repack linear weights "
                         "(build the trainer with from_pretrained + get_peft_model there)")
    why = engine.loader.why_not_direct()
    if why is not None:
        raise ValueError(f"the trainer cannot view vLLM's weights exactly: {why}")
    model = model_on_views(AutoConfig.from_pretrained(engine.model_path), engine.loader.direct_targets(),
                           engine.dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    engine.pin_weights("the LoRA trainer's frozen base is a view of them")
    from peft import get_peft_model

    return get_peft_model(model, settings.peft_config())


def shares_storage_with_engine(engine, model: nn.Module) -> tuple[int, int]:
    """(base parameters of ``model`` whose memory lies inside one of vLLM's parameters, base parameters in
    all): the proof the base is held once."""
    spans = engine.run_on_model(lambda vm: [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size())
                                            for p in vm.parameters()])
    n = shared = 0
    for name, p in model.named_parameters():
        if p.requires_grad or ".lora_" in name:
            continue
        n += 1
        ptr = p.data_ptr()
        shared += any(lo <= ptr < hi for lo, hi in spans)
    return shared, n


def share_base(engine, model: nn.Module) -> int:
    """Rebind the trainer's frozen base parameters (a PEFT model that loaded its own base, on the GPU or in host
    memory) to views of the engine's weights, after checking they hold the same values: the trainer's copy is
    then free memory and the base is held once (CUDA, TP=1). Returns the bytes the trainer no longer holds."""
    from rollout_sleep.weights.stream import WeightStream

    if not engine.on_cuda:
        raise ValueError("sharing the base with vLLM needs CUDA: vLLM's CPU kernels repack linear weights")
    why = engine.loader.why_no_views()  # every value is compared below: a layout the tests do not check is proven
    if why is not None:
        raise ValueError(f"the trainer cannot view vLLM's weights exactly: {why}")
    targets = engine.loader.direct_targets()
    stream = WeightStream(model, merge_adapters=False)
    freed, problems, seen = 0, [], set()
    with torch.no_grad():
        for e in stream.entries:
            p = e.param
            if id(p) in seen or p.requires_grad:
                continue
            view = targets.get(e.name)
            if view is None and e.name == HEAD and engine.tied:
                view = targets.get(EMBEDDING)
            if view is None or view.shape != p.shape or view.dtype != p.dtype \
                    or not torch.equal(view, p.to(view.device)):  # p may wait in host memory (lora_engine)
                problems.append(e.name)
                continue
            seen.add(id(p))
            if p.data_ptr() != view.data_ptr():
                freed += p.numel() * p.element_size()
                p.data = view
    if problems:
        unchecked = engine.loader.why_not_direct()  # e.g. a model type whose vLLM layout reorders under the name
        raise ValueError(f"{len(problems)} base tensor(s) of the trainer differ from the engine's (or have no exact "
                         f"place in it), e.g. {problems[:4]}: load the same checkpoint on both sides"
                         + (f"; or vLLM holds them in another layout ({unchecked})" if unchecked else ""))
    engine.pin_weights("the LoRA trainer's frozen base is a view of them")
    return freed
