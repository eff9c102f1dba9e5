"""The optimizer's state in host memory between steps (``train.offload_optimizer=true``: a real transfer on CUDA,
nothing to move on CPU), and the per-tensor step (``train.step_per_tensor``: one parameter at a time, smallest
first, each gradient freed as it goes), its state on the device or in host memory (``stream``: moved one
parameter's at a time); either equals the plain step bitwise."""

from __future__ import annotations

import io
import os
import re
import weakref

import pytest
import torch

from rollout_sleep.run.config import ConfigError, check_processes, load_config
from rollout_sleep.run.nonfinite import NonFiniteError, guard_optimizer
from rollout_sleep.run.offload import OptimizerOffload
from rollout_sleep.run.per_tensor import PerTensorOptimizer
from rollout_sleep.run.optim import build_optimizer, optimizer_state_bytes, resident_state_bytes, storage_tensors
from rollout_sleep.run.update_check import innermost_optimizer

from helpers import cpu_mesh

# (optimizer, stochastic rounding, weights dtype): PyTorch's AdamW (unfused on CPU: one parameter's update does
# not depend on the others'), torchao's 8- and 4-bit AdamW rounding stochastically into bf16
KINDS = [("adamw", False, torch.float32), ("adamw8bit", True, torch.bfloat16), ("adamw4bit", True, torch.bfloat16)]
# and torchao's 8- and 4-bit AdamW without it (bf16 weights rounded to nearest)
ALL_KINDS = KINDS + [("adamw8bit", False, torch.bfloat16), ("adamw4bit", False, torch.bfloat16)]
STATE_IN = ["host", "device"]  # where the per-tensor step keeps the state: stream, step_per_tensor


def _streamed(optimizer, **kwargs) -> PerTensorOptimizer:
    """The per-tensor step with the state in host memory (``train.offload_optimizer=stream``)."""
    return PerTensorOptimizer(optimizer, state_in="host", **kwargs)


def _steps(model, opt, offload, n=3):
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for _ in range(n):
        x = torch.randn(8, 64, generator=g, device=g.device)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if offload is not None:
            assert resident_state_bytes(opt, g.device.type) == 0 or g.device.type == "cpu"


def test_offload_is_a_no_op_where_the_parameters_live_on_the_host():
    model = torch.nn.Linear(64, 64)
    opt = build_optimizer("adamw", model.parameters(), lr=1e-2, weight_decay=0.0)
    offload = OptimizerOffload(opt)
    _steps(model, opt, offload)
    assert not offload.active and offload.pop_timings() == {} and offload.offload() == 0
    assert resident_state_bytes(opt, "cpu") == optimizer_state_bytes("adamw", [(64 * 64, 4), (64, 4)])


def test_offload_hooks_leave_the_step_its_arguments(monkeypatch):
    """The offload's step hooks return None: PyTorch takes what a pre-hook returns as the step's new (args, kwargs)
    and raises on anything else, so a hook returning the bytes it moved failed every step on CUDA. Here the
    offload is made to think its parameters live on a GPU (nothing is resident, so nothing moves)."""
    import rollout_sleep.run.offload as offload_mod

    monkeypatch.setattr(offload_mod, "_device_of", lambda optimizer: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    model = torch.nn.Linear(8, 8)
    opt = build_optimizer("adamw", model.parameters(), lr=1e-2, weight_decay=0.0)
    offload = OptimizerOffload(opt)
    assert offload.active
    for _ in range(2):
        model(torch.ones(2, 8)).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(h(opt, (), {}) is None for h in opt._optimizer_step_pre_hooks.values())


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
    refused where the offload (between steps or streamed) is set up, naming the knob."""
    from torch.distributed.tensor import Shard, distribute_tensor

    class ZeroLike:  # DeepSpeed's optimizer: param_groups and state, but not a torch.optim.Optimizer
        def __init__(self, params):
            self.param_groups, self.state = [{"params": params}], {}

    class Wrapper:  # accelerate's AcceleratedOptimizer keeps the real one as .optimizer
        def __init__(self, inner):
            self.optimizer = inner

    for setting, offload in [("true", OptimizerOffload), ("stream", _streamed)]:
        with pytest.raises(ValueError, match=f"train.offload_optimizer={setting} .*ZeroLike.*offload_optimizer"):
            offload(Wrapper(ZeroLike([torch.nn.Parameter(torch.zeros(2))])))
    with pytest.raises(ValueError, match="train.step_per_tensor=true .*ZeroLike.*train.step_per_tensor=false"):
        PerTensorOptimizer(Wrapper(ZeroLike([torch.nn.Parameter(torch.zeros(2))])))
    # an in-process vLLM engine (the session's) may already hold this process's default group (cpu_mesh keeps it)
    with cpu_mesh(monkeypatch) as mesh:
        p = torch.nn.Parameter(distribute_tensor(torch.randn(8), mesh, [Shard(0)]))
        for offload in (OptimizerOffload, _streamed):
            with pytest.raises(ValueError, match="DTensor.*train.offload_optimizer=false"):
                offload(torch.optim.AdamW([p]))
        with pytest.raises(ValueError, match="train.step_per_tensor=true .*DTensor.*train.step_per_tensor=false"):
            PerTensorOptimizer(torch.optim.AdamW([p]))




class _Net(torch.nn.Module):
    """Tensors of 4096 elements and more (torchao quantizes their moments) and smaller ones (it does not),
    registered smallest first: the streamed step's order (so stochastic rounding draws alike in both modes)."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(64)  # 64 + 64
        self.embed = torch.nn.Embedding(64, 128)  # 8192
        self.down = torch.nn.Linear(128, 64, bias=False)  # 8192
        self.up = torch.nn.Linear(128, 128, bias=False)  # 16384

    def forward(self, ids):
        return self.norm(self.down(torch.tanh(self.up(self.embed(ids)))))


def _model(dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return _Net().to(device=device, dtype=dtype)


def _backward(model: torch.nn.Module, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(64, (4, 8), generator=g).to(next(model.parameters()).device)
    model(ids).float().square().mean().backward()


def _optimizer(kind, rounding, params) -> torch.optim.Optimizer:
    """``build_optimizer``'s, except torchao's AdamW8bit for ``adamw8bit`` without stochastic rounding (there
    ``build_optimizer`` takes bitsandbytes', which has no CPU build here)."""
    from rollout_sleep.run.optim import missing_package

    if missing_package("adamw4bit" if kind == "adamw8bit" and not rounding else kind, rounding):
        pytest.skip(f"{kind} here needs torchao")  # a machine without it (the GPU host's bare environment)
    if kind == "adamw8bit" and not rounding:
        import torchao.optim

        from rollout_sleep.run.optim import _eager_on_cpu

        return _eager_on_cpu(torchao.optim.AdamW8bit(params, lr=1e-2, weight_decay=0.1))
    return build_optimizer(kind, params, lr=1e-2, weight_decay=0.1, stochastic_rounding=rounding)


def _train(kind, rounding, dtype, per_tensor: str | None, steps: int = 3, device: str = "cpu", state_dict=None, first=0,
           overlap: bool = True, drop=None, after=None, setup=None):
    """``steps`` steps from ``first`` on (``state_dict``: the optimizer's state to start from): the model and the
    optimizer, stepped per tensor with the state in ``per_tensor`` (``"host"``, ``"device"``; ``None``: the plain
    step). ``overlap``: the host state's copies overlapped with its compute (or serial); ``drop(model,
    step)`` may take gradients away before the step (a parameter that does not step); ``setup(opt)`` runs before
    the first step, ``after(opt)`` after each."""
    model = _model(dtype, device)
    opt = _optimizer(kind, rounding, model.parameters())
    if per_tensor is not None:
        opt = PerTensorOptimizer(opt, state_in=per_tensor, overlap=overlap and per_tensor == "host")
    if state_dict is not None:
        model.load_state_dict(state_dict["model"])
        opt.load_state_dict(state_dict["optimizer"])
    if setup is not None:
        setup(opt)
    for step in range(first, first + steps):
        torch.manual_seed(step)  # stochastic rounding draws from the global generator, in the parameters' order
        _backward(model, step)
        if drop is not None:
            drop(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after is not None:
            after(opt)
    return model, opt


@pytest.fixture
def moved(monkeypatch):
    """Every state tensor counts as on the device: the streamed step copies each through its host buffers (here
    host to host, the code path CUDA takes, streams aside), so a state brought, stepped or sent to the wrong place
    shows."""
    from rollout_sleep.run.offload import HostCopies

    monkeypatch.setattr(HostCopies, "resident", lambda self, t: True)


def _all_in_host_buffers(opt) -> bool:
    """Every state tensor of ``opt`` (a PerTensorOptimizer with the state in host memory) is its host buffer:
    nothing left on the "device"."""
    buffers = {id(t) for t in opt.host._host.values()}
    return all(id(t) in buffers for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor))


def _same_state(a: dict, b: dict) -> bool:
    """Two optimizer state dicts hold the same values (torchao's quantized moments compared leaf by leaf)."""
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    for i, state in a["state"].items():
        if state.keys() != b["state"][i].keys():
            return False
        for key, t in state.items():
            u = b["state"][i][key]
            if type(t) is not type(u) or not all(torch.equal(x.cpu(), y.cpu())
                                                 for x, y in zip(storage_tensors(t), storage_tensors(u))):
                return False
    return True


@pytest.mark.parametrize("state_in", STATE_IN)
@pytest.mark.parametrize("kind,rounding,dtype", ALL_KINDS,
                         ids=[f"{k}{'-sr' if r else ''}" for k, r, _ in ALL_KINDS])
def test_per_tensor_step_equals_the_plain_step_bitwise(kind, rounding, dtype, state_in):
    """After 3 steps the weights and the optimizer state are bitwise those of the plain optimizer, the state on
    the device or in host memory, and torchao's moments of the large tensors are quantized (the per-tensor state
    keeps its kind)."""
    ref, ref_opt = _train(kind, rounding, dtype, per_tensor=None)
    model, opt = _train(kind, rounding, dtype, per_tensor=state_in)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert _same_state(ref_opt.state_dict(), opt.state_dict())
    if kind != "adamw":
        moment = type(opt.state[model.embed.weight]["exp_avg"]).__name__
        assert moment == {"adamw8bit": "OptimState8bit", "adamw4bit": "OptimState4bit"}[kind]
    assert opt.pop_timings() == {} and opt.offload() == 0  # the parameters live on the host: nothing moved


def _drop_norm_weight(model, step):
    if step == 1:  # the norm's weight does not step this time: its state stays as it was, in host memory
        model.norm.weight.grad = None


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
@pytest.mark.parametrize("kind,rounding,dtype", KINDS, ids=[k for k, *_ in KINDS])
def test_streamed_step_moving_every_state_equals_the_plain_step_bitwise(kind, rounding, dtype, overlap, moved):
    """With every state tensor copied through its host buffer (the next parameter's brought before this one steps,
    when overlapped), 4 steps of tensors of several sizes, one parameter without a gradient at one step, equal the
    plain optimizer's bitwise; after each step every state tensor is in its host buffer, and the most state held
    at once is three tensors' (the one sent back, the one stepping, the one coming in) overlapped, one serially."""
    ref, ref_opt = _train(kind, rounding, dtype, per_tensor=None, steps=4, drop=_drop_norm_weight)
    after = []
    model, opt = _train(kind, rounding, dtype, per_tensor="host", steps=4, overlap=overlap, drop=_drop_norm_weight,
                        after=lambda o: after.append(_all_in_host_buffers(o)))
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert _same_state(ref_opt.state_dict(), opt.state_dict())
    assert after == [True] * 4
    sizes = sorted((sum(x.numel() * x.element_size() for t in state.values() if isinstance(t, torch.Tensor)
                        for x in storage_tensors(t)), p.numel()) for p, state in opt.state.items())
    sizes = [b for b, _ in sorted(sizes, key=lambda x: x[1])]  # the step's order: smallest tensor first
    most = max(sum(sizes[max(i - 1, 0):i + 2]) for i in range(len(sizes))) if overlap else max(sizes)
    assert opt.step_state_bytes == most


def test_overlapped_step_brings_the_next_state_before_this_one_steps_and_no_further(moved):
    """The copies' order, overlapped: the first state comes in, then for each parameter the next one's copy is
    queued before it steps (one tensor ahead, never two), and its own goes back right after its step; at each
    inner step exactly two states are out of their host buffers (this one's and the next's, none for the last)."""
    model, opt = _train("adamw", False, torch.float32, per_tensor="host", steps=1)
    order = sorted(model.parameters(), key=lambda p: p.numel())
    name = {id(p): i for i, p in enumerate(order)}
    log, bring, send, step = [], opt.host.bring, opt.host.send, opt.inner.step
    buffers = lambda: {id(t) for t in opt.host._host.values()}  # noqa: E731

    def out_of_host():
        return sum(any(isinstance(t, torch.Tensor) and id(t) not in buffers() for t in s.values())
                   for s in opt.state.values())

    opt.host.bring = lambda p, state, stream=None: (log.append(("in", name[id(p)])), bring(p, state, stream))[1]
    opt.host.send = lambda p, state, stream=None: (log.append(("out", name[id(p)])), send(p, state, stream))[1]
    opt.inner.step = lambda: (log.append(("step", [name[id(p)] for p in order if p.grad is not None][0],
                                          out_of_host())), step())[1]
    _backward(model, 1)
    opt.step()
    n = len(order)
    want = [("in", 0)]
    for i in range(n):
        want += ([("in", i + 1)] if i + 1 < n else []) + [("step", i, 2 if i + 1 < n else 1), ("out", i)]
    assert log == want
    assert _all_in_host_buffers(opt) and all(p.grad is None for p in order)


def _step_failing_at_the_third_parameter(model, opt, step: int) -> None:
    """A backward, then ``opt.step()`` with the inner step raising at the third parameter it steps."""
    inner_step, calls = opt.inner.step, []

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return inner_step()

    opt.inner.step = failing
    _backward(model, step)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()


def test_a_failing_inner_step_puts_the_states_it_brought_back_in_host_memory(moved):
    """An error in a parameter's step (after the ones before it stepped) leaves that state and the next one,
    already brought, in their host buffers with their values from before the step, and the gradients not reached
    where they were."""
    model, opt = _train("adamw", False, torch.float32, per_tensor="host", steps=1)
    order = sorted(model.parameters(), key=lambda p: p.numel())
    before = {id(p): {k: t.clone() for k, t in opt.state[p].items()} for p in order}
    _step_failing_at_the_third_parameter(model, opt, 1)
    assert _all_in_host_buffers(opt)
    for p in order[2:]:
        assert all(torch.equal(t, before[id(p)][k]) for k, t in opt.state[p].items())
        assert p.grad is not None
    assert all(p.grad is None for p in order[:2])


def test_a_failing_per_tensor_step_on_the_device_leaves_what_it_did_not_reach(moved):
    """With the state on the device nothing is copied (even where every state counts as on the device). An error
    in the third parameter's step leaves its gradient and the later ones' in place with their states as they were,
    the first two stepped with their gradients freed, and the groups whole again."""
    model, opt = _train("adamw", False, torch.float32, per_tensor="device", steps=1)
    order = sorted(model.parameters(), key=lambda p: p.numel())
    before = {id(p): {k: t.clone() for k, t in opt.state[p].items()} for p in order}
    groups = [[id(p) for p in g["params"]] for g in opt.param_groups]
    _step_failing_at_the_third_parameter(model, opt, 1)
    assert opt.host._host == {} and [[id(p) for p in g["params"]] for g in opt.param_groups] == groups
    for p in order[2:]:
        assert all(torch.equal(t, before[id(p)][k]) for k, t in opt.state[p].items())
        assert p.grad is not None
    for p in order[:2]:
        assert p.grad is None and not torch.equal(opt.state[p]["exp_avg"], before[id(p)]["exp_avg"])


@pytest.mark.parametrize("where", ["device", "host"])
def test_a_per_tensor_first_step_that_fails_leaves_no_state_for_what_it_did_not_reach(where):
    """The first step failing at the third parameter: only the two that stepped have a state (no empty entry for
    the others, which a state_dict would carry)."""
    model, opt = _train("adamw", False, torch.float32, per_tensor=where, steps=0)
    _step_failing_at_the_third_parameter(model, opt, 0)
    order = sorted(model.parameters(), key=lambda p: p.numel())
    assert set(opt.state) == set(order[:2]) and all(opt.state[p] for p in order[:2])
    assert len(opt.state_dict()["state"]) == 2


def test_each_inner_step_sees_its_parameter_alone_and_the_groups_come_back_whole():
    """The inner step's groups hold the parameter stepping and nothing else (its loop visits one parameter, not
    every parameter of every group for each), across two groups with settings of their own, bitwise the plain
    step; after the step the groups are the optimizer's own again (its state_dict numbers the parameters as the
    plain one's). bitsandbytes', which keys its per-parameter settings by position in the groups, is not narrowed."""
    def groups(model):
        return [{"params": [model.norm.weight, model.norm.bias], "weight_decay": 0.0},
                {"params": [model.embed.weight, model.down.weight, model.up.weight], "weight_decay": 0.1}]

    ref, model = _model(torch.float32), _model(torch.float32)
    ref_opt = torch.optim.AdamW(groups(ref), lr=1e-2)
    inner = torch.optim.AdamW(groups(model), lr=1e-2)
    opt = PerTensorOptimizer(inner)
    names = {id(p): n for n, p in model.named_parameters()}
    seen, step = [], inner.step
    inner.step = lambda: (seen.append([[names[id(p)] for p in g["params"]] for g in inner.param_groups]), step())[1]
    for m, o in ((ref, ref_opt), (model, opt)):
        _backward(m, 0)
        o.step()
    assert seen == [[["norm.weight"], []], [["norm.bias"], []], [[], ["embed.weight"]], [[], ["down.weight"]],
                    [[], ["up.weight"]]]  # smallest first, ties in the groups' order
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert _same_state(ref_opt.state_dict(), opt.state_dict())

    class Positional(torch.optim.AdamW):  # bitsandbytes' protocol: settings keyed by (group, position)
        def get_config(self, gindex, pindex, group):
            return {}

    inner = Positional(model.parameters(), lr=1e-2)
    opt, sizes, step = PerTensorOptimizer(inner), [], inner.step
    inner.step = lambda: (sizes.append(len(inner.param_groups[0]["params"])), step())[1]
    _backward(model, 1)
    opt.step()
    assert sizes == [5] * 5


def test_the_state_offloaded_between_steps_composes_with_the_per_tensor_step():
    """``train.offload_optimizer=true`` with ``train.step_per_tensor=true``: the offload wraps the per-tensor
    optimizer (its hooks on it, once per step), a resume loads one parameter's state at a time through both, and 2
    more steps equal the plain ones bitwise."""
    ref, ref_opt = _train("adamw4bit", True, torch.bfloat16, per_tensor=None, steps=4)
    saved, saved_opt = _train("adamw4bit", True, torch.bfloat16, per_tensor=None, steps=2)
    sizes = []

    def setup(opt):
        OptimizerOffload(opt)
        opt.inner.register_load_state_dict_pre_hook(lambda o, sd: sizes.append(len(sd["state"])))

    checkpoint = {"model": saved.state_dict(), "optimizer": saved_opt.state_dict()}
    model, opt = _train("adamw4bit", True, torch.bfloat16, per_tensor="device", steps=0, state_dict=None,
                        setup=setup)
    model.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    assert sizes == [1] * len(saved_opt.state) + [0]
    for step in (2, 3):
        torch.manual_seed(step)
        _backward(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert _same_state(ref_opt.state_dict(), opt.state_dict())


def test_the_per_tensor_step_refuses_a_closure_and_overlap_without_host_state_naming_the_key():
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"train.step_per_tensor=true steps one parameter at a time: it takes no "
                                         r"closure \(set train.step_per_tensor=false"):
        PerTensorOptimizer(torch.optim.AdamW(model.parameters())).step(lambda: 0.0)
    with pytest.raises(ValueError, match="train.offload_optimizer=stream steps one parameter at a time: it takes no "
                                         "closure"):
        _streamed(torch.optim.AdamW(model.parameters())).step(lambda: 0.0)
    with pytest.raises(ValueError, match="state_in='host' only"):
        PerTensorOptimizer(torch.optim.AdamW(model.parameters()), "device", overlap=True)
    with pytest.raises(ValueError, match="state_in must be one of device, host, got 'gpu'"):
        PerTensorOptimizer(torch.optim.AdamW(model.parameters()), "gpu")


@pytest.mark.parametrize("state_in", STATE_IN)
def test_per_tensor_step_goes_smallest_first_one_gradient_at_a_time_and_frees_each(state_in):
    """Each inner step sees exactly one gradient, smallest tensor first (ties in the groups' order), whatever the
    order the model registers them in; the gradients already stepped are freed (none outlives its parameter's
    step), and after the step none is left."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.Tanh(), torch.nn.Linear(128, 64),
                                torch.nn.Linear(64, 4))  # 16384, 128, 8192, 64, 256, 4
    opt = PerTensorOptimizer(build_optimizer("adamw", model.parameters(), lr=1e-2, weight_decay=0.0), state_in)
    params = list(model.parameters())
    model(torch.randn(2, 128)).square().mean().backward()
    grads = [weakref.ref(p.grad) for p in params]
    seen = []
    step = opt.inner.step

    def inner_step(*args, **kwargs):
        seen.append(([i for i, p in enumerate(params) if p.grad is not None],
                     sum(g() is not None for g in grads)))
        return step(*args, **kwargs)

    opt.inner.step = inner_step
    opt.step()
    n = len(params)
    assert [stepped for stepped, _ in seen] == [[5], [3], [1], [4], [2], [0]]  # by size: 4, 64, 128, 256, ...
    assert [alive for _, alive in seen] == list(range(n, 0, -1))  # one fewer gradient alive at each
    assert all(p.grad is None for p in params) and all(g() is None for g in grads)
    assert len(opt.state) == n


@pytest.mark.parametrize("state_in", STATE_IN)
def test_a_non_finite_gradient_stops_the_per_tensor_step_before_anything_changes(state_in):
    """The guard (a step pre-hook) fires once, with every gradient present, before any parameter's state moves or
    steps: a NaN gradient raises and leaves weights, state and gradients as they were. The update check's hooks
    find the per-tensor optimizer (the innermost), not the one it wraps."""
    model, opt = _train("adamw4bit", True, torch.bfloat16, per_tensor=state_in, steps=1)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    guard_optimizer(opt, model)
    assert innermost_optimizer(opt) is opt
    _backward(model, 1)
    model.norm.bias.grad[0] = float("nan")
    weights = [p.detach().clone() for p in model.parameters()]
    state = io.BytesIO()
    torch.save(opt.state_dict(), state)
    inner = []
    opt.inner.step = lambda *a, **k: inner.append(1)
    with pytest.raises(NonFiniteError, match=r"1 parameter\(s\) with non-finite gradients on this rank: norm.bias"):
        opt.step()
    assert calls == ["pre"] and inner == []
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    state.seek(0)
    assert _same_state(torch.load(state, weights_only=False), opt.state_dict())
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("moves", [False, True], ids=["in-place", "moved"])
@pytest.mark.parametrize("saved, resumed", [("host", None), (None, "host"), ("device", None), (None, "device"),
                                            ("host", "device"), ("device", "host")],
                         ids=["stream-to-plain", "plain-to-stream", "device-to-plain", "plain-to-device",
                              "stream-to-device", "device-to-stream"])
def test_a_checkpoint_of_either_mode_resumes_in_the_other(saved, resumed, moves, request):
    """The per-tensor optimizer's state dict is the plain one's, wherever its state lives: 2 steps in one mode,
    saved (through torch.save), 2 more in another equal 4 plain steps bitwise (``true`` keeps the plain
    optimizer's own state dict); also with every host state copied through its host buffers, overlapped
    (``moved``)."""
    if moves:
        request.getfixturevalue("moved")
    kind, rounding, dtype = KINDS[2]
    ref, ref_opt = _train(kind, rounding, dtype, per_tensor=None, steps=4)
    model, opt = _train(kind, rounding, dtype, per_tensor=saved, steps=2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=False)
    back, back_opt = _train(kind, rounding, dtype, per_tensor=resumed, steps=2, first=2, state_dict=checkpoint)
    assert not all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), back.parameters()))
    assert _same_state(ref_opt.state_dict(), back_opt.state_dict())


def test_host_copies_of_torchao_moments_are_built_and_moved_leaf_by_leaf():
    """A quantized moment's host copy is one of its kind built from host leaves (each of which can be pinned), and a
    device copy of it is too: codes, scales and map copied as they are (here CPU to CPU: the path CUDA takes)."""
    from rollout_sleep.run.offload import _empty_like, _host_like

    model, opt = _train("adamw4bit", True, torch.bfloat16, per_tensor=None, steps=1)
    moment = opt.state[model.embed.weight]["exp_avg"]
    host = _host_like(moment, pin=False)
    assert type(host) is type(moment) and host.shape == moment.shape
    for dst, src in zip(storage_tensors(host), storage_tensors(moment)):
        assert dst.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
        dst.copy_(src)
    back = _empty_like(host, torch.device("cpu"))  # as HostCopies.bring builds a device copy, leaf by leaf
    for dst, src in zip(storage_tensors(back), storage_tensors(host)):
        dst.copy_(src)
    assert type(back) is type(moment) and torch.equal(back.dequantize(), moment.dequantize())


def test_step_per_tensor_is_a_bool_implied_by_stream_and_refused_where_deepspeed_or_fsdp_step():
    """``train.step_per_tensor``: off by default; the per-tensor step keeps the state on the device with it, in host
    memory with ``stream`` (which implies it); refused under FSDP and DeepSpeed naming the key and the fix (with
    ``stream`` too, stream's own message alone)."""
    from rollout_sleep.run.per_tensor import state_in

    assert load_config(None, []).train.step_per_tensor is False
    with pytest.raises(ConfigError, match="train.step_per_tensor"):
        load_config(None, ["train.step_per_tensor=stream"])
    for overrides, where in [([], None), (["train.step_per_tensor=true"], "device"),
                             (["train.offload_optimizer=stream"], "host"),
                             (["train.offload_optimizer=stream", "train.step_per_tensor=true"], "host"),
                             (["train.offload_optimizer=true", "train.step_per_tensor=true"], "device")]:
        assert state_in(load_config(None, overrides).train) == where, overrides
    cfg = load_config(None, ["train.step_per_tensor=true"])
    for launch in ("FSDP", "DEEPSPEED"):
        (problem,) = check_processes(cfg, 1, launch)
        assert problem.startswith(f"train.step_per_tensor=true with accelerate's {launch}")
        assert problem.endswith("set train.step_per_tensor=false")
        both = load_config(None, ["train.step_per_tensor=true", "train.offload_optimizer=stream"])
        (problem,) = check_processes(both, 1, launch)
        assert problem.startswith("train.offload_optimizer=stream with")
    assert check_processes(cfg, 1, "MULTI_GPU") == []


def test_the_setting_takes_false_true_and_stream_and_names_the_choices():
    for value, want in [("false", False), ("true", True), ("stream", "stream")]:
        assert load_config(None, [f"train.offload_optimizer={value}"]).train.offload_optimizer == want
    with pytest.raises(ConfigError, match="train.offload_optimizer must be one of false, true, stream, got 'streams'"):
        load_config(None, ["train.offload_optimizer=streams"])
    for bad, said in [("1", "1"), ("0", "0"), ("null", "None"), ("1.0", "1.0"), ("[stream]", "['stream']")]:
        with pytest.raises(ConfigError, match=re.escape(f"train.offload_optimizer must be one of false, true, stream, "
                                                        f"got {said}")):
            load_config(None, [f"train.offload_optimizer={bad}"])
    cfg = load_config(None, ["train.offload_optimizer=stream"])
    for launch in ("FSDP", "DEEPSPEED"):
        (problem,) = check_processes(cfg, 1, launch)
        assert problem.startswith(f"train.offload_optimizer=stream with accelerate's {launch}")
        assert "train.offload_optimizer=false" in problem
    assert check_processes(cfg, 1, "MULTI_GPU") == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "serial"])
@pytest.mark.parametrize("kind,rounding,dtype", KINDS[:2], ids=[k for k, *_ in KINDS[:2]])
def test_streamed_step_on_cuda_keeps_the_state_in_pinned_host_memory(kind, rounding, dtype, overlap):
    """On CUDA (fused AdamW, torchao's compiled step), the copies overlapped with the step or not: bitwise the
    plain step after 3 steps (weights and state); between steps no state is on the GPU, every host copy
    (torchao's quantized moments leaf by leaf) is pinned, and the timings report what moved. The most state on
    the GPU at once is three tensors' overlapped (going out, stepping, coming in), one serially."""
    ref, ref_opt = _train(kind, rounding, dtype, per_tensor=None, device="cuda")
    model, opt = _train(kind, rounding, dtype, per_tensor="host", device="cuda", overlap=overlap)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert _same_state(ref_opt.state_dict(), opt.state_dict())
    assert resident_state_bytes(opt, "cuda") == 0 and resident_state_bytes(opt, "cpu") > 0
    # a step count is the optimizer's own host scalar (PyTorch's unfused AdamW, torchao's): never moved, not pinned
    leaves = [x for state in opt.state.values() for key, t in state.items() if isinstance(t, torch.Tensor)
              and not (key == "step" and t.dim() == 0) for x in storage_tensors(t)]
    assert leaves and all(x.is_pinned() for x in leaves)
    t = opt.pop_timings()
    assert t["optimizer_offload_s"] > 0 and t["optimizer_reload_s"] > 0 and t["optimizer_offload_gib"] > 0
    assert t["optimizer_step_s"] > 0 and 0 <= t["optimizer_copy_wait_s"] <= t["optimizer_step_s"]
    if not overlap:  # serial: no copy hidden
        assert t["optimizer_copy_wait_s"] == pytest.approx(t["optimizer_offload_s"] + t["optimizer_reload_s"])
    sizes = sorted(optimizer_state_bytes(kind, [(p.numel(), p.element_size())], stochastic_rounding=rounding)
                   for p in model.parameters())
    assert 0 < opt.step_state_bytes <= (sum(sizes[-3:]) if overlap else sizes[-1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind,rounding,dtype", KINDS, ids=[k for k, *_ in KINDS])
def test_per_tensor_step_on_cuda_keeps_the_state_on_the_device_and_its_peak_no_higher(kind, rounding, dtype):
    """On CUDA (fused AdamW, torchao's compiled step) with the state on the device: bitwise the plain step after 3
    steps (weights and state), the state on the GPU, nothing moved or timed; a 4th step's allocator peak above what
    it starts with is no higher than the plain step's (the gradients are freed as it goes)."""
    peaks = []

    def fourth(model, opt):
        _backward(model, 3)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        opt.step()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)

    ref, ref_opt = _train(kind, rounding, dtype, per_tensor=None, device="cuda")
    model, opt = _train(kind, rounding, dtype, per_tensor="device", device="cuda")
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert _same_state(ref_opt.state_dict(), opt.state_dict())
    assert resident_state_bytes(opt, "cuda") == resident_state_bytes(ref_opt, "cuda") > 0
    assert not opt.active and opt.pop_timings() == {} and opt.host._host == {}
    fourth(ref, ref_opt)
    fourth(model, opt)
    assert peaks[1] <= peaks[0], peaks


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(os.environ.get("CUDA_LAUNCH_BLOCKING") == "1", reason="kernels synchronous: nothing in flight")
def test_overlapped_step_holds_three_states_when_python_runs_ahead_of_the_copies():
    """24 equal float32 tensors of 4M elements (PyTorch's fused AdamW: 32 MiB of state each), the copies each held
    up by ``torch.cuda._sleep``: Python queues the steps far faster than the copies run. A state sent back stays
    held until its copy is done (``record_stream``), so without a bound every state queued would be on the device
    at once; the step's peak of active memory (what ``max_memory_allocated`` does not see: blocks waiting on a copy
    stream) stays within four states' bytes (three, plus one state's worth of slack)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4 << 20, device="cuda")) for _ in range(24)]
    opt = _streamed(torch.optim.AdamW(params, lr=1e-3, fused=True))  # the default: copies overlapped
    assert opt.overlap
    for step in range(2):  # the first makes the state; the second is measured
        for p in params:
            p.grad = torch.randn_like(p)
        held = opt.host.bring, opt.host.send

        def slow(copy):
            def wrapped(p, state, stream):
                if stream is not None:
                    with torch.cuda.stream(stream):
                        torch.cuda._sleep(2_000_000)
                return copy(p, state, stream)
            return wrapped

        opt.host.bring, opt.host.send = slow(held[0]), slow(held[1])
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_stats()["active_bytes.all.current"]
        try:
            opt.step()
        finally:
            opt.host.bring, opt.host.send = held
        peak = torch.cuda.memory_stats()["active_bytes.all.peak"] - start
    state = 2 * 4 * (4 << 20)  # two float32 moments
    assert peak <= 4 * state, f"{peak / state:.1f} states on the device at once"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(os.environ.get("CUDA_LAUNCH_BLOCKING") == "1", reason="kernels synchronous: nothing in flight")
@pytest.mark.parametrize("kind,rounding,dtype", KINDS[:2], ids=[k for k, *_ in KINDS[:2]])
def test_overlapped_copies_wait_for_each_other_and_no_buffer_is_reused_in_flight(kind, rounding, dtype):
    """Each copy stream is held up (``torch.cuda._sleep`` queued on it before each copy). Before a state comes in,
    the compute stream fills and frees blocks of its leaves' sizes (what the allocator hands the copy); after a
    state goes back it at once allocates blocks of the sizes just let go and fills them. A step that read a state
    before its copy in was done, or memory given to another tensor before its copy out was done
    (``record_stream``), would change the result: 3 steps are bitwise the plain ones, weights and state, and the
    compute stream reports the waits."""
    cycles = 20_000_000  # ~10 ms of an H100's clock per copy
    kept = []

    def leaf_sizes(state, on_gpu):
        return [x.numel() * x.element_size() for t in state.values() if isinstance(t, torch.Tensor)
                for x in storage_tensors(t) if x.is_cuda == on_gpu]

    def fill(sizes):
        return [torch.full((n,), 255, dtype=torch.uint8, device="cuda") for n in sizes]

    def setup(opt):
        bring, send = opt.host.bring, opt.host.send

        def slow_bring(p, state, stream=None):
            fill(leaf_sizes(state, on_gpu=False))  # freed at once: garbage where the copy in will land
            if stream is not None:
                with torch.cuda.stream(stream):
                    torch.cuda._sleep(cycles)
            return bring(p, state, stream)

        def slow_send(p, state, stream=None):
            sizes = leaf_sizes(state, on_gpu=True)
            if stream is not None:
                with torch.cuda.stream(stream):
                    torch.cuda._sleep(cycles)
            moved = send(p, state, stream)
            kept.extend(fill(sizes))  # kept to the step's end: the blocks the state just let go, if reusable
            return moved

        opt.host.bring, opt.host.send = slow_bring, slow_send

    ref, ref_opt = _train(kind, rounding, dtype, per_tensor=None, device="cuda")
    model, opt = _train(kind, rounding, dtype, per_tensor="host", device="cuda", setup=setup,
                        after=lambda o: kept.clear())
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert _same_state(ref_opt.state_dict(), opt.state_dict())
    t = opt.pop_timings()
    assert t["optimizer_copy_wait_s"] > 0.005  # the compute stream waited for held-up copies in


def test_per_tensor_optimizer_refuses_a_parameter_listed_twice_and_being_copied():
    """A parameter listed twice would step twice (the plain optimizer steps it twice too, with a warning); a copy
    or a pickle would lose the host buffers: both refused, saying what to do instead."""
    import copy

    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"train.step_per_tensor=true steps each parameter once: the optimizer "
                                         r"lists a parameter twice \(pass model.parameters\(\)"):
        PerTensorOptimizer(torch.optim.AdamW([model.weight, model.weight, model.bias]))
    with pytest.raises(ValueError, match=r"lists a parameter twice \(pass model.parameters\(\)"):
        _streamed(torch.optim.AdamW([model.weight, model.weight, model.bias]))
    opt = _streamed(torch.optim.AdamW(model.parameters()))
    with pytest.raises(TypeError, match=r"save optimizer.state_dict\(\)"):
        copy.deepcopy(opt)


def test_a_resumed_state_loads_one_parameter_at_a_time_and_is_not_moved_whole_at_the_first_step():
    """Loading goes through the inner optimizer's own ``load_state_dict`` one parameter's state at a time (so the
    GPU never holds it all: each is sent to host memory before the next), and an optimizer that moves its whole
    state to the device at its first step (bitsandbytes' ``to_gpu``) does not: the stream moves it."""

    class MovesAllAtFirstStep(torch.optim.AdamW):  # bitsandbytes' protocol, in pure logic
        def __init__(self, params):
            super().__init__(params, lr=1e-2)
            self.initialized, self.moved_all = False, 0

        def to_gpu(self):
            self.moved_all += 1

        def step(self, closure=None):
            if not self.initialized:
                self.to_gpu()
                self.initialized = True
            return super().step(closure)

    ref, ref_opt = _train("adamw", False, torch.float32, per_tensor=None, steps=2)
    model = _model(torch.float32)
    model.load_state_dict(ref.state_dict())
    inner = MovesAllAtFirstStep(model.parameters())
    opt = _streamed(inner)
    loads = []
    load = inner.load_state_dict
    inner.load_state_dict = lambda sd: (loads.append(len(sd["state"])), load(sd))[1]
    opt.load_state_dict(ref_opt.state_dict())
    assert loads == [1] * len(ref_opt.state) + [0]  # one parameter's state per load, then the groups alone
    assert _same_state(ref_opt.state_dict(), opt.state_dict())
    _backward(model, 2)
    opt.step()
    assert inner.initialized and inner.moved_all == 0


def test_a_resume_with_the_state_offloaded_between_steps_loads_one_parameter_at_a_time():
    """``true`` wraps the optimizer's own loader (bitsandbytes replaces PyTorch's, hooks included): it gets one
    parameter's state at a time (each sent to host memory before the next on CUDA), then the groups' settings, and
    the result is the plain load's."""
    ref, ref_opt = _train("adamw4bit", True, torch.bfloat16, per_tensor=None, steps=2)
    model = _model(torch.bfloat16)
    opt = build_optimizer("adamw4bit", model.parameters(), lr=1e-2, weight_decay=0.1, stochastic_rounding=True)
    OptimizerOffload(opt)
    sizes = []
    opt.register_load_state_dict_pre_hook(lambda o, sd: sizes.append(len(sd["state"])))
    opt.load_state_dict(ref_opt.state_dict())
    assert sizes == [1] * len(ref_opt.state) + [0]  # PyTorch's loader gets each state alone, then the groups
    assert _same_state(ref_opt.state_dict(), opt.state_dict())


@pytest.mark.parametrize("state_in", STATE_IN)
def test_step_hooks_on_the_wrapped_optimizer_are_refused_naming_where_they_go(state_in):
    """A step hook registered on the optimizer before it is wrapped would fire once per parameter, each time with
    one gradient: the non-finite guard there would let the smaller tensors step before it saw a NaN in a larger
    one (and say the step was not applied). Refused, saying to hook the wrapper; hooked there, a NaN changes
    nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 64))
    raw = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = guard_optimizer(raw, model)
    with pytest.raises(ValueError, match=r"step hooks registered on the optimizer it wraps would fire once per "
                                         r"parameter.*register them on the PerTensorOptimizer"):
        PerTensorOptimizer(raw, state_in)
    guard.remove()
    opt = PerTensorOptimizer(raw, state_in)
    guard_optimizer(opt, model)
    model(torch.ones(1, 4)).sum().backward()
    model[1].weight.grad[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteError):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_state_dict_hooks_registered_on_the_per_tensor_optimizer_fire_as_on_the_plain_one():
    """PyTorch's state-dict hooks registered on the wrapper run around its (the inner's) state_dict and
    load_state_dict, their results used, as a plain optimizer's do: not silently skipped."""
    model = torch.nn.Linear(4, 4)
    opt, calls = PerTensorOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1)), []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd_pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append(("ld_pre", sd.get("tag"))))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("ld_post", o is opt)))
    saved = opt.state_dict()
    assert saved["tag"] == 1
    opt.load_state_dict(saved)
    assert calls == [("sd_pre", True), ("ld_pre", 1), ("ld_post", True)]


@pytest.mark.parametrize("state_in", STATE_IN)
def test_zero_grad_keeping_the_gradients_steps_an_unused_parameter_as_the_plain_optimizer_does(state_in):
    """``zero_grad(set_to_none=False)`` keeps zero gradients: a parameter that gets no gradient at the next
    backward still steps in the plain optimizer (its moments decay, its weight decays). The per-tensor step freed
    its gradient; zero_grad gives it back as zeros, so the weights stay the plain step's, bitwise."""
    def run(wrap):
        torch.manual_seed(0)
        a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW([*a.parameters(), *b.parameters()], lr=0.1)
        opt = PerTensorOptimizer(opt, state_in) if wrap else opt
        for step in range(3):
            x = torch.ones(1, 4)
            (a(x).sum() + (b(x).sum() if step == 0 else 0)).backward()  # b unused after the first step
            opt.step()
            opt.zero_grad(set_to_none=False)
        return [p.detach().clone() for p in [*a.parameters(), *b.parameters()]], opt

    (plain, _), (per, opt) = run(False), run(True)
    assert all(torch.equal(x, y) for x, y in zip(plain, per))
    opt.zero_grad()  # set_to_none: the gradients go, and stay gone
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])
