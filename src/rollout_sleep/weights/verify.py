"""The bitwise proof that the engine holds exactly the trainer's weights (:func:`verify`).

Example:
    >>> engine.wake_up(weights=WeightStream(model, dtype=engine.dtype))      # doctest: +SKIP
    >>> verify(engine, model).raise_if_failed()                               # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .layout import EngineLayout, unchecked_problem
from .stream import WeightStream


@dataclass
class VerifyReport:
    """Result of :func:`verify`: ``ok`` when every tensor was placed in vLLM's layout and is bitwise equal
    to the trainer's weight cast to the engine's dtype; ``max_abs_diff`` against the uncast trainer weight.
    ``unplaced`` names the tensors verify could not find in the engine (and why): they count as failures."""

    ok: bool
    compared: int
    mismatched: dict[str, float] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)
    max_abs_diff: float = 0.0
    seconds: float = 0.0
    note: str = ""  # what else a mismatch may mean (a model type whose vLLM layout is not checked)

    def raise_if_failed(self) -> "VerifyReport":
        if not self.ok:
            worst = sorted(self.mismatched.items(), key=lambda kv: -kv[1])[:10]
            parts = []
            if self.mismatched:
                parts.append(f"engine weights differ from the trainer's in {len(self.mismatched)} tensor(s): "
                             + ", ".join(f"{n} (max abs diff {d:.3g})" for n, d in worst))
            if self.unplaced:
                parts.append(f"{len(self.unplaced)} tensor(s) could not be placed in vLLM's layout: "
                             + ", ".join(f"{n} ({why})" for n, why in list(self.unplaced.items())[:10]))
            raise AssertionError("; ".join(parts) + (f". {self.note}" if self.note else ""))
        return self


def verify(engine, model: nn.Module | WeightStream | list[tuple[str, torch.Tensor]]) -> VerifyReport:
    """Prove the engine holds exactly the trainer's weights: ``engine.verify_weights(model)``, the contract's
    method (:class:`~rollout_sleep.engine.contract.RolloutEngine`; an in-process engine runs
    :func:`verify_in_process`, an HTTP engine refuses by name)."""
    return engine.verify_weights(model)


def verify_in_process(engine, model: nn.Module | WeightStream | list[tuple[str, torch.Tensor]]) -> VerifyReport:
    """Prove the in-process engine holds exactly the trainer's weights, on the device, one tensor at a time.

    Fused vLLM parameters (``qkv_proj``, ``gate_up_proj``, stacked MoE experts) are compared slice by
    slice with the checkpoint tensors that were loaded into them (:mod:`rollout_sleep.weights.layout`), so the
    check covers what vLLM actually holds. On a tensor-parallel engine each rank checks its own shards,
    cut as vLLM's parallel layers cut them. It never raises on a layout: a tensor it cannot place makes
    it fail (``ok=False``), named in ``report.unplaced`` with the reason.
    """
    # a model, its WeightStream, or (name, tensor) pairs (an engine process checks views of the shared buffer)
    stream = WeightStream(model, dtype=engine.dtype) if isinstance(model, nn.Module) else model
    engine.require_awake("verify weights")
    sharded = engine.tensor_parallel_size != 1
    t0 = time.perf_counter()

    def compare(vmodel: nn.Module) -> VerifyReport:
        layout = EngineLayout(vmodel, engine.spec, engine.tied, sharded=sharded)
        report = VerifyReport(ok=True, compared=0)
        with torch.no_grad():
            for name, want in stream:
                try:
                    held = layout.held(name, want)
                except Exception as e:  # never crash on a layout: name the tensor and why
                    held = f"{type(e).__name__}: {e}"
                if isinstance(held, str):
                    report.ok = False
                    report.unplaced[name] = held
                    continue
                got, want = held
                cast = want.to(got.device, got.dtype)
                report.compared += 1
                diff = (got.float() - want.to(got.device).float()).abs().max().item() if got.numel() else 0.0
                report.max_abs_diff = max(report.max_abs_diff, diff)
                if not torch.equal(got, cast):
                    report.ok = False
                    report.mismatched[name] = diff
        return report

    report = engine.run_on_model(compare)
    report.seconds = time.perf_counter() - t0
    unchecked = unchecked_problem(engine.loader.model_type()) if report.mismatched else None
    if unchecked:  # the weights were loaded through vLLM's own loader there ('auto' takes no view of them)
        report.note = (f"This comparison may be wrong rather than the weights: {unchecked}. Verify compares "
                       "through that layout: where the weights were equal before training (the same checkpoint "
                       "on both sides), turn verify off for this model")
    return report

