"""The non-finite guard: a NaN/inf gradient stops the step before the optimizer applies it."""

from __future__ import annotations

import pytest
import torch

from rollout_sleep.run.nonfinite import NonFiniteError, check_finite, guard_optimizer

from helpers import cpu_mesh


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


def _model_and_guard(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, guard_optimizer(opt, model)


def _backward(model):
    model(torch.ones(2, 4)).sum().backward()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("clipped", [False, True], ids=["computed", "clip_norm"])
def test_one_non_finite_gradient_is_caught_and_named_with_or_without_the_clip_norm(bad, clipped):
    """A NaN/inf in one parameter's gradient: the guard computes the norm (no clipping) or is handed the clip's
    (non-finite, so it computes its own: the clip multiplied every gradient by NaN). Either way the step is refused
    and nothing moves; without clipping exactly the bad parameter is named."""
    model, opt, guard = _model_and_guard()
    _backward(model)
    model[1].weight.grad[0, 2] = bad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if clipped:
        norm = guard.clipping(torch.nn.utils.clip_grad_norm_)(list(model.parameters()), 1.0)
        assert not torch.isfinite(norm)
    # clipping by a NaN norm multiplies every gradient by NaN; by an inf norm, by 0 (the inf one becomes NaN)
    names = "0.weight, 0.bias, 1.weight, 1.bias" if clipped and bad != bad else "1.weight"
    kind = "nan" if clipped or bad != bad else "inf"
    with pytest.raises(NonFiniteError, match=rf"gradient norm is {kind} before the optimizer step; the step was not "
                                             rf"applied \(\d parameter\(s\) .* on this rank: {names}\)"):
        opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert guard.reused == 0


def test_a_finite_clip_norm_is_used_once_and_nothing_is_computed(monkeypatch):
    from rollout_sleep.run import nonfinite

    model, opt, guard = _model_and_guard()
    clip = guard.clipping(torch.nn.utils.clip_grad_norm_)
    _backward(model)
    clip(model.parameters(), 1.0)  # a generator is fine: the wrapper lists it once
    monkeypatch.setattr(nonfinite, "_total_norm", lambda grads: pytest.fail("computed although handed"))
    opt.step()
    assert guard.reused == 1
    monkeypatch.undo()
    opt.step()  # the same gradients again: the handed norm was consumed, the guard computes (and passes)
    assert guard.reused == 1


@pytest.mark.parametrize("change", ["in_place", "replaced", "accumulated", "not_clipped"])
def test_a_stale_clip_norm_is_not_used(change):
    """Finite at the clip, then a gradient changes (in place, a new tensor, another backward) or a parameter's
    gradient was never clipped: the handed norm says nothing about it, the guard computes and catches the NaN."""
    model, opt, guard = _model_and_guard()
    clip = guard.clipping(torch.nn.utils.clip_grad_norm_)
    _backward(model)
    params = list(model.parameters())
    if change == "not_clipped":
        model[1].bias.grad.fill_(float("nan"))
        clip(params[:3], 1.0)  # 1.bias left out of the clip
    else:
        clip(params, 1.0)
    if change == "in_place":
        model[1].bias.grad[0] = float("nan")
    elif change == "replaced":
        model[1].bias.grad = torch.full_like(model[1].bias.grad, float("nan"))
    elif change == "accumulated":
        (model(torch.ones(2, 4)).sum() * float("nan")).backward()
    with pytest.raises(NonFiniteError, match="gradient norm is nan .*1.bias"):
        opt.step()
    assert guard.reused == 0


def test_half_precision_gradients_are_normed_in_float32():
    """fp16 gradients whose norm exceeds fp16's range (65504) are finite: no false alarm (the norm accumulates in
    float32), and a bf16 + float32 mix (two foreach groups) is checked too."""
    p16 = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float16))
    pbf = torch.nn.Parameter(torch.zeros(10, dtype=torch.bfloat16))
    p32 = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p16, pbf, p32], lr=0.0)
    guard = guard_optimizer(opt)
    p16.grad, pbf.grad, p32.grad = torch.full_like(p16, 60000.0), torch.ones_like(pbf), torch.ones_like(p32)
    opt.step()
    pbf.grad[3] = float("inf")
    with pytest.raises(NonFiniteError, match=r"norm is inf .*1 parameter\(s\) .*: parameter 1\)"):
        opt.step()
    guard.remove()
    opt.step()  # unhooked


def test_fsdp2_dtensor_gradients_local_shards(monkeypatch):
    """FSDP2 gradients are DTensors: the guard norms each local shard (no collective per parameter) and tracks
    changes to the shard itself (FSDP2 accumulates into ``grad._local_tensor``, which the DTensor's own version
    counter does not see)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    with cpu_mesh(monkeypatch) as mesh:
        params = [torch.nn.Parameter(distribute_tensor(torch.randn(8, 2), mesh, [Shard(0)])) for _ in range(3)]
        opt = torch.optim.SGD(params, lr=0.1)
        guard = guard_optimizer(opt)
        for p in params:
            p.grad = distribute_tensor(torch.ones(8, 2), mesh, [Shard(0)])
        opt.step()  # computed: finite
        guard.clipping(torch.nn.utils.clip_grad_norm_)(params, 1.0)
        params[2].grad._local_tensor[0, 0] = float("nan")  # after the clip, into the shard
        with pytest.raises(NonFiniteError, match=r"norm is nan .*: parameter 2\)"):
            opt.step()
        assert guard.reused == 0
        params[2].grad = distribute_tensor(torch.ones(8, 2), mesh, [Shard(0)])
        guard.clipping(torch.nn.utils.clip_grad_norm_)(params, 1.0)
        opt.step()
        assert guard.reused == 1


def test_a_nan_on_one_rank_stops_the_step_on_every_rank(tmp_path):
    """Two processes (gloo): rank 0's gradient holds a NaN, rank 1's are finite (computed, then handed by its clip):
    both refuse the step, rank 1 saying the NaN is another rank's."""
    import json

    from helpers import ROOT, WORKERS, run_ranks

    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")}
    proc = run_ranks([str(WORKERS / "nonfinite_worker.py"), str(tmp_path)], timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for err in rows[0]["errors"]:
        assert err and "gradient norm is nan" in err and "on this rank: 0.bias)" in err
    for err in rows[1]["errors"]:
        assert err and "gradient norm is nan" in err and "another rank's are not" in err
    assert rows[1]["reused"] == 1 and rows[0]["reused"] == 0


def test_sparse_gradients_are_checked():
    """``nn.Embedding(sparse=True)`` gives a sparse gradient: normed from its values (``_foreach_norm`` refuses a
    sparse tensor; the guard raised NotImplementedError on every step before), a NaN in it caught and named."""
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    guard_optimizer(opt, emb)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    opt.step()  # finite: applied
    opt.zero_grad()
    (emb(torch.tensor([1, 2])).sum() * float("nan")).backward()
    with pytest.raises(NonFiniteError, match=r"norm is nan .*: weight\)"):
        opt.step()
