"""The non-finite guard: a NaN/inf gradient stops the step before the optimizer applies it."""

from __future__ import annotations

import pytest
import torch

from rollout_sleep.run.nonfinite import NonFiniteError, check_finite, guard_optimizer


def test_non_finite_gradients_stop_the_step_before_the_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard_optimizer(opt, model)
    model(torch.ones(2, 4)).sum().backward()
    opt.step()  # finite: applied
    opt.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state_steps = [float(s["step"]) for s in opt.state.values()]
    (model(torch.ones(2, 4)).sum() * float("nan")).backward()
    with pytest.raises(NonFiniteError, match=r"gradient norm is nan .* the step was not applied .*: 0.weight, "
                                             r"0.bias, 1.weight, 1.bias"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # weights untouched
    assert [float(s["step"]) for s in opt.state.values()] == state_steps  # and the optimizer state
    with pytest.raises(NonFiniteError, match=r"1 of 3 rewards of step 4 are not finite \(first: nan\)"):
        check_finite("rewards of step 4", torch.tensor([1.0, float("nan"), 0.0]))
