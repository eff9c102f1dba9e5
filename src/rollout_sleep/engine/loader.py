"""The load routes: weights validated before the engine is touched, then pushed into vLLM by one of
``reload`` (``collective_rpc("reload_weights")``), ``load_weights`` (vLLM's model loader in one call) or
``direct`` (copies into vLLM's parameters, CUDA and TP=1), with streams checked as they pass.

:class:`Loader` is held by the :class:`~rollout_sleep.engine.engine.Engine` (``engine.loader``); it owns what it
learns of vLLM's model once (its parameters, packed modules, the direct route's views) and whether the
last load completed.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rollout_sleep.weights import layout
from rollout_sleep.weights.spec import (EMBEDDING, HEAD, TIED, TensorSpec, WeightMismatchError, check_checkpoint_dir,
                                        check_weights, optional_names)

from .feed import Feed, non_finite, non_finite_problem, pair_problem, same, untied_problem

LOAD_METHODS = ("auto", "reload", "load_weights", "direct")

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Weights validated by ``Loader.prepare``: ``kind`` is path / checked (in memory, fully checked) /
    spec (a stream whose names were checked) / stream (checked as it passes)."""

    kind: str
    weights: Any
    strict: bool
    method: str | None


def cpu_moe_problem(example: str | None = None) -> str:
    """Why no weight load into a running mixture-of-experts engine is right on vLLM CPU (``example``: an expert
    tensor of the model, when known)."""
    named = f"; e.g. {example!r}" if example else ""
    return ("loading weights into a running mixture-of-experts model is not supported on vLLM CPU: its MoE kernel "
            "prepacks the stacked experts when the engine starts, and reload_weights leaves them unpacked (the "
            f"engine would silently compute garbage{named}). Start a fresh engine from a saved checkpoint instead, "
            "or run on a GPU")


def copy_all(pairs: Iterable[tuple[torch.Tensor | None, torch.Tensor]], flush_bytes: int = 256 << 20) -> int:
    """Copy each ``(dst, src)`` pair (``dst`` None: skipped), batched into ``torch._foreach_copy_`` calls of up
    to ``flush_bytes`` (a few kernel launches instead of one per tensor; sources are held no longer than one
    batch). Returns the number of tensors copied.

    >>> a, b = torch.zeros(4), torch.zeros(2, 3)
    >>> copy_all([(a, torch.ones(4)), (None, torch.ones(1)), (b[1:], torch.full((1, 3), 2.0))])
    2
    >>> a.tolist(), b.tolist()
    ([1.0, 1.0, 1.0, 1.0], [[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    """
    dsts: list[torch.Tensor] = []
    srcs: list[torch.Tensor] = []
    held = count = 0

    def flush() -> None:
        if dsts:
            torch._foreach_copy_(dsts, srcs, non_blocking=True)
            dsts.clear()
            srcs.clear()

    with torch.no_grad():
        for dst, src in pairs:
            if dst is None:
                continue
            dsts.append(dst)
            srcs.append(src)
            count += 1
            held += src.numel() * src.element_size()
            if held >= flush_bytes:
                flush()
                held = 0
        flush()
    return count


class Loader:
    """Validates and loads weights into one ``vllm.LLM``.

    Args:
        model_path / spec / tied: the engine's checkpoint, its tensor spec and whether its LM head is tied.
        on_cuda / sleep_mode: the platform (CPU: only ``reload`` writes linears right; no sleep allocator).
        load_method: the default route (``auto`` / ``reload`` / ``load_weights`` / ``direct``).
    """

    check_finite = True  # refuse weights holding NaN/Inf (one read of every tensor per load; False skips it)

    def __init__(self, *, model_path: str, spec: dict[str, TensorSpec], tied: bool, on_cuda: bool,
                 sleep_mode: bool, load_method: str = "auto"):
        self.model_path, self.spec, self.tied = model_path, spec, tied
        self.on_cuda, self.sleep_mode, self.load_method = on_cuda, sleep_mode, load_method
        self.llm: Any = None

    def bind(self, llm: Any) -> None:
        """Load into ``llm`` (its weights complete); forget what was learnt of a previous one."""
        self.llm = llm
        self.complete = True  # False after an interrupted or incomplete load, until a complete one
        self.incomplete_reason = ""
        self._engine_params: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
        self._packed: dict[str, list[str]] = {}
        self._has_head = True
        self._targets: dict[str, torch.Tensor] | None = None
        self._direct_ok: bool | None = None
        self._cpu_experts: list[str] | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.llm_engine.model_config.dtype

    def prepare(self, weights: Any, strict: bool, method: str | None = None) -> Prepared:
        """Validate what can be validated before the engine is touched: the method, and for tensors held in
        memory (a mapping or list) their names, shapes, dtypes and values; a stream that knows its spec
        (:class:`~rollout_sleep.weights.stream.WeightStream`) is checked by name here and by value as it passes, any
        other iterable as it passes (and must not be empty)."""
        if method is not None and method not in LOAD_METHODS or self.load_method not in LOAD_METHODS:
            bad = method if method is not None and method not in LOAD_METHODS else self.load_method
            raise ValueError(f"unknown load method {bad!r}; use {', '.join(LOAD_METHODS)}")
        if isinstance(weights, (str, os.PathLike)):
            path = check_checkpoint_dir(weights, self.spec, optional=self.optional())
            if self.tied:
                self._check_tied_dir(path)
            return Prepared("path", path, strict, None)
        resolved = self.resolve_method(method, strict)
        dtype = self.dtype if strict else None
        if isinstance(weights, Mapping):
            weights = list(weights.items())
        if isinstance(weights, (list, tuple)):
            offered = {}
            for item in weights:
                problem = pair_problem(item)
                if problem:
                    raise WeightMismatchError([problem])
                name, tensor = item
                if name in offered:
                    raise WeightMismatchError([f"weight {name!r} given twice in one load"])
                offered[name] = (tuple(tensor.shape), tensor.dtype)
            check_weights(offered, self.spec, optional=self.optional(), strict=strict, dtype=dtype)
            bad = non_finite(weights) if self.check_finite else []
            if bad:
                raise WeightMismatchError([non_finite_problem(n) for n in bad])
            given = dict(weights)
            if self.tied and all(n in given for n in TIED) and not same(given[TIED[0]], given[TIED[1]]):
                raise WeightMismatchError([untied_problem()])
            self._check_whole_groups([n for n, _ in weights], strict, resolved, loaded=None)
            return Prepared("checked", weights, strict, resolved)
        if hasattr(weights, "spec") and callable(weights.spec):  # a stream that knows its contents
            check_weights(weights.spec(), self.spec, optional=self.optional(), strict=strict, dtype=dtype)
            self._check_whole_groups(list(weights.spec()), strict, resolved, loaded=None)
            return Prepared("spec", weights, strict, resolved)
        if isinstance(weights, Iterable):
            it = iter(weights)
            try:
                first = next(it)
            except StopIteration:
                raise WeightMismatchError(["the weight stream is empty: nothing to load (a generator already "
                                           "consumed by an earlier load? build a new one for each load)"]) from None
            problem = pair_problem(first)
            if problem:
                raise WeightMismatchError([problem])
            name, tensor = first  # a wrong name, shape or dtype shows at once: refused before anything is touched
            check_weights({name: (tuple(tensor.shape), tensor.dtype)}, self.spec, optional=self.optional(),
                          strict=False, dtype=dtype)
            return Prepared("stream", itertools.chain([first], it), strict, resolved)
        raise TypeError(f"weights must be a checkpoint path, a mapping or an iterable of (name, tensor); "
                        f"got {type(weights).__name__}")

    @staticmethod
    def _check_tied_dir(path: Path) -> None:
        """A checkpoint with its own ``lm_head.weight`` for a tied engine: it must equal the embedding."""
        from safetensors import safe_open

        found = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                found.update({n: fh.get_tensor(n) for n in TIED if n in fh.keys()})
        if len(found) == 2 and not same(*(found[n] for n in TIED)):
            raise WeightMismatchError([untied_problem()])

    def optional(self) -> set[str]:
        """Checkpoint tensors a load may leave out (a tied LM head: the embedding holds it)."""
        return optional_names(self.tied)

    def load(self, prepared: Prepared, method: str | None = None) -> None:
        """Load prepared weights. A stream is fed to vLLM through a :class:`Feed`, which ends the stream
        early (never raising into vLLM, so its layerwise reload finishes and the next load starts clean)
        when the source breaks or a tensor is wrong; the error is raised here afterwards, with the engine
        marked incomplete."""
        self._check_loadable()  # before anything is written
        self.complete = False
        self.incomplete_reason = "a load was interrupted"
        if prepared.kind == "path":
            self._targets = None
            self._load_path(prepared.weights)
            self.complete = True
            return
        feed = Feed(prepared.weights, check_names=prepared.kind == "stream",
                    check_values=prepared.kind != "checked" and self.check_finite,
                    spec=self.spec, optional=self.optional(), strict=prepared.strict,
                    dtype=self.dtype if prepared.strict else None, tie_head=self.tied and not self.sleep_mode,
                    check_tie=self.tied and prepared.kind != "checked")
        self._push(feed, prepared.method or self.resolve_method(method, prepared.strict))
        error = feed.error_after_load(self.spec, self.optional())
        if error is None and prepared.kind == "stream":
            try:
                self._check_whole_groups(feed.seen, prepared.strict, prepared.method or "", loaded=feed.count)
            except WeightMismatchError as err:
                error = err
        if error is not None:
            problems = getattr(error, "problems", None)
            self.incomplete_reason = (problems[0] + (f"; and {len(problems) - 1} more" if len(problems) > 1 else "")
                                      if problems else str(error).split(". ")[0] or
                                      f"the weight stream raised {type(error).__name__}")[:300]
            raise error
        self.complete = True

    def _check_whole_groups(self, names: Iterable[str], strict: bool, method: str, loaded: int | None) -> None:
        """A subset pushed through vLLM's layerwise reload must hold every shard of each fused parameter it
        touches (q/k/v, gate/up): given only v_proj, the reload rebuilt qkv_proj with q and k wrong, silently."""
        if strict or method != "reload":
            return
        self._inspect()
        given, problems = set(names), []
        for name in sorted(given):
            module, _, leaf = name.rpartition(".")
            parent, _, sub = module.rpartition(".")
            for fused, shards in self._packed.items():
                if sub in shards:
                    missing = [f"{parent}.{s}.{leaf}" for s in shards if f"{parent}.{s}.{leaf}" not in given]
                    if missing and name == min(n for n in (f"{parent}.{s}.{leaf}" for s in shards) if n in given):
                        problems.append(f"{name!r} is part of vLLM's fused {parent}.{fused}, but {missing} were not "
                                        "given: vLLM reloads the fused parameter whole (the rest would be wrong). "
                                        "Give all its parts")
        if problems:
            raise WeightMismatchError(problems, loaded=loaded)

    def resolve_method(self, method: str | None, strict: bool) -> str:
        method = method or self.load_method
        if method not in LOAD_METHODS:
            raise ValueError(f"unknown load method {method!r}; use {', '.join(LOAD_METHODS)}")
        if method == "auto":
            if self.on_cuda and self.direct_supported():
                return "direct"
            # on CPU only vLLM's layerwise reload writes the repacked linears (a subset: whole fused groups)
            return "reload" if strict or not self.on_cuda else "load_weights"  # direct_supported logged why not direct
        if method in ("direct", "load_weights") and not self.on_cuda:
            raise ValueError(f"load method {method!r} needs CUDA: vLLM's CPU kernels repack linear weights, "
                             "only 'reload' writes them correctly there")
        if method == "direct" and not self.direct_supported():
            raise ValueError(f"load method 'direct' does not apply to this model ({self.why_not_direct()}); "
                             "use 'reload'")
        return method

    def _push(self, items: Iterable[tuple[str, torch.Tensor]], method: str) -> None:
        if self.tied:
            self._inspect()
            if not self._has_head:  # e.g. Gemma: vLLM computes logits with the embedding, its loader has no head
                items = ((n, t) for n, t in items if n != HEAD)
        if method == "reload":
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items),
                                                             "is_checkpoint_format": True})
        elif method == "load_weights":
            self.llm.apply_model(lambda model: model.load_weights(iter(items)))
        else:
            targets = self.direct_targets()
            copy_all(((targets.get(name), tensor) for name, tensor in items))  # None: a tied head (the embedding)
        if method != "direct":
            self._targets = None  # vLLM's reload may re-create parameters: rebuild the views next time

    def _load_path(self, path: Path) -> None:
        if self.tied and not self.sleep_mode:
            # vLLM's CPU path reload of a tied model keeps a stale packed LM head: stream the files instead,
            # with the head given explicitly.
            from safetensors import safe_open

            def stream() -> Iterator[tuple[str, torch.Tensor]]:
                for f in sorted(path.glob("*.safetensors")):
                    with safe_open(str(f), "pt") as fh:
                        for name in fh.keys():
                            t = fh.get_tensor(name)
                            yield name, t
                            if name == EMBEDDING:
                                yield HEAD, t

            self._push(stream(), "reload")
        else:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path),
                                                             "is_checkpoint_format": True})

    # ------------------------------------------------- vLLM's view of the model
    def _inspect(self) -> None:
        if self._engine_params is None:
            self._engine_params, self._packed, self._has_head = self.llm.apply_model(layout.describe)[0]

    def _placements(self):
        self._inspect()
        return layout.placements(self.spec, self._packed, {n: s for n, (s, _) in self._engine_params.items()},
                                 self.tied)

    def direct_targets(self) -> dict[str, torch.Tensor]:
        """Views into vLLM's parameters, one per checkpoint tensor (built once; sleep/wake keeps addresses)."""
        if self._targets is None:
            plan = {n: w for n, w in self._placements().items() if n in self.spec}  # a tied head: the embedding's
            self._targets = self.llm.apply_model(lambda model: layout.views(model, plan))[0]
        return self._targets

    def filled_bytes(self) -> dict[str, int]:
        """vLLM parameter → the bytes of it the checkpoint fills (:func:`~rollout_sleep.weights.layout.filled_bytes`)."""
        self._inspect()
        return layout.filled_bytes(self._placements(), self._engine_params)

    def direct_supported(self) -> bool:
        """Whether the ``direct`` route maps every checkpoint tensor exactly (decided once, logged)."""
        if self._direct_ok is None:
            why = self.why_not_direct()
            self._direct_ok = why is None
            if why is None:
                logger.info("load route: 'direct' maps every checkpoint tensor of %s exactly; 'auto' copies into "
                          "vLLM's parameters", self.model_path)
            else:
                logger.info("load route: 'direct' does not apply to %s (%s); 'auto' loads through vLLM's loader "
                          "('reload' / 'load_weights')", self.model_path, why)
        return self._direct_ok

    def _check_loadable(self) -> None:
        """Refuse a weight load that no route makes right on this platform."""
        if self.on_cuda:
            return
        if self._cpu_experts is None:  # the model's layout does not change: look once
            self._cpu_experts = [n for n, w in self._placements().items() if w.expert is not None]
        experts = self._cpu_experts
        if experts:
            raise ValueError(cpu_moe_problem(experts[0]))

    def model_type(self) -> str | None:
        """The transformers ``model_type`` vLLM built its model for."""
        return getattr(self.llm.llm_engine.vllm_config.model_config.hf_config, "model_type", None)

    def why_not_direct(self) -> str | None:
        """Why the ``direct`` route (and a view of vLLM's weights) cannot map this model's weights exactly
        (``None``: it can): :meth:`why_no_views`, or a model type whose layout the tests do not check, where a
        name and a shape that match prove nothing (:func:`~rollout_sleep.weights.layout.unchecked_problem`)."""
        return layout.unchecked_problem(self.model_type()) or self.why_no_views()

    def why_no_views(self) -> str | None:
        """Why some checkpoint tensor has no place of its name and shape in vLLM's parameters (``None``: every one
        has). Enough where the values are compared before they are trusted (a LoRA base rebound to them)."""
        cfg = self.llm.llm_engine.vllm_config
        if cfg.parallel_config.tensor_parallel_size != 1:
            return "tensor parallel > 1"
        if cfg.model_config.quantization is not None:
            return f"quantized weights ({cfg.model_config.quantization})"
        plan = self._placements()
        engine = {n: s for n, (s, _) in self._engine_params.items()}
        unplaced = sorted(set(self.spec) - self.optional() - set(plan))
        if unplaced:
            return f"{len(unplaced)} checkpoint tensor(s) have no known place in vLLM's layout, e.g. {unplaced[0]!r}"
        experts = [n for n, w in plan.items() if w.expert is not None]
        if experts:  # e.g. FlashInfer's MoE kernels reorder w1/w3 or pad after loading: only vLLM's loader knows
            return (f"{len(experts)} stacked MoE expert tensor(s) (vLLM's fused-MoE backends may re-layout them "
                    "after loading)")
        bad = layout.fits(plan, self.spec, engine)
        if bad:
            return f"{len(bad)} tensor(s) are stored in another layout (e.g. repacked), e.g. {bad[0]!r}"
        dtypes = {self._engine_params[w.param][1] for w in plan.values()}
        if any(not dt.is_floating_point for dt in dtypes):
            return "vLLM holds some weights in a non-float (packed) dtype"
        return None
