"""The colocated vLLM engine: generate, sleep, and the memory-safe wake (weights → load → KV cache → reset).

``Engine`` owns one in-process ``vllm.LLM`` and a small state machine (awake ↔ asleep(level)) that refuses
the calls vLLM would get wrong silently: generating while asleep (on CPU vLLM blocks forever), waking from
level 2 without new weights (vLLM would generate from discarded memory), reloading "nothing" (vLLM would
reload the original checkpoint and drop the trained weights), sleeping twice, unknown levels.

On CUDA, sleep uses vLLM's sleep allocator: level 1 offloads the weights to host memory and drops the
KV cache, level 2 drops both, and the memory figures in each report show what was given back. On CPU vLLM
has no sleep allocator: ``sleep()`` still calls vLLM's ``sleep(level)``, which pauses its scheduler, but
no memory is released (reports show RSS, unchanged). The engine keeps the level-2 contract there too
(the weights count as discarded and must be reloaded), so the same code is tested on CPU that runs on GPU.

Example:
    >>> eng = Engine("/path/to/checkpoint")                                      # doctest: +SKIP
    >>> outs = eng.generate(["1+1="], max_tokens=8, temperature=0.0)             # doctest: +SKIP
    >>> eng.sleep(level=2)                                                       # doctest: +SKIP
    >>> report = eng.wake_up(weights=model.state_dict().items())                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

import torch

from rollout_sleep.weights.spec import TensorSpec, read_checkpoint_spec, ties_head

from .completion import Completion, fast_output_kwargs, sampled_logprobs
from .contract import as_prompts, closing, operation
from .loader import Loader
from .memory import (WakeBudget, keeping_cache, map_kv_only, memory_gib, release_kv_only,
                     sleep_mode_available)
from .phases import CycleReport, timed
from .state import LEVELS, EngineStateError, IncompleteWeightsError, SleepState, load_then_finish

logger = logging.getLogger(__name__)


def _distributed_world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 1


class Engine(SleepState):
    """An in-process vLLM engine with sleep mode and a checked sleep/wake/reload/reset cycle.

    Args:
        model: a local HF checkpoint directory (e.g. from :func:`rollout_sleep.weights.checkpoints.make_checkpoint`).
        dtype: *optional*, vLLM's dtype (``"auto"`` = the checkpoint's).
        seed: *optional*, vLLM's seed.
        max_model_len: *optional*, longest prompt + completion.
        gpu_memory_utilization: *optional*, share of the GPU vLLM may take (CUDA).
        kv_cache_bytes: *optional*, KV cache size in bytes (default 256 MiB on CPU).
        load_method: *optional*, default way to push weights: ``"auto"``, ``"reload"``
            (``collective_rpc("reload_weights")``), ``"load_weights"`` (one batched call) or ``"direct"``
            (copy into vLLM's parameters; CUDA, TP=1). ``auto`` takes ``direct`` where it applies.
        keep_trainer_cache: *optional*, leave PyTorch's cached blocks (the trainer's working set) in place
            when sleeping, instead of vLLM's ``empty_cache`` at every sleep; a wake still releases them
            when vLLM would not fit beside them (see :func:`~rollout_sleep.engine.memory.release_cached_memory`).
            ``False``: released at every sleep and before every wake, so the rollout holds none of what the
            trainer freed (the lowest device peak; the trainer maps its working set again at each step).
        llm_kwargs: passed to ``vllm.LLM`` as they are; ``enforce_eager`` left out (or ``None``) is ``True`` on
            CPU (unless ``compilation_config`` or ``optimization_level`` asks for compilation), where vLLM's
            build compiles with inductor at every start (~15-20 s of a tiny model's ~30 s) and has no CUDA graphs
            to gain, and vLLM's default (compiled, CUDA graphs) on a GPU.
    """

    keep_trainer_cache = False
    in_process = True  # weights go in as tensors, verify reads them back (the contract's RolloutEngine.in_process)
    # 0: the KV cache only (weights stay mapped: a trainer sharing them, LoRA); 1, 2: vLLM's own levels
    levels = (0, *LEVELS)

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        gpu_memory_utilization: float | None = None,
        kv_cache_bytes: int | None = None,
        enable_prefix_caching: bool = True,
        load_method: str = "auto",
        keep_trainer_cache: bool = False,
        **llm_kwargs: Any,
    ):
        # Weight pushes hand in-memory tensors to the worker: it must live in this process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM, EngineArgs

        if not Path(model, "config.json").exists():
            raise FileNotFoundError(f"{model!r} is not a checkpoint directory (no config.json)")
        self._describe(model, load_method)
        self.keep_trainer_cache = keep_trainer_cache
        kwargs: dict[str, Any] = dict(
            model=self.model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
            enable_sleep_mode=self.sleep_mode, enable_prefix_caching=enable_prefix_caching,
        )
        if gpu_memory_utilization is not None:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_bytes is None and not self.on_cuda:
            kv_cache_bytes = 256 << 20
        if kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        if "logprobs_mode" in {f.name for f in dataclasses.fields(EngineArgs)}:
            # sampled tokens' log-probs after temperature (what was sampled from; TRL asks the same)
            kwargs["logprobs_mode"] = "processed_logprobs"
        if _distributed_world() > 1 and "distributed_executor_backend" not in llm_kwargs:
            # One engine per trainer rank, inside the trainer's process group (as TRL's colocate mode does).
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(llm_kwargs)
        if kwargs.get("enforce_eager") is None:
            # vLLM's CPU build compiles with inductor at every start (~15-20 s for a tiny model, most of the start)
            # and has no CUDA graphs to gain: eager there unless asked (eager would override an explicit
            # compilation_config / optimization_level); on a GPU vLLM's own default (compiled)
            asked = any(kwargs.get(k) is not None for k in ("compilation_config", "optimization_level"))
            kwargs["enforce_eager"] = not self.on_cuda and not asked
        t0 = time.perf_counter()
        llm = LLM(**kwargs)
        self._bind(llm, startup_seconds=time.perf_counter() - t0, owned=True)

    def _describe(self, model_path: str | os.PathLike, load_method: str) -> None:
        """What the engine knows of its checkpoint and device before holding a ``vllm.LLM``."""
        self.model_path = str(Path(model_path).resolve())
        self.spec: dict[str, TensorSpec] = read_checkpoint_spec(self.model_path)
        self.tied = ties_head(self.model_path)
        self.sleep_mode = sleep_mode_available()
        self.on_cuda = torch.cuda.is_available()
        self.loader = Loader(model_path=self.model_path, spec=self.spec, tied=self.tied, on_cuda=self.on_cuda,
                             sleep_mode=self.sleep_mode, load_method=load_method)
        self.memory_before_gib = memory_gib()[1]

    def _bind(self, llm: Any, startup_seconds: float, owned: bool) -> None:
        """Take ``llm`` as this engine's vLLM, awake, with complete weights (``owned``: built here, so
        :meth:`close` shuts it down)."""
        self.llm, self._owns_llm = llm, owned
        self._dtype = llm.llm_engine.model_config.dtype  # still readable once closed
        self._tensor_parallel_size = llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
        self._wake_budget = WakeBudget()  # GPU memory a wake maps (measured at the last wake)
        self.startup_seconds = startup_seconds
        self.memory_loaded_gib = memory_gib()[1]
        self.tokenizer = llm.get_tokenizer()
        self._level = None
        self.loader.bind(llm)

    @classmethod
    def attach(cls, llm: Any, model_path: str | os.PathLike, load_method: str = "auto") -> "Engine":
        """Wrap an existing in-process ``vllm.LLM`` (built by another library, e.g. TRL) without rebuilding it.

        The other library keeps driving sleep and wake, and owns ``llm``: :meth:`close` releases this wrapper
        only. Use :meth:`push` to load weights into it.
        """
        self = cls.__new__(cls)
        self._describe(model_path, load_method)
        self._bind(llm, startup_seconds=0.0, owned=False)
        return self

    @operation("push weights")
    def push(self, weights: Any, *, method: str | None = None, strict: bool = True,
             reset_prefix_cache: bool = True) -> CycleReport:
        """Validate and load weights, then reset the prefix cache, without touching the sleep state.

        For integrations that call vLLM's ``sleep``/``wake_up`` themselves: the weights buffers must be
        awake. Use :meth:`wake_up` / :meth:`load_weights` otherwise. ``reset_prefix_cache=False`` leaves
        the cached prefixes (computed with the old weights) in place: only for tests of stale prefixes.
        """
        prepared = self.loader.prepare(weights, strict, method)
        report = CycleReport("push")
        with timed(report, "load"):
            self.loader.load(prepared)
        if reset_prefix_cache:
            with timed(report, "reset"):
                self._reset_prefix_cache()
        return report

    # ------------------------------------------------------------------ state
    pinned: str | None = None  # why the weights must stay mapped where they are (a trainer views them)

    def pin_weights(self, why: str) -> None:
        """Keep the weights mapped where they are from now on (``why``: who holds views of them): sleeps at level
        1 or 2, which would move or discard them, are refused; level 0 releases the KV cache only."""
        self.pinned = why

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def tensor_parallel_size(self) -> int:
        """vLLM's tensor-parallel size (each rank holds a shard of the sharded weights)."""
        return self._tensor_parallel_size

    @property
    def load_method(self) -> str:
        """The default load route (``auto`` / ``reload`` / ``load_weights`` / ``direct``)."""
        return self.loader.load_method

    @load_method.setter
    def load_method(self, method: str) -> None:
        self.loader.load_method = method

    @property
    def check_finite(self) -> bool:
        """Refuse weights holding NaN/Inf (one read of every tensor per load; ``False`` skips it)."""
        return self.loader.check_finite

    @check_finite.setter
    def check_finite(self, on: bool) -> None:
        self.loader.check_finite = on

    def require_awake(self, what: str) -> None:
        """Refuse ``what`` unless awake with complete weights (see :meth:`SleepState.require_awake`)."""
        super().require_awake(what)
        if not self.loader.complete:
            raise IncompleteWeightsError(
                f"cannot {what}: the last weight load was interrupted or incomplete ({self.loader.incomplete_reason}), "
                "so the engine holds a mix of old and new weights; call load_weights(...) with a complete set first")

    # --------------------------------------------------------------- generate
    @operation("generate")
    def generate(self, prompts: Iterable[str] | Iterable[list[int]], sampling: Any = None, *,
                 use_tqdm: bool = False, lora_request: Any = None, **sampling_kwargs: Any) -> list[Completion]:
        """Sample completions for text prompts or token-id prompts.

        Args:
            prompts: a string (one prompt), a list of token ids (one tokenized prompt), or a list of those.
            sampling: *optional*, a ``vllm.SamplingParams``; otherwise ``sampling_kwargs`` build one
                (``n``, ``max_tokens``, ``temperature``, ...). Log-probs of the sampled tokens are on by default.
            lora_request: *optional*, generate through this LoRA adapter
                (:class:`~rollout_sleep.lora.adapter.AdapterSync`).

        Returns:
            A flat list of :class:`Completion` (``n`` per prompt, in prompt order).
        """
        from vllm import SamplingParams

        self.require_awake("generate")
        decode_here = False
        if sampling is None:
            sampling_kwargs.setdefault("logprobs", 0)
            decode_here = "detokenize" not in sampling_kwargs and not sampling_kwargs.get("stop")
            sampling = SamplingParams(**fast_output_kwargs(sampling_kwargs))
        elif sampling_kwargs:
            raise TypeError("pass either a SamplingParams or keyword arguments, not both")
        inputs = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in as_prompts(prompts)]
        if not inputs:
            return []
        extra = {"lora_request": lora_request} if lora_request is not None else {}
        outputs = self.llm.generate(inputs, sampling, use_tqdm=use_tqdm, **extra)
        result = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                lps = None if c.logprobs is None else sampled_logprobs(c.logprobs, c.token_ids)
                result.append(Completion(i, list(out.prompt_token_ids), list(c.token_ids), lps, c.text,
                                         c.finish_reason))
        if decode_here and result:
            texts = self.tokenizer.batch_decode([c.token_ids for c in result], skip_special_tokens=True)
            for c, text in zip(result, texts):
                c.text = text.rstrip("\ufffd")  # as vLLM's incremental detokenizer: no incomplete UTF-8 tail
        return result

    @operation("score")
    def score(self, sequences: Iterable[list[int]]) -> list[list[float]]:
        """Log-prob of every token of each sequence given its prefix (the first token has none).

        Teacher-forced, so it compares two engines' weights without the sampling noise of greedy decoding.
        """
        from vllm import SamplingParams

        self.require_awake("score")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([{"prompt_token_ids": list(map(int, s))} for s in sequences], params,
                                 use_tqdm=False)
        return [[step[tok].logprob for step, tok in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])]
                for o in outs]

    # ------------------------------------------------------------------ sleep
    @operation("sleep")
    def sleep(self, level: int = 2) -> CycleReport:
        """Put the engine to sleep. Level 2 discards weights and KV cache (GPU memory returned); level 1
        offloads the weights to host memory; level 0 releases the KV cache only and leaves the weights
        mapped where they are (a trainer may hold views of them:
        :func:`~rollout_sleep.lora.shared_base.trainer_from_engine`).
        On CPU the scheduler pauses and no memory is released."""
        level = self.check_sleep(level)
        if level and self.pinned:
            raise EngineStateError(f"cannot sleep at level {level}: {self.pinned}, and level {level} would "
                                   f"{'offload' if level == 1 else 'discard'} that memory under the trainer. Sleep "
                                   "at level 0 (the KV cache only)")
        report = CycleReport("sleep", level)
        report.memory_kind, report.memory_gib["before"] = memory_gib()
        with timed(report, "sleep"), keeping_cache(report, self.keep_trainer_cache):
            if level == 0 and self.sleep_mode:
                release_kv_only(self.llm, reset=self._reset_prefix_cache)
            else:  # on CPU level 0 is vLLM's level 1 (its scheduler pauses; no memory moves there)
                self.llm.sleep(level=max(level, 1))
        self._level = level
        report.memory_gib["asleep"] = memory_gib()[1]
        self._wake_budget.after_sleep(report)
        return report

    # ------------------------------------------------------------------- wake
    @operation("wake up")
    def wake_up(self, weights: Any = None, *, reload_checkpoint: bool = False, method: str | None = None,
                strict: bool = True) -> CycleReport:
        """Wake in the memory-safe order: weights buffers → load → KV cache → reset the prefix cache.

        Args:
            weights: the new weights: an iterable or mapping of ``(name, tensor)`` in checkpoint names
                (the RL case), or a checkpoint directory. Required after a level-2 sleep.
            reload_checkpoint: *optional*, reload the engine's original checkpoint (explicit opt-in: in RL
                this throws the trained weights away).
            method / strict: see :meth:`load_weights`.

        Returns:
            A :class:`CycleReport` with ``wake_weights``, ``load``, ``wake_kv_cache`` and ``reset`` seconds.
        """
        weights = self.check_wake(
            weights, reload_checkpoint, awake_hint="use load_weights(...) to update its weights",
            level2_hint="waking from level 2 needs new weights: level 2 discarded them, and vLLM would generate "
                        "from freed memory. Pass weights=... (the trainer's), or reload_checkpoint=True to reload "
                        f"the original checkpoint {self.model_path}")
        # validate before waking: names, shapes, dtypes, values, the method
        prepared = self.loader.prepare(weights, strict, method) if weights is not None else None
        report = CycleReport("wake", self._level)
        report.memory_kind, report.memory_gib["asleep"] = memory_gib()
        kv_only = self._level == 0 and self.sleep_mode  # the weights never left: map the KV cache back only
        with timed(report, "wake_weights"):
            free_before_map = self._wake_budget.before_wake(report, always=not self.keep_trainer_cache)
            if not kv_only:
                with keeping_cache(report, self.keep_trainer_cache and not report.cache_released):
                    self.llm.wake_up(tags=["weights"])
        def load():
            with timed(report, "load"):
                self.loader.load(prepared)

        def finish():
            with timed(report, "wake_kv_cache"), keeping_cache(report, self.keep_trainer_cache):
                if kv_only:
                    awake = map_kv_only(self.llm)
                else:
                    awake = self.llm.wake_up(tags=["kv_cache"])
            self._level = None
            if awake is False:
                raise EngineStateError("vLLM reports it is not fully awake after waking weights and KV cache")
            with timed(report, "reset"):
                self._reset_prefix_cache()

        # whatever happened to the load, the wake is finished so the engine is in a known state
        load_then_finish(load if prepared is not None else None, finish, state=lambda: self.state)
        report.memory_gib["awake"] = memory_gib()[1]
        self._wake_budget.after_wake(report, free_before_map)
        return report

    @operation("load weights")
    def load_weights(self, weights: Any, *, method: str | None = None, strict: bool = True,
                     reset_prefix_cache: bool = True) -> CycleReport:
        """Replace the weights of an awake engine, then reset its prefix cache.

        Args:
            weights: as in :meth:`wake_up`.
            method: *optional*, ``reload`` / ``load_weights`` / ``direct`` / ``auto`` (the engine's default).
            strict: *optional*, every tensor of the model must be given (a full sync). ``False`` allows
                updating a subset (``auto`` then takes ``load_weights`` on CUDA; on CPU ``reload``, which
                needs every part of a fused parameter it touches: q/k/v together, gate/up together).
            reset_prefix_cache: *optional*, ``False`` leaves cached prefixes stale (a test of stale KV only).
        """
        self.check_awake_for_load()
        report = self.push(weights, method=method, strict=strict, reset_prefix_cache=reset_prefix_cache)
        report.kind = "load"
        return report

    @operation("reset the prefix cache")
    def reset_prefix_cache(self) -> None:
        """Drop cached prefixes (computed with the previous weights)."""
        self.require_awake("reset the prefix cache")
        self._reset_prefix_cache()

    def _reset_prefix_cache(self) -> None:
        ok = self.llm.reset_prefix_cache()
        if ok is False:  # newer vLLM: False while blocks are still held by running requests
            raise EngineStateError("vLLM refused to reset the prefix cache (requests still hold blocks)")

    @operation("run a function on the model")
    def run_on_model(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        """Run ``fn(model)`` on vLLM's model in this process (tensor parallel rank 0) and return its result."""
        return self.llm.apply_model(fn)[0]

    @operation("verify weights")
    def verify_weights(self, model: Any) -> Any:
        """The bitwise proof that the engine holds ``model``'s weights (:func:`rollout_sleep.weights.verify.verify`)."""
        from rollout_sleep.weights.verify import verify_in_process

        return verify_in_process(self, model)

    @closing
    def close(self) -> None:
        """Shut the engine down (vLLM does not give GPU memory back in-process; see the README); an attached
        engine (:meth:`attach`) leaves the other library's ``vllm.LLM`` running."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None and self._owns_llm:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        del llm
