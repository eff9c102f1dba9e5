"""The alternation loop as a small object: rollout (engine awake) → training (engine asleep) → sync.

Usable from any PyTorch loop::

    manager = RolloutManager(engine, model, sleep_level=2)
    for step in range(steps):
        completions = manager.rollout(prompts, n=8, max_tokens=128)   # wakes + syncs first if needed
        with manager.training():                                    # engine sleeps, trainer owns the GPU
            loss.backward(); optimizer.step()
        manager.sync()                                              # wake → load → KV cache → reset
        log(manager.end_step())                                     # per-phase seconds, memory, tokens/s

If the training phase raises, the engine stays asleep and the next ``sync()`` (or ``rollout()``) wakes it
with whatever weights the trainer then holds, so the loop can resume.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager, nullcontext

import torch

from rollout_sleep.engine.completion import Completion
from rollout_sleep.engine.contract import RolloutEngine, UnsupportedOperation, as_prompts
from rollout_sleep.engine.phases import CYCLE_PHASES
from rollout_sleep.engine.state import check_level
from rollout_sleep.weights.spec import WeightMismatchError
from rollout_sleep.weights.checkpoints import save_weights
from rollout_sleep.weights.stream import WeightStream, local_shard
from rollout_sleep.weights.verify import verify


class RolloutManager:
    """Args:
        engine: the colocated engine, any :class:`~rollout_sleep.engine.contract.RolloutEngine` (LoRA: an
            in-process :class:`~rollout_sleep.engine.engine.Engine`).
        model: the trainer's model (plain, DDP/accelerate, FSDP2, ZeRO-3 or PEFT).
        sleep_level: *optional*, 2 (drop weights and KV cache) or 1 (offload weights to host memory).
        bucket_bytes: *optional*, the sync's gather/cast bucket.
        verify_every: *optional*, run :func:`~rollout_sleep.weights.verify.verify` after every N-th sync (0: never).
        load_method: *optional*, the engine's weight-load route (``auto`` by default).
        watchdog: *optional*, a :class:`~rollout_sleep.run.watchdog.Watchdog`: phases ``generate``, ``sleep``,
            ``train`` (the :meth:`training` block), ``wake`` (wake → load → KV cache → reset, or a load while
            awake) and ``verify`` stop the process if they outlast its timeouts.
        adapter: *optional*, a :class:`~rollout_sleep.lora.adapter.AdapterSync` (LoRA: the engine serves the adapter
            and keeps its base; ``sleep_level`` 0): a sync moves only the adapter, rollouts go through it,
            and verify checks the adapter bitwise and the base (bitwise, or shared memory on CUDA).
        weights_shared: *optional*, the trainer's parameters are views of the engine's weights
            (:mod:`rollout_sleep.run.one_copy`, ``sleep_level`` 0): a sync moves nothing (the KV cache is mapped
            back and the prefix cache reset), the one-copy invariant is checked at every sync, and verify
            compares the weights bitwise every ``verify_every`` syncs.
        weights_dir: *optional*, a folder this manager owns: each sync saves the trainer's weights there as a
            checkpoint and the engine reloads from it. Needed by an engine that reads its weights from a folder
            (``engine.in_process`` false: a :class:`~rollout_sleep.serve.remote.RemoteEngine`, whose server must
            see the folder); an in-process engine takes them from memory without it.

    What the engine cannot offer is refused here, before its first sleep (:class:`UnsupportedOperation`): with a
    server, in-memory weights (without ``weights_dir``), ``verify_every`` and LoRA adapters.
    """

    def __init__(self, engine: RolloutEngine, model: torch.nn.Module, *, sleep_level: int = 2,
                 bucket_bytes: int = 512 << 20, verify_every: int = 0, load_method: str | None = None,
                 watchdog=None, adapter=None, weights_dir: str | os.PathLike | None = None,
                 weights_shared: bool = False):
        if (adapter is not None or weights_shared) and sleep_level != 0:
            raise ValueError(f"the engine keeps its weights ({'a LoRA base' if adapter is not None else 'the trainer'}"
                             f" views them): sleep_level must be 0 (the KV cache only), got {sleep_level!r}")
        if adapter is not None and weights_shared:
            raise ValueError("weights_shared is for full-parameter training; a LoRA adapter shares its base already")
        if adapter is None and not weights_shared:
            check_level(sleep_level)
        if not engine.in_process:
            _check_remote(engine, weights_dir, verify_every, adapter)
        self.engine = engine
        self.model = model
        self.adapter = adapter
        self.weights_dir = weights_dir
        # LoRA: the stream is the base alone (verify proves vLLM's base is the trainer's, untouched). Saved to a
        # folder: the checkpoint's own names (a tied head is not saved, as save_pretrained leaves it out).
        self.stream = WeightStream(model, dtype=engine.dtype, bucket_bytes=bucket_bytes,
                                   merge_adapters=adapter is None, include_tied_head=weights_dir is None)
        self.base_shared = False
        if adapter is not None and engine.on_cuda:
            from rollout_sleep.lora.shared_base import shares_storage_with_engine

            shared, total = shares_storage_with_engine(engine, model)
            self.base_shared = shared == total > 0
        self.shared = None
        if weights_shared:
            from .one_copy import SharedWeights

            self.shared = SharedWeights(engine, model)  # checked here first: a trainer that is not the views fails now
        self.sleep_level = sleep_level
        self.verify_every = verify_every
        self.load_method = load_method
        self.syncs = 0
        self.watchdog = watchdog
        self._step: dict[str, float] = {}

    def _phase(self, name: str, waiting_for: str):
        return self.watchdog.phase(name, waiting_for) if self.watchdog is not None else nullcontext()

    def _add(self, key: str, value: float) -> None:
        self._step[key] = self._step.get(key, 0.0) + value

    def rollout(self, prompts, **sampling) -> list[Completion]:
        """Generate with the engine (syncing the trainer's weights first if it is asleep)."""
        prompts = as_prompts(prompts)
        if self.engine.is_asleep:
            self.sync()
        t0 = time.perf_counter()
        if self.adapter is not None:
            if self.adapter.request is None:
                self.sync()  # the first rollout goes through the trainer's adapter too
            sampling = {**sampling, "lora_request": self.adapter.request}
        with self._phase("generate", f"vLLM to generate for {len(prompts)} prompt(s), n={sampling.get('n', 1)}"):
            out = self.engine.generate(prompts, **sampling)
        dt = time.perf_counter() - t0
        self._add("generate_s", dt)
        tokens = sum(len(c.token_ids) for c in out)
        self._add("generated_tokens", tokens)
        self._step["tokens_per_s"] = self._step["generated_tokens"] / max(self._step["generate_s"], 1e-9)
        return out

    @contextmanager
    def training(self):
        """Put the engine to sleep for the block; the trainer owns the device inside it."""
        with self._phase("sleep", f"vLLM to sleep at level {self.sleep_level}"):
            report = self.engine.sleep(level=self.sleep_level)
        self._add("sleep_s", report.seconds["sleep"])
        mem = report.memory_gib  # empty where the engine's memory is not visible here (a server)
        for key, name in (("before", "before_sleep"), ("asleep", "asleep")):
            if key in mem:
                self._step[f"{report.memory_kind}_{name}_gib"] = mem[key]
        if report.memory_kind == "cuda_free":
            self._step["memory_freed_gib"] = mem["asleep"] - mem["before"]
        t0 = time.perf_counter()
        try:
            with self._phase("train", "the training block (forward, backward, optimizer step) to finish"):
                yield self
        except torch.cuda.OutOfMemoryError as err:
            free = torch.cuda.mem_get_info()[0] / 2**30 if torch.cuda.is_available() else float("nan")
            nan = float("nan")
            raise torch.cuda.OutOfMemoryError(
                f"the trainer ran out of GPU memory while the engine slept at level {self.sleep_level} "
                f"(free before sleep {mem.get('before', nan):.2f} GiB, after sleep {mem.get('asleep', nan):.2f} GiB, "
                f"now {free:.2f} GiB). Lower the micro-batch or sequence length, enable gradient checkpointing"
                + (", or sleep at level 2." if self.sleep_level == 1 else ".")) from err
        finally:
            self._add("train_s", time.perf_counter() - t0)

    def sync(self) -> None:
        """Wake the engine with the trainer's weights (weights → load → KV cache → reset), verify if due."""
        if self.adapter is not None:
            return self._sync_adapter()
        if self.shared is not None:
            return self._sync_shared()
        try:
            weights, saved_s = self.stream, 0.0
            if self.weights_dir is not None:
                with self._phase("wake", f"the trainer's weights to be saved to {self.weights_dir}"):
                    t0 = time.perf_counter()
                    weights = save_weights(self.stream, self.weights_dir, like=self.engine.model_path)
                    saved_s = time.perf_counter() - t0
            if not self.engine.is_asleep:
                with self._phase("wake", "vLLM to load the trainer's weights"):
                    report = self.engine.load_weights(weights, method=self.load_method)
            else:
                with self._phase("wake", "vLLM to wake up, load the trainer's weights and map its KV cache back"):
                    report = self.engine.wake_up(weights=weights, method=self.load_method)
            if saved_s:  # part of the load (counted in load_s), and said on its own
                report.seconds["save"] = saved_s
                report.seconds["load"] = report.seconds.get("load", 0.0) + saved_s
        except WeightMismatchError:
            self._blame_non_finite_weights()  # the engine refuses NaN/inf weights: say where they came from
            raise
        for k, v in report.seconds.items():
            self._add(f"{k}_s", v)
        if "awake" in report.memory_gib:
            self._step[f"{report.memory_kind}_awake_gib"] = report.memory_gib["awake"]
        if report.memory_kind == "cuda_free" and report.kind == "wake":
            self._step["cache_released"] = float(report.cache_released)  # PyTorch's cache emptied before waking
            if "before_map" in report.memory_gib:  # what vLLM mapped back (weights, KV cache) and the load used
                self._step["memory_taken_by_wake_gib"] = report.memory_gib["before_map"] - report.memory_gib["awake"]
        self.syncs += 1
        self._verify_if_due()

    def _verify_if_due(self) -> None:
        """The bitwise comparison of vLLM's weights with the trainer's, every ``verify_every``-th sync."""
        if self.verify_every and self.syncs % self.verify_every == 0:
            with self._phase("verify", "the bitwise comparison of vLLM's weights with the trainer's"):
                result = verify(self.engine, self.stream)
            self._add("verify_s", result.seconds)
            if not result.ok:
                self._blame_non_finite_weights()
            result.raise_if_failed()

    def _map_kv_cache_back(self) -> None:
        """Wake from level 0: the weights never left, the KV cache is mapped back and the prefix cache reset."""
        with self._phase("wake", "vLLM to map its KV cache back"):
            report = self.engine.wake_up()
        for k, v in report.seconds.items():
            self._add(f"{k}_s", v)
        if report.memory_kind == "cuda_free" and "before_map" in report.memory_gib:
            self._step["memory_taken_by_wake_gib"] = report.memory_gib["before_map"] - report.memory_gib["awake"]

    def _sync_shared(self) -> None:
        """One copy: the optimizer wrote vLLM's weights in place. Map the KV cache back (or, awake, reset the prefix
        cache: its blocks were computed with the old weights), check the one-copy invariant, verify if due."""
        if self.engine.is_asleep:
            self._map_kv_cache_back()
        else:
            t0 = time.perf_counter()
            self.engine.reset_prefix_cache()
            self._add("reset_s", time.perf_counter() - t0)
        t0 = time.perf_counter()
        self.shared.check(self.model)
        self._add("one_copy_check_s", time.perf_counter() - t0)
        self._add("load_s", 0.0)  # nothing moves
        self.syncs += 1
        self._verify_if_due()

    def _sync_adapter(self) -> None:
        """LoRA: map the KV cache back (the base never left), put the trainer's adapter into vLLM's slot, verify
        if due (the adapter bitwise; the base bitwise, or on CUDA that the trainer's base is vLLM's memory)."""
        if self.engine.is_asleep:
            self._map_kv_cache_back()
        with self._phase("wake", "the adapter's copy into vLLM's LoRA slot"):
            try:
                pushed = self.adapter.push()
            except WeightMismatchError:
                self._blame_non_finite_weights()
                raise
        self._add("load_s", pushed["adapter_sync_s"])
        self._add("adapter_sync_s", pushed["adapter_sync_s"])
        self.syncs += 1
        if self.verify_every and self.syncs % self.verify_every == 0:
            with self._phase("verify", "the bitwise comparison of vLLM's adapter (and base) with the trainer's"):
                result = self.adapter.verify()
                seconds = result.seconds
                if not result.ok:
                    self._blame_non_finite_weights()
                result.raise_if_failed()
                if self.base_shared:
                    from rollout_sleep.lora.shared_base import shares_storage_with_engine

                    shared, total = shares_storage_with_engine(self.engine, self.model)
                    if shared != total:
                        raise AssertionError(f"{total - shared} of {total} base parameters of the trainer no longer "
                                             "lie in vLLM's weights (the base is held twice)")
                else:
                    base = verify(self.engine, self.stream)
                    seconds += base.seconds
                    base.raise_if_failed()
            self._add("verify_s", seconds)

    def _blame_non_finite_weights(self) -> None:
        """Weights that hold NaN/inf (refused by the engine's load, or failing verify: NaN never equals NaN)
        are a training problem, not a sync fault: say so, naming the trainer's parameters (this rank's
        shards; no collective)."""
        bad = []
        for name, p in self.model.named_parameters():
            local = local_shard(p)
            if local.numel() and not bool(torch.isfinite(local.detach()).all()):
                bad.append(name)
        if bad:
            from .nonfinite import NonFiniteError

            raise NonFiniteError(f"the trainer's weights hold NaN/inf in {len(bad)} parameter(s) ("
                                 + ", ".join(bad[:8]) + (" ..." if len(bad) > 8 else "") + "): the engine "
                                 "received them as they are, so verify cannot match them bitwise (NaN != NaN). "
                                 "This came from training (a non-finite loss or gradient), not from the sync.")

    def end_step(self) -> dict[str, float]:
        """This step's metrics (seconds per phase, memory, tokens/s); starts the next step's."""
        out, self._step = self._step, {}
        out["cycle_overhead_s"] = sum(out.get(f"{p}_s", 0.0) for p in CYCLE_PHASES)
        return out


def _check_remote(engine: RolloutEngine, weights_dir, verify_every: int, adapter) -> None:
    """What a manager cannot do with an engine that is not in this process (a server), refused before anything
    is touched rather than at the first sync, with the engine asleep."""
    if adapter is not None:
        raise UnsupportedOperation(engine, "a LoRA adapter sync", "the adapter is copied into vLLM's slots in memory",
                                   "an in-process Engine for LoRA")
    if verify_every:
        raise UnsupportedOperation(engine, "verify_weights (verify_every=%d)" % verify_every,
                                   "a server's weights cannot be read back over HTTP",
                                   "RolloutManager(..., verify_every=0); verify an in-process Engine loaded from the "
                                   "same checkpoint")
    if weights_dir is None:
        raise UnsupportedOperation(engine, "wake_up(weights=<the trainer's, in memory>)",
                                   "a vllm serve takes new weights only as a checkpoint directory it can read",
                                   "RolloutManager(engine, model, weights_dir=<a folder the server can read>): each "
                                   "sync saves the trainer's weights there and the server reloads them")
