"""``train.compile``: regional compilation of the trainer's model. Each repeated block (a transformers model's
decoder layers) is compiled with ``torch.compile`` (inductor) once and the compiled code is reused by every layer,
so the compile stays short; it fuses the elementwise work an eager layer runs one kernel at a time (RMSNorm in
float32, RoPE, SiLU times up, the dtype casts around them).

In place, as accelerate's :func:`accelerate.utils.compile_regions_fsdp2` does (``module.compile()`` on each
block of the repeated ``ModuleList``, found by accelerate's ``is_repeated_blocks``), not
:func:`accelerate.utils.compile_regions`: that one returns a shallow copy of the model whose blocks are
``OptimizedModule`` wrappers, and every parameter name gains ``_orig_mod.``
(``model.layers.0._orig_mod.self_attn.q_proj.weight``): the names the sync, ``verify``, the LoRA adapter's push
and the checkpoints go by. In place, the model stays the same object with the same names and parameter
tensors: nothing is copied (with ``model.share_weights`` the parameters stay views of vLLM's weights), the
compiled code takes the parameters as inputs at every call (the optimizer's in-place updates are seen), and the
hooks that DDP, FSDP2 (``fully_shard`` after it: accelerate's own order) and PEFT install still run.
Only the repeated blocks are compiled: ``compile_regions_fsdp2`` also compiles every leaf module outside them
(the embedding, the final norm, the rotary embedding, the LM head), each on its own graph, where compiling gains
little; a compiled LM head would also turn off the fused LM head of
:func:`rollout_sleep.grpo.logprobs.completion_logprobs` (it refuses a compiled head: the ``[batch, n, vocab]``
logits and their gradient would come back).
Gradient checkpointing stays outside the compiled block (transformers' checkpoint wraps the block's call), so
the backward recomputes a block with the compiled code.

Refused (before anything starts, :func:`launch_problem`): DeepSpeed (ZeRO-3 gathers each parameter in hooks
on every submodule, which would break every block's graph into pieces; accelerate compiles a DeepSpeed
engine's module its own way, after ``deepspeed.initialize``, which this recipe does not wire) and FSDP version 1
(it flattens the parameters under the compiled blocks after the compile; only FSDP2 is accelerate's in-place
order).
"""

from __future__ import annotations

from torch import nn


def launch_problem(distributed_type: str, fsdp_version: int | None = None) -> str | None:
    """Why ``train.compile=true`` cannot run under accelerate's ``distributed_type`` (``None``: it can)."""
    if distributed_type == "DEEPSPEED":
        return ("train.compile=true with accelerate's DEEPSPEED: accelerate compiles a DeepSpeed engine's module "
                "its own way, after deepspeed.initialize, which this recipe does not wire (and ZeRO-3's per-submodule "
                "gathers would break each compiled block into pieces): launch with DDP or FSDP2 "
                "(configs/accelerate/ddp.yaml, fsdp2.yaml), or set train.compile=false")
    if distributed_type == "FSDP" and fsdp_version is not None and fsdp_version != 2:
        return (f"train.compile=true with FSDP version {fsdp_version}: only FSDP2 (fsdp_version: 2, "
                "configs/accelerate/fsdp2.yaml) keeps the blocks compiled in place under its hooks: use FSDP2, or set "
                "train.compile=false")
    return None


def compiled_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` compiled in place (``module.compile()``), outermost first."""
    return [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]


def _outermost_repeated(module: nn.Module) -> list[nn.Module]:
    """The repeated module lists of ``module`` (``ModuleList``) not inside another one (a decoder's layers, not an MoE layer's
    experts), in module order."""
    from accelerate.utils.other import is_repeated_blocks

    if is_repeated_blocks(module):
        return [module]
    return [found for child in module.children() for found in _outermost_repeated(child)]


def compile_model(model: nn.Module, **compile_kwargs) -> str:
    """Compile ``model``'s repeated blocks (its decoder layers) in place, and nothing outside them (the LM head
    stays eager: the fused head takes it), before accelerate prepares it; returns what was compiled, as a line for
    the log. ``compile_kwargs`` go to ``torch.compile``. ``ValueError`` where the model has no repeated block
    (nothing regional to compile)."""
    lists = _outermost_repeated(model)
    if not lists:
        raise ValueError(f"train.compile=true: {type(model).__name__} has no repeated blocks (a ModuleList of one "
                         "class) to compile regionally; set train.compile=false")
    for blocks in lists:
        for block in blocks:
            block.compile(**compile_kwargs)  # in place: names, tensors and hooks stay the model's
    blocks = sum(len(m) for m in lists)
    kinds = sorted({type(b).__name__ for m in lists for b in m})
    return (f"train.compile: {blocks} {'/'.join(kinds)} blocks compiled in place (torch.compile, regional: one "
            f"compiled code for every block); the first steps compile, and once more when the sequence lengths change")
