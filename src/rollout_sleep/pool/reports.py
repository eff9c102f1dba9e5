"""What a pool's sleep, wake and verify report: each engine's own report, beside the pool's."""

from __future__ import annotations

from dataclasses import dataclass, field

from rollout_sleep.engine.phases import CycleReport
from rollout_sleep.weights.verify import VerifyReport


@dataclass
class PoolReport(CycleReport):
    """A sleep or wake of every engine: ``seconds`` per phase (``pack``: the trainer's weights into the shared
    buffer; each engine phase: the slowest engine's), ``wall_seconds`` the whole call as the caller waited for
    it (engines work at the same time), ``engines`` each engine's own :class:`CycleReport`."""

    engines: list[CycleReport] = field(default_factory=list)
    wall_seconds: float = 0.0

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        out = super().as_dict(prefix)
        out[f"{prefix}wall_s"] = self.wall_seconds
        for j, r in enumerate(self.engines):
            out.update({f"{prefix}engine{j}_{k}_s": v for k, v in r.seconds.items()})
        return out


@dataclass
class PoolVerifyReport(VerifyReport):
    """:func:`~rollout_sleep.weights.verify.verify` over a pool: ``ok`` when the shared buffer equals the trainer's
    weights (cast to the engines' dtype) and every engine equals the buffer; ``engines``: each engine's own report."""

    engines: list[VerifyReport] = field(default_factory=list)
