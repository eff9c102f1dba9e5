"""One line makes TRL's ``GRPOTrainer`` (colocate mode) use rollout_sleep's weight sync::

    trainer = GRPOTrainer(model=..., args=GRPOConfig(use_vllm=True, vllm_mode="colocate", ...), ...)
    rollout_sleep.integrations.trl.patch(trainer)      # the one line
    trainer.train()

Why a ``patch(trainer)`` and not a subclass or a callback: TRL builds its vLLM engine inside
``GRPOTrainer.__init__`` and calls ``trainer.vllm_generation.sync_weights()`` itself before each
generation; no callback runs at that point, and a subclass would have to re-implement ``__init__``. The
engine TRL built is kept; only its sync is replaced (an instance attribute, nothing global), so the patch
works on a trainer built by any script, including subclasses.

With the patch:
- the sync is ours: the parameters the trainer trains, read at each sync from ``trainer.model_wrapped`` (after
  accelerate's ``prepare`` has replaced them for FSDP2; a stream built at ``patch()`` time would push and
  verify the parameters the model had before), the trainer's parameters (plain, DDP/accelerate, FSDP2,
  ZeRO-3, PEFT merged under the base names, a tied ``lm_head.weight`` included) are validated against the
  checkpoint's names, shapes and dtypes, then streamed in buckets through the fastest route that is right
  on this device (direct copies on CUDA, vLLM's layerwise ``reload_weights`` on CPU) instead of TRL's
  per-parameter ``load_weights`` loop;
- the prefix cache is reset after every sync and the result is checked;
- ``verify`` runs every ``verify_every`` syncs (bitwise: the engine holds exactly the trainer's weights);
- vLLM sleeps at ``sleep_level`` (TRL always asks for 2) where sleep mode is enabled;
- ``fast_outputs``: vLLM skips its per-step detokenization and returns flat log-probs (TRL decodes the
  completion ids itself and never reads vLLM's text), unless the config sets stop strings;
- timings go into TRL's logs: ``rollout_sleep/sync_s``, ``rollout_sleep/verify_s``,
  ``rollout_sleep/verify_max_abs_diff`` (and so to W&B with ``report_to="wandb"``).
Several processes (``accelerate launch``, DDP / FSDP2 / ZeRO-3): TRL builds one engine per rank; patch the
trainer on every rank, each rank's engine then gets the full gathered weights at each sync (checked by
``benchmarks/trl_plugin_dist.py``; on CPU accelerate has DeepSpeed only with ``use_cpu=False,
ddp_backend="gloo"`` and no FSDP: see docs/troubleshooting.md).
Server mode (``vllm_mode="server"``) and ``use_vllm=False`` are refused with an error.

LoRA with one copy of the base (a PEFT ``GRPOTrainer``, ``peft_config=...``): build the trainer inside
``lora_engine(rank)`` (TRL's engine then starts with vLLM's LoRA serving) and ``patch(trainer)``. vLLM serves the
trainer's adapter itself: a sync copies only the adapter into vLLM's slot (``rollout_sleep.lora.adapter.AdapterSync``)
and verifies it bitwise, the engine sleeps at level 0 (KV cache only: TRL's ``sleep(level=2)`` is turned into
that) and, on CUDA, the trainer's frozen base is rebound to views of vLLM's weights (one copy on the GPU)::

    with lora_engine(rank=16):
        trainer = GRPOTrainer(model=..., args=GRPOConfig(use_vllm=True, vllm_mode="colocate", ...),
                              peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), ...)
    patch(trainer)
On CPU, use ``vllm_enable_sleep_mode=False`` (vLLM has no sleep allocator there); stock TRL then fails at
its first sync wherever vLLM packs its linear weights for its CPU kernels (oneDNN, the x86 build's default:
its per-parameter load finds an empty ``layer.weight``), the patched trainer runs.
"""

from __future__ import annotations

import contextlib
import numbers
import time

from rollout_sleep.engine.completion import fast_output_kwargs, temperature_problem
from rollout_sleep.engine.engine import Engine
from rollout_sleep.engine.loader import LOAD_METHODS
from rollout_sleep.engine.memory import release_cached_memory
from rollout_sleep.engine.state import check_level
from rollout_sleep.weights.stream import WeightStream
from rollout_sleep.weights.verify import verify


def patch(trainer, *, sleep_level: int = 2, verify_every: int = 1, bucket_bytes: int = 512 << 20,
          load_method: str = "auto", fast_outputs: bool = True):
    """Make ``trainer`` (a TRL ``GRPOTrainer`` in colocate mode) sync and sleep the rollout_sleep way.

    Returns the trainer. Raises ``ValueError`` for configurations it cannot serve.
    """
    args = trainer.args
    if not getattr(args, "use_vllm", False):
        raise ValueError("rollout_sleep.integrations.trl.patch needs GRPOConfig(use_vllm=True)")
    if getattr(args, "vllm_mode", None) != "colocate":
        raise ValueError(f"rollout_sleep.integrations.trl.patch supports vllm_mode='colocate' only, got "
                         f"{args.vllm_mode!r}: in server mode the engine lives in another process; use "
                         "rollout_sleep.serve.server instead")
    _check_arguments(sleep_level, verify_every, bucket_bytes, load_method)
    temperature = getattr(args, "temperature", 1.0)
    if not temperature > 0:  # vLLM samples greedily at 0, but TRL divides the logits by it at its first step
        raise ValueError(f"GRPOConfig.temperature={temperature!r}: TRL scores the completions with the logits divided "
                         "by the temperature, so it must be > 0 (vLLM would sample greedily at 0, then TRL would stop "
                         "at its first training step with 'temperature must be positive'). Set 0.01 or more")
    problem = temperature_problem(temperature, "GRPOConfig.temperature")
    if problem:  # TRL scores at its temperature what vLLM sampled at another
        raise ValueError(problem)
    gen = getattr(trainer, "vllm_generation", None)
    if gen is None or getattr(gen, "llm", None) is None:
        raise ValueError("this GRPOTrainer has no colocated vLLM engine (trainer.vllm_generation.llm)")
    if sleep_level != 2 and not gen.enable_sleep_mode:
        raise ValueError(f"patch(sleep_level={sleep_level}) with GRPOConfig(vllm_enable_sleep_mode=False): vLLM never "
                         "sleeps, so the level would do nothing. Set vllm_enable_sleep_mode=True, or leave sleep_level "
                         "out")
    model = trainer.model_wrapped if getattr(trainer, "model_wrapped", None) is not None else trainer.model
    base = getattr(model, "module", model)
    path = getattr(getattr(base, "config", None), "_name_or_path", None) or gen.llm.llm_engine.model_config.model
    engine = Engine.attach(gen.llm, path, load_method=load_method)
    _sync_at_every_train(trainer)
    if getattr(gen.llm.llm_engine.vllm_config, "lora_config", None) is not None:
        return _patch_lora(trainer, gen, engine, verify_every, fast_outputs)
    state = {"syncs": 0}

    def current_stream() -> WeightStream:
        """The parameters the trainer holds now: ``prepare`` (FSDP2, ZeRO-3) replaces them after ``patch``."""
        wrapped = getattr(trainer, "model_wrapped", None)
        return WeightStream(wrapped if wrapped is not None else trainer.model, dtype=engine.dtype,
                            bucket_bytes=bucket_bytes)

    def sync_weights():
        t0 = time.perf_counter()
        if gen.enable_sleep_mode:
            release_cached_memory()
            gen.llm.wake_up(tags=["weights"])  # TRL's order: weights first, KV cache at generation
            gen._llm_weights_sleeping = False
        stream = current_stream()
        engine.push(stream)
        metrics = {"rollout_sleep/sync_s": time.perf_counter() - t0}
        state["syncs"] += 1
        if verify_every and state["syncs"] % verify_every == 0:  # reads weights only: the KV cache may sleep
            report = verify(engine, stream).raise_if_failed()
            metrics.update({"rollout_sleep/verify_s": report.seconds,
                            "rollout_sleep/verify_max_abs_diff": report.max_abs_diff})
        for k, v in metrics.items():
            trainer._metrics["train"][k].append(v)

    gen.sync_weights = sync_weights
    if fast_outputs:
        gen.generation_kwargs = fast_output_kwargs(gen.generation_kwargs or {})
    if sleep_level != 2:
        original_sleep = gen.llm.sleep
        gen.llm.sleep = lambda level=2, **kw: original_sleep(level=sleep_level, **kw)
    trainer.rollout_sleep_engine = engine
    return trainer



def _sync_at_every_train(trainer) -> None:
    """TRL syncs before a rollout when ``global_step`` differs from the step it last synced at, which it sets
    once, when the trainer is built. A second ``train()`` (a notebook's, a retry after an error) starts again
    at step 0: where the previous call last synced at step 0, vLLM generated from the old weights, unverified.
    Each ``train()`` now forgets that step, so its first rollout syncs (and verifies)."""
    from transformers import TrainerCallback

    class SyncAtTrainBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            trainer._last_loaded_step = -1

    handler = getattr(trainer, "callback_handler", None)  # every transformers Trainer has one
    if handler is not None and not any(type(c).__name__ == "SyncAtTrainBegin" for c in handler.callbacks):
        trainer.add_callback(SyncAtTrainBegin())  # once, if patched twice


def _check_arguments(sleep_level, verify_every, bucket_bytes, load_method) -> None:
    """``patch``'s own arguments, refused before it touches the trainer."""
    check_level(sleep_level, what="patch(sleep_level=...)")
    for name, value, least in (("verify_every", verify_every, 0), ("bucket_bytes", bucket_bytes, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"patch({name}={value!r}): must be an integer >= {least}"
                             + (" (0: never verify)" if name == "verify_every" else " (bytes gathered at once)"))
    if load_method not in LOAD_METHODS:
        raise ValueError(f"patch(load_method={load_method!r}): use one of {', '.join(LOAD_METHODS)}")


@contextlib.contextmanager
def lora_engine(rank: int, max_loras: int = 1):
    """Inside the block, TRL's colocated engine is started with vLLM's LoRA serving (``enable_lora``, one slot
    of ``rank``): wrap the ``GRPOTrainer(...)`` call, then :func:`patch` the trainer.

    With sleep mode on CUDA in one process, the trainer's frozen base waits in host memory while vLLM loads
    its own (TRL builds the trainer's model on the GPU first): the device never holds two bases, and
    :func:`patch` binds the base to vLLM's weights. Until then a forward of the trainer raises."""
    import trl.generation.vllm_generation as vg

    from rollout_sleep.lora.adapter import LoraSettings

    settings = LoraSettings(rank=rank)
    # TRL 1.16 builds its engine in VLLMGeneration._init_vllm; a TRL without it keeps the base where it is
    original_llm, original_init = vg.LLM, getattr(vg.VLLMGeneration, "_init_vllm", None)

    def llm_with_lora(*args, **kwargs):
        kwargs.update(settings.engine_kwargs(), max_loras=max_loras)
        return original_llm(*args, **kwargs)

    def init_vllm(gen):
        if gen.mode == "colocate" and gen.enable_sleep_mode and gen.accelerator.num_processes == 1:
            park_base(gen.model)
        return original_init(gen)

    vg.LLM = llm_with_lora
    if original_init is not None:
        vg.VLLMGeneration._init_vllm = init_vllm
    try:
        yield settings
    finally:
        vg.LLM = original_llm
        if original_init is not None:
            vg.VLLMGeneration._init_vllm = original_init


def park_base(model) -> int:
    """Move the frozen base parameters of ``model`` (a PEFT model) that live on a GPU to host memory, free the
    device's cached blocks, and make a forward raise until :func:`unpark_base`; returns the bytes moved."""
    import torch

    moved, parked = 0, []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad or ".lora_" in name or p.device.type != "cuda":
                continue
            parked.append((p, p.device))
            p.data = p.data.to("cpu")
            moved += p.numel() * p.element_size()
    if moved:
        torch.cuda.empty_cache()

        def refuse(module, args):
            raise RuntimeError("the trainer's frozen base waits in host memory until rollout_sleep.integrations.trl."
                               "patch(trainer) binds it to vLLM's weights: call patch(trainer) right after building "
                               "the GRPOTrainer inside lora_engine(...)")

        model._rollout_sleep_parked = (model.register_forward_pre_hook(refuse), parked)
    return moved


def unpark_base(model) -> None:
    """Lift :func:`park_base`'s refusal once the base is bound to the engine's weights; a parked tensor the
    binding did not reach (a PEFT ``modules_to_save`` original) goes back to its device."""
    import torch

    handle, parked = getattr(model, "_rollout_sleep_parked", (None, []))
    with torch.no_grad():
        for p, device in parked:
            if p.device.type == "cpu":
                p.data = p.data.to(device)
    if handle is not None:
        handle.remove()
        del model._rollout_sleep_parked


def _patch_lora(trainer, gen, engine: Engine, verify_every: int, fast_outputs: bool):
    """The LoRA route of :func:`patch`: adapter-only syncs, level-0 sleep, the base viewed from vLLM on CUDA."""
    from rollout_sleep.engine.memory import map_kv_only, release_kv_only
    from rollout_sleep.lora.adapter import AdapterSync
    from rollout_sleep.lora.shared_base import share_base

    model = trainer.model_wrapped if getattr(trainer, "model_wrapped", None) is not None else trainer.model
    adapter = AdapterSync(engine, model)  # raises unless the trainer is a PEFT model
    llm = gen.llm
    original_generate, original_sleep, original_wake = llm.generate, llm.sleep, llm.wake_up
    state = {"syncs": 0, "freed_bytes": 0}
    if gen.enable_sleep_mode:
        # TRL slept at level 2 right after building the engine: the base is gone. Map it back, fill it with the
        # trainer's base, map the KV cache (vLLM is then fully awake), and from now on release the KV cache only.
        original_wake(tags=["weights"])
        engine.push(WeightStream(model, dtype=engine.dtype, merge_adapters=False))
        original_wake(tags=["kv_cache"])
        state["freed_bytes"] = share_base(engine, model)  # a base parked in host memory by lora_engine included
        unpark_base(gen.model)
        import torch

        torch.cuda.empty_cache()  # the trainer's own copy of the base goes back to the driver

        state["kv_mapped"] = True

        def sleep(level: int = 2, **kw):  # whatever level TRL asks for: the KV cache only
            if state["kv_mapped"]:
                release_kv_only(llm, pause=original_sleep)
                state["kv_mapped"] = False

        def wake_up(tags=None, **kw):  # the weights never left; the KV cache is mapped back once
            if (tags is None or "kv_cache" in tags) and not state["kv_mapped"]:
                release_cached_memory()
                map_kv_only(llm, wake=original_wake)
                state["kv_mapped"] = True
                llm.reset_prefix_cache()

        llm.sleep, llm.wake_up = sleep, wake_up

    def generate(*args, **kwargs):
        kwargs.setdefault("lora_request", adapter.request)
        return original_generate(*args, **kwargs)

    def sync_weights():
        pushed = adapter.push()
        gen._llm_weights_sleeping = False
        metrics = {"rollout_sleep/sync_s": pushed["adapter_sync_s"]}
        state["syncs"] += 1
        if verify_every and state["syncs"] % verify_every == 0:
            report = adapter.verify().raise_if_failed()
            metrics["rollout_sleep/verify_s"] = report.seconds
            metrics["rollout_sleep/verify_max_abs_diff"] = 0.0
        for k, v in metrics.items():
            trainer._metrics["train"][k].append(v)

    llm.generate = generate
    gen.sync_weights = sync_weights
    if fast_outputs:
        gen.generation_kwargs = fast_output_kwargs(gen.generation_kwargs or {})
    trainer.rollout_sleep_engine = engine
    trainer.rollout_sleep_adapter = adapter
    trainer.rollout_sleep_base_freed_bytes = state["freed_bytes"]
    return trainer
