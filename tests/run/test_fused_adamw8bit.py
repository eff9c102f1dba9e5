"""``run.fused_adamw8bit``: torchao's AdamW8bit with bf16 stochastic rounding, each tensor stepped by one Triton
kernel, against torchao's own step. The kernel's tests run on CUDA (``-m gpu``) and in Triton's interpreter on
the CPU (a child process with ``TRITON_INTERPRET=1``, where Triton is installed); the CPU suite checks the path
that needs neither: without a device Triton runs on, every tensor takes torchao's step, bit for bit."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("torchao")

import torchao.optim  # noqa: E402

from rollout_sleep.run import fused_adamw8bit  # noqa: E402
from rollout_sleep.run.fused_adamw8bit import FusedAdamW8bit, triton_runs  # noqa: E402
from rollout_sleep.run.optim import build_optimizer  # noqa: E402

SHAPES = [(64, 256), (256, 96), (4, 32), (300,), (8200,)]  # quantized x2, plain (under 4096), plain, not a block
# multiple (8200 % 256 != 0: torchao keeps it unquantized)


def _pair(device: str, lr: float = 1e-3, weight_decay: float = 0.01, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w0 = [(torch.randn(s, generator=gen) * 0.02).bfloat16().to(device) for s in SHAPES]
    ours = [torch.nn.Parameter(w.clone()) for w in w0]
    theirs = [torch.nn.Parameter(w.clone()) for w in w0]
    kw = dict(lr=lr, weight_decay=weight_decay, bf16_stochastic_round=True)
    return ours, FusedAdamW8bit(ours, **kw), theirs, torchao.optim.AdamW8bit(theirs, **kw)


def _grads(params, step: int, scale: float = 1e-2):
    gen = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(p.shape, generator=gen) * scale).bfloat16().to(p.device) for p in params]


def _exact(p0: torch.Tensor, m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, step: int, lr: float, wd: float):
    """torchao's update of ``p0`` in float32, unrounded, from dequantized moments ``m`` / ``v`` (float32), and
    the new moments: the value stochastic rounding brackets."""
    p, g = p0.float(), g.float()
    p = p - lr * wd * p
    m = m.lerp(g, 0.1)
    v = v.lerp(g.square(), 0.001)
    n = torch.tensor(float(step))  # float32, as torchao's state["step"]: its bias corrections are float32's
    denom = v.sqrt() / (1 - 0.999 ** n).sqrt() + 1e-8
    return p - lr * (m / (1 - 0.9 ** n)) / denom


def _bf16_down(x: torch.Tensor) -> torch.Tensor:
    """The largest bf16 value <= each float32 ``x``."""
    r = x.bfloat16()
    return torch.where(r.float() <= x, r, torch.nextafter(r, torch.full_like(r, float("-inf")))).float()


def _bf16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= each float32 ``x``."""
    r = x.bfloat16()
    return torch.where(r.float() >= x, r, torch.nextafter(r, torch.full_like(r, float("inf")))).float()


def _bracketed(p: torch.Tensor, exact: torch.Tensor, p0: torch.Tensor) -> bool:
    """Every element of bf16 ``p`` is one of the bf16 values around float32 ``exact`` (what stochastic rounding
    may give), ``exact`` taken with a few float32 rounding errors of its operands either side (where the update
    cancels the weight, those errors are large next to the result)."""
    slack = 1e-6 * (p0.float().abs() + 1e-3)
    got = p.float()
    return bool(((got >= _bf16_down(exact - slack)) & (got <= _bf16_up(exact + slack))).all())


def _dequantized(t) -> torch.Tensor:
    return t.dequantize().float() if hasattr(t, "dequantize") else t.float()


def check_against_torchao(device: str) -> None:
    """One step at a time from the same state: the moments equal torchao's (scales and bf16 plain moments equal,
    codes equal or, for a value at a rounding boundary, a neighbour), the weights bracket torchao's float32
    result; then the weights and states are made equal again (the rounding's random bits differ, as they may)."""
    ours, opt_ours, theirs, opt_theirs = _pair(device)
    for step in range(1, 4):
        grads = _grads(ours, step)
        before = [(p.detach().clone(), [_dequantized(opt_ours.state[p][k]) if opt_ours.state[p] else
                                        torch.zeros(p.shape, device=device) for k in ("exp_avg", "exp_avg_sq")])
                  for p in ours]
        for a, b, g in zip(ours, theirs, grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
        for (p0, (m0, v0)), a, b, g in zip(before, ours, theirs, grads):
            sa, sb = opt_ours.state[a], opt_theirs.state[b]
            for k in ("exp_avg", "exp_avg_sq"):
                x, y = sa[k], sb[k]
                assert type(x) is type(y), k
                if hasattr(x, "codes"):
                    # the nearest code, but for values within a float32 rounding of the midpoint between two
                    # codes (torchao's compiled CUDA step computes m / scale its own way): a neighbour, rarely
                    off = (x.codes.int() - y.codes.int()).abs()
                    assert off.max() <= 1 and (off > 0).float().mean() < 1e-3, (a.shape, k, step, off.sum())
                    torch.testing.assert_close(x.scale, y.scale, rtol=2e-7, atol=0)
                else:
                    assert torch.equal(x, y), (a.shape, k, step)
            # (torchao's compiled CUDA step itself lands a bf16 step further on a few elements in 10^4)
            assert _bracketed(a, _exact(p0, m0, v0, g, step, 1e-3, 0.01), p0), (a.shape, step)
            with torch.no_grad():  # the same state again: the next step's comparison starts equal
                b.copy_(a)
                for k in ("exp_avg", "exp_avg_sq"):
                    sb[k].copy_(sa[k])


def check_unbiased(device: str) -> None:
    """Stochastic rounding keeps the update in expectation: over 200 draws of one step from the same state, the
    mean weight lands within a few standard errors of the float32 result, where round-to-nearest would be off
    by up to half a bf16 step (the update is a tenth of one)."""
    torch.manual_seed(0)
    w0 = torch.full((4096,), 1.0, dtype=torch.bfloat16, device=device)
    g = torch.full((4096,), 1e-3, dtype=torch.bfloat16, device=device)
    lr = 2 ** -8 * 0.1  # a tenth of bf16's spacing at 1.0 per step (AdamW's first step moves by ~lr)
    got = []
    for _ in range(200):
        p = torch.nn.Parameter(w0.clone())
        opt = FusedAdamW8bit([p], lr=lr, weight_decay=0.0, bf16_stochastic_round=True)
        p.grad = g.clone()
        opt.step()
        got.append(p.detach().float())
    got = torch.stack(got)
    exact = 1.0 - lr  # the first step: m / sqrt(v) = sign(g) (to eps)
    assert ((got == 1.0) | (got == 1.0 - 2 ** -8)).all()  # the two bf16 neighbours only
    err = (got.mean() - exact).abs().item()
    assert err < 2e-5, err  # nearest rounding would leave every weight at 1.0: off by lr = 3.9e-4


def check_nan(device: str) -> None:
    """A NaN gradient (what the recipe's non-finite guard stops before a step) stays in its block, as torchao's
    step means it to: that block's scales become NaN (Triton's max would drop the NaN and quantize the block as if
    it were not there), that weight becomes NaN, and at the next step at most the block's weights."""
    ours, opt_ours, *_ = _pair(device)
    for step in range(1, 3):
        grads = _grads(ours, step)
        if step == 1:
            grads[0][0, 5] = float("nan")
        for a, g in zip(ours, grads):
            a.grad = g
        opt_ours.step()
        for k in ("exp_avg", "exp_avg_sq"):
            x = opt_ours.state[ours[0]][k]
            assert bool(x.scale[0].isnan()) and not x.scale[1:].isnan().any(), (step, k)
        nan = ours[0].isnan()
        assert bool(nan[0, 5]) and not nan[1:].any(), step  # block 0 is row 0 (256 elements)


def check_grouping(device: str) -> None:
    """The same draws however the steps are grouped: the plain step and the per-tensor one (smallest first, each
    tensor its own inner step) give bitwise the same weights and state over 3 steps, with two param groups and a
    parameter that has no gradient at one step (its step count lags)."""
    from rollout_sleep.run.per_tensor import PerTensorOptimizer

    def build(seed):
        gen = torch.Generator().manual_seed(seed)
        params = [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).bfloat16().to(device)) for s in SHAPES]
        torch.manual_seed(seed)  # the optimizer's seed
        opt = FusedAdamW8bit([{"params": params[:2]}, {"params": params[2:], "lr": 3e-3, "weight_decay": 0.0}],
                             lr=1e-3, weight_decay=0.01, bf16_stochastic_round=True)
        return params, opt

    plain, opt_plain = build(0)
    each, opt_each = build(0)
    opt_each = PerTensorOptimizer(opt_each)
    for step in range(1, 4):
        for params, opt in ((plain, opt_plain), (each, opt_each)):
            for i, (p, g) in enumerate(zip(params, _grads(params, step))):
                p.grad = None if (step == 2 and i == 1) else g
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(plain, each))
    for a, b in zip(plain, each):
        x, y = opt_plain.state[a], opt_each.state[b]
        assert float(x["step"]) == float(y["step"])
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(x[k].codes, y[k].codes) if hasattr(x[k], "codes") else torch.equal(x[k], y[k])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_step_equals_torchaos_on_cuda():
    assert triton_runs(torch.zeros(1, device="cuda"))
    check_against_torchao("cuda")
    check_unbiased("cuda")
    check_nan("cuda")
    check_grouping("cuda")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter runs the "
                    "kernel on the CPU)")
def test_fused_step_equals_torchaos_in_tritons_interpreter():
    code = textwrap.dedent("""
        import torch, test_fused_adamw8bit as t
        from rollout_sleep.run.fused_adamw8bit import triton_runs
        assert triton_runs(torch.zeros(1))
        t.check_against_torchao("cpu")
        t.check_unbiased("cpu")
        t.check_nan("cpu")
        t.check_grouping("cpu")
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(__file__), *sys.path])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_without_a_device_triton_runs_on_every_tensor_takes_torchaos_step_bit_for_bit(monkeypatch):
    """On the CPU (no interpreter) the fused optimizer is torchao's: same random draws, same weights and state.
    It is what ``build_optimizer`` gives for ``adamw8bit`` with rounding, and it saves torchao's state."""
    monkeypatch.setattr(fused_adamw8bit, "INTERPRET", False)
    ours, opt_ours, theirs, opt_theirs = _pair("cpu")
    with torch.compiler.set_stance("force_eager"):
        for step in range(1, 3):
            for a, b, g in zip(ours, theirs, _grads(ours, step)):
                a.grad, b.grad = g.clone(), g.clone()
            torch.manual_seed(step)
            opt_ours.step()
            torch.manual_seed(step)
            opt_theirs.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    theirs_state = opt_theirs.state_dict()["state"]
    for i, state in opt_ours.state_dict()["state"].items():
        for k, x in state.items():
            y = theirs_state[i][k]
            assert torch.equal(x.codes, y.codes) if hasattr(x, "codes") else torch.equal(x, y)
    built = build_optimizer("adamw8bit", [torch.nn.Parameter(torch.zeros(8, dtype=torch.bfloat16))], lr=1e-6,
                            weight_decay=0.0, stochastic_rounding=True)
    assert type(built) is FusedAdamW8bit


def test_the_kernel_is_chosen_only_where_it_computes_what_torchao_would():
    """Which tensors the kernels take: bf16 with a bf16 gradient, contiguous, AdamW with rounding and no AMSGrad;
    8-bit where both moments are torchao's 256-element quantized state, plain where both are plain tensors."""
    if not triton_runs(torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu")):
        pytest.skip("no device Triton runs on here (CUDA, or its interpreter)")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    big = torch.nn.Parameter(torch.zeros(64, 256, dtype=torch.bfloat16, device=dev))
    small = torch.nn.Parameter(torch.zeros(300, dtype=torch.bfloat16, device=dev))
    f32 = torch.nn.Parameter(torch.zeros(64, 256, device=dev))
    opt = FusedAdamW8bit([big, small, f32], lr=1e-3, bf16_stochastic_round=True)
    for p in (big, small, f32):
        p.grad = torch.zeros_like(p)
    opt.step()
    group = opt.param_groups[0]
    assert opt._kernel_of(big, opt.state[big], group) == "8bit"
    assert opt._kernel_of(small, opt.state[small], group) == "plain"
    assert opt._kernel_of(f32, opt.state[f32], group) is None
    big.grad = torch.zeros(256, 64, dtype=torch.bfloat16, device=dev).t()  # not contiguous
    assert opt._kernel_of(big, opt.state[big], group) is None
    no_rounding = FusedAdamW8bit([small], lr=1e-3, bf16_stochastic_round=False)
    assert no_rounding._kernel_of(small, opt.state[small], group) is None
    # betas of 0.5 or less: torch.lerp computes another formula than the kernels'
    assert opt._kernel_of(small, opt.state[small], {**group, "betas": (0.9, 0.4)}) is None
