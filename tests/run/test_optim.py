"""Optimizers: the lean settings checked up front, and PyTorch's AdamW on float16 parameters."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rollout_sleep.run.config import ConfigError, load_config
from rollout_sleep.run.optim import build_optimizer

from helpers import cpu_mesh, without_package


def test_optimizer_settings_are_checked_up_front(monkeypatch):
    assert load_config(None, ["train.optimizer=adamw", "train.offload_optimizer=true"]).train.offload_optimizer
    for override, message in [("train.optimizer=sgd", "train.optimizer must be one of adamw, adamw8bit, adamw4bit"),
                              ("train.memory_plan=maybe", "train.memory_plan must be one of refuse, warn, off"),
                              ("train.memory_budget_gib=0", "train.memory_budget_gib must be > 0"),
                              ("train.memory_headroom_gib=-1", "train.memory_headroom_gib must be >= 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    without_package(monkeypatch, "bitsandbytes")
    with pytest.raises(ConfigError, match=r"needs bitsandbytes, which is not installed: pip install bitsandbytes"):
        load_config(None, ["train.optimizer=adamw8bit"])
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        build_optimizer("adamw8bit", torch.nn.Linear(2, 2).parameters(), lr=1e-3, weight_decay=0.0)


def test_adamw_on_float16_parameters_stays_finite_where_a_gradient_is_zero():
    """``model.dtype=float16`` on CPU: every weight was NaN after the first step (PyTorch's unfused AdamW computes
    in float16, where its eps 1e-8 rounds to 0, so an element whose gradient is 0 became 0/0); the recipe stopped
    at the first sync with its files written. The optimizer now computes in float32 there (fused), as on CUDA."""
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16).half()
    opt = build_optimizer("adamw", model.parameters(), lr=3e-3, weight_decay=0.0)
    before = model.weight.detach().clone()
    grad = torch.randn(16, 16, dtype=torch.float16)
    grad[:4] = 0  # rows the loss does not reach (unused tokens' embeddings, masked samples)
    model.weight.grad, model.bias.grad = grad, torch.zeros(16, dtype=torch.float16)
    opt.step()
    assert torch.isfinite(model.weight).all() and torch.isfinite(model.bias).all()
    assert torch.equal(model.weight[:4], before[:4]) and not torch.equal(model.weight[4:], before[4:])
    groups = build_optimizer("adamw", [{"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))]}],
                             lr=1e-3, weight_decay=0.0)
    assert groups.defaults["fused"]  # parameter groups too


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="needs torchao")
def test_a_dropped_torchao_optimizer_frees_its_state_without_the_cycle_collector():
    """The CPU wrapper of torchao's step referred back to the optimizer: a dropped optimizer kept its state (15.5
    GiB at 8B) until Python's next cycle collection (measured: a benchmark's second optimizer ran out of memory)."""
    import gc
    import weakref

    p = torch.nn.Parameter(torch.randn(4096 * 2, dtype=torch.bfloat16))
    p.grad = torch.randn_like(p)
    opt = build_optimizer("adamw8bit", [p], lr=1e-3, weight_decay=0.0, stochastic_rounding=True)
    before = p.detach().clone()
    opt.step()
    assert not torch.equal(p.detach(), before)  # the wrapped step still steps
    gc.disable()
    try:
        gone = weakref.ref(opt)
        del opt
        assert gone() is None
    finally:
        gc.enable()


def test_fsdp2s_dtensor_state_is_measured_and_the_8bit_maps_have_no_zero_code(monkeypatch):
    """FSDP2's optimizer state is DTensors, and torch 2.13's DTensor flattens to its local tensor and its device
    mesh: resident_state_bytes (what the recipe measures of the state, memory_check) took the mesh for a tensor and
    failed with an AttributeError at the first measured rollout after a step of any FSDP2 run. It counts the local
    shards; torchao's AdamW8bit, built before the parameters became DTensors (as accelerate prepares it), keeps
    its second moments' map without a zero code there too."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from rollout_sleep.run.optim import optimizer_state_bytes, resident_state_bytes

    with cpu_mesh(monkeypatch) as mesh:
        for kind, rounding in [("adamw", False), ("adamw8bit", True)]:
            model = torch.nn.Sequential(torch.nn.Embedding(64, 128), torch.nn.Linear(128, 64, bias=False))
            opt = build_optimizer(kind, list(model.parameters()), lr=1e-3, weight_decay=0.0, model=model,
                                  stochastic_rounding=rounding)
            for m in model:  # FSDP2's fully_shard, and accelerate switching the optimizer's parameters
                m.weight = torch.nn.Parameter(distribute_tensor(m.weight.detach(), mesh, [Shard(0)]))
            opt.param_groups[0]["params"] = [m.weight for m in model]
            for m in model:
                m.weight.grad = distribute_tensor(torch.randn(m.weight.shape), mesh, [Shard(0)])
            opt.step()
            sizes = [(64 * 128, 4), (128 * 64, 4)]
            assert resident_state_bytes(opt, "cpu") == optimizer_state_bytes(kind, sizes, (), rounding), kind
        for state in (opt.state[m.weight] for m in model):
            assert type(state["exp_avg"].to_local()).__name__ == "OptimState8bit"
            assert float(state["exp_avg_sq"].to_local().qmap[0]) > 0
