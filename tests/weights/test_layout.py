"""vLLM's weight layout: where each checkpoint tensor lives (stacked experts)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("stack", ["experts", "experts.routed_experts"])  # vLLM 0.26 / 0.32 parameter names
def test_layout_places_stacked_experts(stack):
    """Per-expert checkpoint tensors land in their expert's slice of vLLM's stacked w13 (gate, then up)
    and w2, for Qwen3-MoE and Mixtral names; the views write exactly there (the direct loader's targets)."""
    from rollout_sleep.weights import layout

    E, inter, hidden = 3, 4, 5
    spec, engine = {}, {f"m.{stack}.w13_weight": (E, 2 * inter, hidden), f"m.{stack}.w2_weight": (E, hidden, inter)}
    for e in range(E):
        for gate, up, down in (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")):
            if (gate == "w1") != (stack == "experts"):
                continue
            spec[f"m.experts.{e}.{gate}.weight"] = (inter, hidden)
            spec[f"m.experts.{e}.{up}.weight"] = (inter, hidden)
            spec[f"m.experts.{e}.{down}.weight"] = (hidden, inter)
    plan = layout.placements(spec, {}, engine, tied=False)
    assert set(plan) == set(spec) and not layout.fits(plan, spec, engine)
    w13, w2 = torch.zeros(E, 2 * inter, hidden), torch.zeros(E, hidden, inter)
    params = {f"m.{stack}.w13_weight": w13, f"m.{stack}.w2_weight": w2}
    for i, (name, where) in enumerate(sorted(plan.items())):
        layout.view(params[where.param], where).fill_(i + 1)
    for i, (name, where) in enumerate(sorted(plan.items())):
        e = int(name.split(".")[2])
        role = name.split(".")[3]
        got = {"gate_proj": w13[e, :inter], "w1": w13[e, :inter], "up_proj": w13[e, inter:], "w3": w13[e, inter:],
               "down_proj": w2[e], "w2": w2[e]}[role]
        assert (got == i + 1).all(), name
    # a fourth expert that this engine does not hold is left out, not placed elsewhere
    spec["m.experts.3.w2.weight" if stack == "experts" else "m.experts.3.down_proj.weight"] = (hidden, inter)
    assert len(layout.placements(spec, {}, engine, tied=False)) == len(plan)
