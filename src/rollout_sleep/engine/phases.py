"""The one list of phase names of a training step, and the per-phase report of a sleep or a wake.

``CYCLE_PHASES`` are the engine's own (sleep, then the memory-safe wake); ``PHASES`` the whole step's, in
order, as the manager times them, the demo prints them and the recipe's timeline shows them.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CYCLE_PHASES = ("sleep", "wake_weights", "load", "wake_kv_cache", "reset")
PHASES = ("generate", "sleep", "train", "wake_weights", "load", "wake_kv_cache", "reset", "verify")


@dataclass
class CycleReport:
    """Seconds per phase and memory figures of one sleep or wake (GiB: free GPU memory, or RSS on CPU)."""

    kind: str
    level: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    memory_gib: dict[str, float] = field(default_factory=dict)
    memory_kind: str = "cuda_free"
    cache_released: bool = False  # a wake that emptied PyTorch's cache first (see release_cached_memory)
    # with keep_trainer_cache on CUDA: whether PyTorch's cached free memory (reserved - allocated: the trainer's
    # cache) was still there after the call, measured around it; None where not asked or not CUDA
    trainer_cache_kept: bool | None = None

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}{k}_s": v for k, v in self.seconds.items()}
        out.update({f"{prefix}{self.memory_kind}_{k}_gib": v for k, v in self.memory_gib.items()})
        if self.kind == "wake":
            out[f"{prefix}cache_released"] = self.cache_released
        if self.trainer_cache_kept is not None:
            out[f"{prefix}trainer_cache_kept"] = self.trainer_cache_kept
        return out


@contextmanager
def timed(report: CycleReport, phase: str, sync: bool = True):
    """Add the block's seconds to ``report.seconds[phase]``; with ``sync`` (in-process), CUDA work queued
    before and inside the block is waited for (no-op without CUDA)."""
    cuda = False
    if sync:
        import torch

        cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    yield
    if cuda:
        torch.cuda.synchronize()
    report.seconds[phase] = report.seconds.get(phase, 0.0) + time.perf_counter() - t0


def plot_timeline(rows: list[dict], path: Path) -> Path | None:
    """Stacked bars of seconds per phase for each step (rows: one dict of ``<phase>_s`` per step), saved to
    ``path``; ``None`` without matplotlib."""
    try:
        from matplotlib.figure import Figure  # no pyplot: the caller's backend stays as it is
    except ImportError:
        return None
    phases = [f"{p}_s" for p in PHASES]
    fig = Figure(figsize=(8, 3.5))
    ax = fig.subplots()
    bottom = [0.0] * len(rows)
    for p in phases:
        vals = [r.get(p, 0.0) for r in rows]
        ax.bar(range(1, len(rows) + 1), vals, bottom=bottom, label=p[:-2])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
