"""LoRA with one copy of the base: vLLM holds the frozen base and applies the adapter itself (vLLM's LoRA
support); the trainer trains only the adapter; a sync moves only the adapter's tensors.

Why: with LoRA the base never changes, yet the usual colocated stack keeps two copies of it (the trainer's
and vLLM's) and pushes the merged model at every step. Here:

- the engine is started with ``enable_lora`` and serves every rollout through one adapter slot
  (:attr:`AdapterSync.request`); its base weights are never written after the start;
- :class:`AdapterSync` puts the trainer's PEFT adapter into that slot: the first time through vLLM's own
  in-memory adapter path (``LoRAModel.from_lora_tensors`` + the worker's adapter manager), then by copying
  the tensors straight into the slot's buffers (TP=1), as vLLM's ``activate_adapter`` does (``B`` scaled by
  ``alpha / r`` in the engine's dtype);
- :meth:`AdapterSync.verify` proves bitwise that the slot holds the trainer's adapter, as vLLM would hold it;
- on CUDA the trainer's frozen base parameters can be views of vLLM's weight tensors
  (:func:`trainer_from_engine`): one copy of the base on the GPU. The engine then sleeps at level 0 (KV cache
  released, weights left mapped: :meth:`~rollout_sleep.engine.engine.Engine.sleep`).

On CPU, vLLM repacks linear weights for its kernels, so the trainer cannot share them: the trainer loads its
own base there, and the adapter path, its exactness and :func:`verify` are what runs.

Example:
    >>> settings = LoraSettings(rank=16, alpha=32)                                     # doctest: +SKIP
    >>> engine = Engine(path, **settings.engine_kwargs())                              # doctest: +SKIP
    >>> model = trainer_from_engine(engine, settings)   # CUDA: base = views of vLLM's  # doctest: +SKIP
    >>> adapter = AdapterSync(engine, model); adapter.push()                           # doctest: +SKIP
    >>> engine.generate(prompts, lora_request=adapter.request, max_tokens=8)           # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from rollout_sleep.engine.contract import engine_operation

from .worker import adapter_slots, install_adapter, packed_modules

logger = logging.getLogger(__name__)

# vLLM's allowed ``max_lora_rank`` values (vllm.config.lora.MaxLoRARanks)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_PEFT_PREFIX = "base_model.model."


@dataclass
class LoraSettings:
    """The adapter: rank, alpha (scaling ``alpha / rank``) and the modules it targets (PEFT's
    ``target_modules``: names such as ``q_proj``, or ``all-linear``)."""

    rank: int
    alpha: float | None = None  # None: 2 x rank
    targets: list[str] | str = field(default_factory=lambda: ["all-linear"])

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.rank > VLLM_LORA_RANKS[-1]:
            raise ValueError(f"LoRA rank {self.rank} exceeds vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank

    @property
    def target_modules(self) -> list[str] | str:
        t = self.targets
        if isinstance(t, str):
            return t
        return "all-linear" if list(t) == ["all-linear"] else list(t)

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.target_modules,
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")

    def engine_kwargs(self) -> dict[str, Any]:
        """``vllm.LLM`` arguments for serving this adapter: LoRA on, one slot, the smallest allowed rank
        that holds it."""
        return {"enable_lora": True, "max_loras": 1,
                "max_lora_rank": next(r for r in VLLM_LORA_RANKS if r >= self.rank)}


def adapter_layers(model: nn.Module, adapter: str = "default") -> dict[str, nn.Module]:
    """PEFT LoRA layers holding ``adapter``, by checkpoint module name (``model.layers.0.self_attn.q_proj``)."""
    from rollout_sleep.weights.stream import is_peft, unwrap

    model = unwrap(model)
    if not is_peft(model):
        raise TypeError(f"expected a PEFT model (get_peft_model(...)), got {type(model).__name__}")
    out = {}
    for name, module in model.named_modules():
        if adapter in getattr(module, "lora_A", {}) and hasattr(module, "get_delta_weight"):
            out[name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name] = module
    if not out:
        raise ValueError(f"the model holds no LoRA layer with adapter {adapter!r}")
    return out


def _peft_config_dict(model: nn.Module, adapter: str) -> dict:
    from rollout_sleep.weights.stream import unwrap

    cfg = unwrap(model).peft_config[adapter]
    d = cfg.to_dict()
    for key, value in list(d.items()):  # sets (target_modules) → lists: PEFTHelper reads plain values
        if isinstance(value, set):
            d[key] = sorted(value)
    return d


@dataclass
class AdapterVerifyReport:
    """Result of :meth:`AdapterSync.verify`: ``ok`` when every adapter tensor in vLLM's slot is bitwise what
    vLLM makes of the trainer's (``A`` in the engine's LoRA dtype; ``B`` cast, then scaled) and the slot's
    unused rank columns are zero."""

    ok: bool
    compared: int
    mismatched: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def raise_if_failed(self) -> "AdapterVerifyReport":
        if not self.ok:
            worst = sorted(self.mismatched.items(), key=lambda kv: -kv[1])[:10]
            raise AssertionError(f"vLLM's adapter slot differs from the trainer's adapter in {len(self.mismatched)} "
                                 "tensor(s): " + ", ".join(f"{n} (max abs diff {d:.3g})" for n, d in worst))
        return self


@dataclass
class _Target:
    name: str  # checkpoint module name, e.g. model.layers.0.self_attn.q_proj
    A: torch.Tensor  # the trainer's lora_A weight [r, in]
    B: torch.Tensor  # the trainer's lora_B weight [out, r]
    scaling: float
    slot_a: torch.Tensor | None = None  # vLLM's slot views [max_r, in] / [out, max_r]
    slot_b: torch.Tensor | None = None


class AdapterSync:
    """Moves the trainer's PEFT adapter into the engine's LoRA slot, and proves it got there.

    Args:
        engine: an :class:`~rollout_sleep.engine.engine.Engine` started with ``LoraSettings.engine_kwargs()``.
        model: the trainer's PEFT model (DDP/accelerate-wrapped is fine).
        adapter: *optional*, the PEFT adapter name (``default``).
        method: *optional*, ``auto`` (first push through vLLM's adapter manager, then direct slot copies on
            TP=1), ``install`` (vLLM's adapter manager every time) or ``slots`` (direct copies; needs an
            installed adapter).
        cuda_graph: *optional*, replay the slot copies as one captured CUDA graph (CUDA only).
    """

    METHODS = ("auto", "install", "slots")

    def __init__(self, engine, model: nn.Module, *, adapter: str = "default", method: str = "auto",
                 cuda_graph: bool = True):
        if method not in self.METHODS:
            raise ValueError(f"unknown adapter sync method {method!r}; use {', '.join(self.METHODS)}")
        if engine.tensor_parallel_size != 1:
            raise ValueError(f"AdapterSync serves a TP=1 engine (this one has tensor_parallel_size="
                             f"{engine.tensor_parallel_size}): each rank would hold a cut of the adapter")
        self.engine, self.model, self.adapter, self.method = engine, model, adapter, method
        self.cuda_graph = cuda_graph
        self._graph = None
        layers = adapter_layers(model, adapter)
        self.config = _peft_config_dict(model, adapter)
        self.targets = [_Target(name, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight,
                                float(layer.scaling[adapter])) for name, layer in layers.items()]
        for name, layer in layers.items():
            if getattr(layer, "lora_variant", {}).get(adapter) is not None or getattr(layer, "use_dora", {}).get(adapter):
                raise ValueError(f"{name}: LoRA variants (DoRA) are not served by vLLM's LoRA; use plain LoRA")
            if getattr(layer, "lora_bias", {}).get(adapter):
                raise ValueError(f"{name}: lora_bias is not served by vLLM's LoRA; use bias='none'")
        self.lora_id = 0
        self.request = None
        self.pushes = 0
        self._slots_ready = False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype vLLM holds adapters in (its ``lora_dtype``; ``auto`` = the model's)."""
        cfg = self.engine.llm.llm_engine.vllm_config.lora_config
        dt = getattr(cfg, "lora_dtype", None)
        return dt if isinstance(dt, torch.dtype) else self.engine.dtype

    def tensors(self) -> dict[str, torch.Tensor]:
        """The adapter in PEFT's checkpoint names (``base_model.model.<module>.lora_A.weight``), as
        ``save_pretrained`` writes it."""
        out = {}
        for t in self.targets:
            out[f"{_PEFT_PREFIX}{t.name}.lora_A.weight"] = t.A.detach()
            out[f"{_PEFT_PREFIX}{t.name}.lora_B.weight"] = t.B.detach()
        return out

    def _check_finite(self) -> None:
        """Refuse an adapter holding NaN/Inf before it reaches vLLM: one fused norm over all its tensors and
        one sync (the tensors are named only when one is bad)."""
        from rollout_sleep.engine.feed import non_finite, non_finite_problem
        from rollout_sleep.weights.spec import WeightMismatchError

        tensors = [t.A.detach() for t in self.targets] + [t.B.detach() for t in self.targets]
        if bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all()):
            return
        bad = non_finite(self.tensors().items())
        raise WeightMismatchError([non_finite_problem(n) for n in bad] or
                                  ["the adapter's norm is not finite (a value too large to sum)"])

    def push(self) -> dict[str, float]:
        """Put the trainer's current adapter into the engine's slot (engine awake or asleep at level 0: the
        slot lives with the weights). Returns ``{"adapter_sync_s": seconds, "adapter_method": ...}``.

        An operation of the engine's (:func:`~rollout_sleep.engine.contract.engine_operation`): it waits for a
        generate running in another thread (whose adapter would change under it) and a closed engine refuses it."""
        with engine_operation(self.engine, "push the adapter"):
            return self._push()

    def _push(self) -> dict[str, float]:
        level = self.engine.sleep_level
        if level not in (None, 0):
            from rollout_sleep.engine.state import EngineStateError

            raise EngineStateError(f"the engine is {self.engine.state}: its weights (and the adapter slot) are not "
                                   "mapped; LoRA training sleeps at level 0 (KV cache only)")
        t0 = time.perf_counter()
        if self.engine.check_finite:
            self._check_finite()
        method = self.method
        if method == "auto":
            method = "slots" if self._slots_ready else "install"
        if method == "slots":
            if not self._slots_ready:
                raise RuntimeError("method 'slots' needs an adapter installed first (push once with 'install')")
            if self._graph is not None and self._graph_sources_unchanged():
                self._graph.replay()
                method = "slots_graph"
            else:
                self._copy_into_slots()
        else:
            self._install()
        if self.engine.on_cuda:
            torch.cuda.synchronize()
        self.pushes += 1
        return {"adapter_sync_s": time.perf_counter() - t0, "adapter_method": method}

    def _install(self) -> None:
        from vllm.lora.request import LoRARequest

        self.lora_id += 1
        tensors = self.tensors()
        lora_id, config = self.lora_id, self.config
        held = self.engine.llm.collective_rpc(lambda worker: install_adapter(worker, lora_id, tensors, config))
        if any(lora_id not in h for h in held):
            raise RuntimeError(f"vLLM did not take the adapter (held: {held})")
        # The path is never read for weights (the adapter is already held under this id); vLLM may look there
        # for a tokenizer of the adapter: the base's folder has the base's tokenizer.
        self.request = LoRARequest(f"rollout_sleep_{lora_id}", lora_id, self.engine.model_path)
        self._slots_ready = self._bind_slots()

    def _bind_slots(self) -> bool:
        """Find each target's slot views (TP=1; a layout not recognized leaves the install route on)."""
        if self.engine.tensor_parallel_size != 1:
            return False
        lora_id = self.lora_id
        slots = self.engine.llm.collective_rpc(lambda worker: adapter_slots(worker, lora_id))[0]
        packed = self.engine.llm.collective_rpc(packed_modules)[0]
        bound = []
        for t in self.targets:
            parent, _, sub = t.name.rpartition(".")
            where = None
            if t.name in slots and len(slots[t.name]) == 1:
                where = slots[t.name][0]
            else:
                for fused, subs in packed.items():
                    name = f"{parent}.{fused}"
                    if sub in subs and name in slots and len(slots[name]) == len(subs):
                        where = slots[name][subs.index(sub)]
                        break
            if where is None:
                logger.info("adapter sync: no slot found for %s in vLLM's LoRA layout: 'install' route", t.name)
                return False
            a, b = where
            r = t.A.shape[0]
            if a.shape[0] < r or tuple(a.shape[1:]) != tuple(t.A.shape[1:]) or b.shape[0] != t.B.shape[0] \
                    or b.shape[1] < r:
                logger.info("adapter sync: slot of %s is %s/%s, adapter %s/%s: 'install' route", t.name,
                            tuple(a.shape), tuple(b.shape), tuple(t.A.shape), tuple(t.B.shape))
                return False
            bound.append((t, a[:r], b[:, :r]))
        for t, a, b in bound:
            t.slot_a, t.slot_b = a, b
        self._src_ptrs = [(t.A.data_ptr(), t.B.data_ptr()) for t in self.targets]
        self._groups = {}
        for t in self.targets:  # B is scaled in place after its copy, as vLLM's optimize() does: one group per scale
            self._groups.setdefault(t.scaling, []).append(t.slot_b)
        self._dst = [t.slot_a for t in self.targets] + [t.slot_b for t in self.targets]
        self._graph = self._capture() if self.cuda_graph else None
        return True

    def _capture(self):
        """On CUDA: the slot copies as one CUDA graph (hundreds of small copies, cast and scaled, replayed with
        one launch). Every address is fixed: vLLM's slot buffers, and the trainer's adapter parameters, which
        the optimizer updates in place. ``None`` (eager copies) where capture is not possible."""
        if not self.engine.on_cuda:
            return None
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._copy_into_slots()  # warm-up outside the capture (the values are the current adapter's)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: a CUDA call of another thread meanwhile (the recipe's memory sampler, vLLM's own
            # threads) neither breaks this capture nor is refused by it
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._copy_into_slots()
            return graph
        except Exception as err:  # noqa: BLE001 - a capture that fails leaves the eager copies, said in the log
            logger.info("adapter sync: CUDA graph capture failed (%s: %s); eager slot copies", type(err).__name__, err)
            return None

    def _graph_sources_unchanged(self) -> bool:
        """The adapter parameters still live where the graph reads them (a model reloaded out of place would not)."""
        return all(t.A.data_ptr() == a and t.B.data_ptr() == b for t, (a, b) in zip(self.targets, self._src_ptrs))

    def _copy_into_slots(self) -> None:
        src = [t.A.detach() for t in self.targets] + [t.B.detach() for t in self.targets]
        with torch.no_grad():
            torch._foreach_copy_(self._dst, src)
            for scale, dsts in self._groups.items():
                if scale != 1:
                    torch._foreach_mul_(dsts, scale)

    def verify(self) -> AdapterVerifyReport:
        """Bitwise: every slot tensor equals the trainer's ``A`` in the LoRA dtype and ``B`` cast then
        scaled by ``alpha / r`` (what vLLM makes of an adapter it loads), and the slot's columns past rank
        ``r`` are zero. Reads the whole slot back (vLLM's activation zeroes it first)."""
        with engine_operation(self.engine, "verify the adapter"):
            return self._verify()

    def _verify(self) -> AdapterVerifyReport:
        from rollout_sleep.engine.state import EngineStateError

        if self.engine.sleep_level not in (None, 0):
            raise EngineStateError(f"cannot verify the adapter: the engine is {self.engine.state}")
        if self.lora_id == 0:
            return AdapterVerifyReport(False, 0, {"<no adapter pushed yet>": float("inf")})
        t0 = time.perf_counter()
        lora_id = self.lora_id
        slots = self.engine.llm.collective_rpc(lambda worker: adapter_slots(worker, lora_id))[0]
        packed = self.engine.llm.collective_rpc(packed_modules)[0]
        report = AdapterVerifyReport(ok=True, compared=0)
        dtype = self.dtype
        with torch.no_grad():
            for t in self.targets:
                parent, _, sub = t.name.rpartition(".")
                pair = slots.get(t.name, [None])[0] if len(slots.get(t.name, [])) == 1 else None
                if pair is None:
                    for fused, subs in packed.items():
                        if sub in subs and f"{parent}.{fused}" in slots:
                            pair = slots[f"{parent}.{fused}"][subs.index(sub)]
                if pair is None:
                    report.ok = False
                    report.mismatched[f"{t.name} (no slot)"] = float("inf")
                    continue
                a, b = pair
                r = t.A.shape[0]
                want_a = t.A.detach().to(a.device, dtype)
                want_b = t.B.detach().to(b.device, dtype)
                want_b = want_b * t.scaling if t.scaling != 1 else want_b
                for label, got, want, rest in (("lora_A", a[:r], want_a, a[r:]), ("lora_B", b[:, :r], want_b, b[:, r:])):
                    report.compared += 1
                    same = got.shape == want.shape and torch.equal(got, want) and not bool(rest.any())
                    if not same:
                        report.ok = False
                        diff = (got.float() - want.float()).abs().max().item() if got.shape == want.shape else float("inf")
                        report.mismatched[f"{t.name}.{label}"] = max(diff, float(rest.abs().max()) if rest.numel() else 0.0)
        report.seconds = time.perf_counter() - t0
        return report
