"""Optimizers: the lean and offloaded settings checked up front, and the offload moving the state off the GPU
between steps without changing the step."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rollout_sleep.run.config import ConfigError, load_config
from rollout_sleep.run.optim import OptimizerOffload, build_optimizer, optimizer_state_bytes, resident_state_bytes


def _steps(model, opt, offload, n=3):
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for _ in range(n):
        x = torch.randn(8, 64, generator=g, device=g.device)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if offload is not None:
            assert resident_state_bytes(opt, g.device.type) == 0 or g.device.type == "cpu"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_optimizer_settings_are_checked_up_front(monkeypatch):
    assert load_config(None, ["train.optimizer=adamw", "train.offload_optimizer=true"]).train.offload_optimizer
    for override, message in [("train.optimizer=sgd", "train.optimizer must be one of adamw, adamw8bit, adamw4bit"),
                              ("train.memory_plan=maybe", "train.memory_plan must be one of refuse, warn, off"),
                              ("train.memory_budget_gib=0", "train.memory_budget_gib must be > 0"),
                              ("train.memory_headroom_gib=-1", "train.memory_headroom_gib must be >= 0")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs bitsandbytes, which is not installed: pip install bitsandbytes"):
        load_config(None, ["train.optimizer=adamw8bit"])
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        build_optimizer("adamw8bit", torch.nn.Linear(2, 2).parameters(), lr=1e-3, weight_decay=0.0)


def test_offload_is_a_no_op_where_the_parameters_live_on_the_host():
    model = torch.nn.Linear(64, 64)
    opt = build_optimizer("adamw", model.parameters(), lr=1e-2, weight_decay=0.0)
    offload = OptimizerOffload(opt)
    _steps(model, opt, offload)
    assert not offload.active and offload.pop_timings() == {} and offload.offload() == 0
    assert resident_state_bytes(opt, "cpu") == optimizer_state_bytes("adamw", [(64 * 64, 4), (64, 4)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_the_state_off_the_gpu_between_steps_and_changes_nothing():
    """Fused AdamW on CUDA: with the state offloaded the weights after 3 steps are bitwise those without; between
    steps no state is on the GPU, and the timings report what moved."""
    torch.manual_seed(0)
    ref = torch.nn.Linear(64, 64).cuda()
    model = torch.nn.Linear(64, 64).cuda()
    model.load_state_dict(ref.state_dict())
    opt_ref = build_optimizer("adamw", ref.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    opt = build_optimizer("adamw", model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    offload = OptimizerOffload(opt)
    _steps(ref, opt_ref, None)
    _steps(model, opt, offload)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert resident_state_bytes(opt, "cuda") == 0 and resident_state_bytes(opt, "cpu") > 0
    t = offload.pop_timings()
    assert t["optimizer_offload_s"] > 0 and t["optimizer_reload_s"] > 0 and t["optimizer_offload_gib"] > 0


def test_offload_refuses_optimizers_it_cannot_move_with_the_knob_to_use(monkeypatch):
    """A wrapper holding no torch.optim.Optimizer (DeepSpeed's ZeRO optimizer) used to fail with an AttributeError
    (no step hooks), and FSDP2's DTensor state with 'mixed torch.Tensor and DTensor' at the first offload: both are
    refused where the offload is set up, naming the knob."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    class ZeroLike:  # DeepSpeed's optimizer: param_groups and state, but not a torch.optim.Optimizer
        def __init__(self, params):
            self.param_groups, self.state = [{"params": params}], {}

    class Wrapper:  # accelerate's AcceleratedOptimizer keeps the real one as .optimizer
        def __init__(self, inner):
            self.optimizer = inner

    with pytest.raises(ValueError, match="train.offload_optimizer.*ZeroLike.*offload_optimizer"):
        OptimizerOffload(Wrapper(ZeroLike([torch.nn.Parameter(torch.zeros(2))])))
    # an in-process vLLM engine (the session's) may already hold this process's default group (world size 1)
    created = not dist.is_initialized()
    if created:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        p = torch.nn.Parameter(distribute_tensor(torch.randn(8), mesh, [Shard(0)]))
        with pytest.raises(ValueError, match="DTensor"):
            OptimizerOffload(torch.optim.AdamW([p]))
    finally:
        if created:
            dist.destroy_process_group()


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
