"""The tensors of one load on their way to vLLM, checked as they pass (:class:`Feed`), and the NaN/Inf probes
the loader also runs on tensors held in memory."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from rollout_sleep.weights.spec import EMBEDDING, HEAD, TIED, TensorSpec, WeightMismatchError, check_weights

from .state import IncompleteWeightsError, add_note

FINITE_CHECK_BYTES = 256 << 20  # a stream's tensors are checked for NaN/Inf with one device sync per this many bytes


def finite_probe(t: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor on ``t``'s device that is finite iff ``t`` is: its sum, accumulated in fp32 (fp64 for
    fp64). One read of the tensor, no temporary of its size, no sync. (A sum could overflow only for
    weights near 1e38, which are not sane weights either.)"""
    return t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def non_finite(items: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the floating tensors holding a NaN or Inf: one reduction per tensor on its device, stacked,
    then one sync per device (not one per tensor)."""
    probes: dict[torch.device, tuple[list[str], list[torch.Tensor]]] = {}
    for name, t in items:
        if t.is_floating_point() and t.numel():
            names, sums = probes.setdefault(t.device, ([], []))
            names.append(name)
            sums.append(finite_probe(t).double())
    bad = []
    for names, sums in probes.values():
        ok = torch.isfinite(torch.stack(sums))
        if not bool(ok.all()):
            bad += [n for n, good in zip(names, ok.tolist()) if not good]
    return bad


def pair_problem(item: Any) -> str | None:
    """What is wrong with one ``(name, tensor)`` item of a load, or None: checked before vLLM sees it (a
    malformed item or a tensor without data raised inside vLLM's layerwise reload and broke the engine
    for every later load)."""
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        return (f"each weight must be a (name, tensor) pair; got {type(item).__name__}"
                + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
                + " (pass model.state_dict() / named_parameters() or a WeightStream)")
    name, tensor = item
    if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
        return (f"each weight must be a (name: str, tensor: torch.Tensor) pair; got ({type(name).__name__}, "
                f"{type(tensor).__name__}) (numpy arrays: torch.from_numpy)")
    if tensor.is_meta:
        return (f"weight {name!r} is on the meta device (no data): materialize the model first "
                "(to_empty(...) and load its weights)")
    return None


def _tie_sample(t: torch.Tensor) -> torch.Tensor:
    """A few thousand evenly spread elements of ``t`` (a copy): enough to tell an untied head from the
    embedding without holding a second vocabulary-sized tensor."""
    flat = t.detach().reshape(-1)
    return flat[:: max(1, flat.numel() // 4096)].clone()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise-equal values, NaN equal to NaN (a diverged tied embedding is still tied: the NaN check names it)."""
    return a.shape == b.shape and torch.allclose(a, b.to(a.device, a.dtype), rtol=0, atol=0, equal_nan=True)


def untied_problem() -> str:
    return ("'lm_head.weight' differs from 'model.embed_tokens.weight', but the engine's model ties them "
            "(tie_word_embeddings=True): the trainer's model is untied, or its head was trained apart. Build the "
            "engine from a checkpoint with tie_word_embeddings=False, or keep the trainer's head tied")


def non_finite_problem(name: str) -> str:
    return (f"non-finite values (NaN or Inf) in {name!r}: the trainer's weights diverged (check the loss, lower "
            "the learning rate, clip gradients); vLLM would generate garbage from them")


class Feed:
    """The tensors of one load on their way to vLLM, checked as they pass: names, shapes and dtypes (for a
    stream that did not declare them), duplicates, and NaN/Inf (one sync per ``FINITE_CHECK_BYTES``).

    It never raises into vLLM: on a broken source or a bad tensor it ends the stream, so vLLM finishes
    its layerwise reload and puts back what it did not receive (an exception mid-layer left vLLM's
    reload state half-built, and the next complete load failed with ``AttributeError: 'Parameter' object
    has no attribute 'weight_loader'``). :meth:`error_after_load` then says what went wrong.
    """

    def __init__(self, items: Iterable, *, check_names: bool, check_values: bool, spec: dict[str, TensorSpec],
                 optional: set[str], strict: bool, dtype: torch.dtype | None, tie_head: bool = False,
                 check_tie: bool = False):
        self.items, self.check_names, self.check_values = items, check_names, check_values
        self.tie_head = tie_head  # a tied model on CPU: give vLLM the head (the embedding) if the source did not
        self.check_tie = check_tie  # a tied model: a head given must equal the embedding
        self.tie_samples: dict[str, torch.Tensor] = {}
        self.spec, self.optional, self.strict, self.dtype = spec, optional, strict, dtype
        self.seen: set[str] = set()
        self.count = 0  # tensors handed to vLLM
        self.last: str | None = None
        self.source_error: BaseException | None = None
        self.problems: list[str] = []
        self.hint = ""

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        pending: list[tuple[str, torch.Tensor]] = []
        pending_bytes = 0
        source = iter(self.items)
        while True:
            try:
                item = next(source)
            except StopIteration:
                break
            except BaseException as err:  # the trainer's side broke mid-stream (Ctrl-C included: re-raised after)
                self.source_error = err
                break
            problem = pair_problem(item)
            if problem:
                self.problems.append(problem)
                break
            name, tensor = item
            if name in self.seen:
                self.problems.append(f"weight {name!r} given twice in one load (vLLM counts each layer's "
                                     "elements: a repeat would finish a layer before all its tensors arrived)")
                break
            if self.check_names:
                try:
                    check_weights({name: (tuple(tensor.shape), tensor.dtype)}, self.spec, optional=self.optional,
                                  strict=False, dtype=self.dtype)
                except WeightMismatchError as err:
                    self.problems += err.problems
                    self.hint = err.hint
                    break
            if self.check_values and tensor.is_floating_point() and tensor.numel():
                # queued on the tensor's device before it is handed on: reads it while it is valid
                pending.append((name, finite_probe(tensor).double()))
                pending_bytes += tensor.numel() * tensor.element_size()
            if self.check_tie and name in TIED:
                self.tie_samples[name] = _tie_sample(tensor)
                if len(self.tie_samples) == 2 and not same(*(self.tie_samples[n] for n in TIED)):
                    self.problems.append(untied_problem())
                    break
            self.seen.add(name)
            self.count += 1
            self.last = name
            if name == EMBEDDING and self.tie_head:
                embedding = tensor
            yield name, tensor
            if pending_bytes >= FINITE_CHECK_BYTES:
                if not self._all_finite(pending):
                    return
                pending, pending_bytes = [], 0
        if not self.problems and self.source_error is None and self._all_finite(pending) and self.tie_head \
                and HEAD not in self.seen and EMBEDDING in self.seen:
            # vLLM's CPU kernels keep a packed copy of a tied head: without it the head stays stale (silently)
            self.seen.add(HEAD)
            yield HEAD, embedding

    def _all_finite(self, pending: list[tuple[str, torch.Tensor]]) -> bool:
        if not pending:
            return True
        ok = torch.isfinite(torch.stack([p.to(pending[0][1].device) for _, p in pending]))
        if bool(ok.all()):
            return True
        self.problems += [non_finite_problem(n) for (n, _), good in zip(pending, ok.tolist()) if not good]
        return False

    def error_after_load(self, spec: dict[str, TensorSpec], optional: set[str]) -> Exception | None:
        """The error to raise once vLLM has finished with the stream (None: the load was complete)."""
        if self.source_error is not None:
            err = self.source_error
            if not isinstance(err, Exception):  # KeyboardInterrupt / SystemExit: the user's stop, kept as it is
                add_note(err, f"raised by the weight stream after {self.count} tensor(s): the engine is marked "
                              "incomplete; the next complete load works")
                return err
            where = f"after {self.count} tensor(s)" + (f" (the last: {self.last!r})" if self.last else "")
            out = IncompleteWeightsError(
                f"the weight stream broke {where}: {type(err).__name__}: {err}. The engine is marked incomplete "
                "(part of it holds new weights) and refuses to generate until a complete load_weights(...) / "
                "wake_up(weights=...); the next complete load works")
            out.__cause__ = err
            return out
        if self.problems:
            return WeightMismatchError(self.problems, loaded=self.count, hint=self.hint)
        if self.strict:
            missing = sorted(set(spec) - self.seen - optional)
            if missing:
                return WeightMismatchError(
                    [f"missing weight {n!r} (shape {list(spec[n].shape)})" for n in missing], loaded=self.count,
                    hint="The stream ended early: a generator cut short or partly consumed before? With "
                         "strict=True every weight must come in one load (strict=False allows a subset).")
        return None
