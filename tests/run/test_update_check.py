"""The update check (pure torch, no vLLM): the sampled fraction of weights an optimizer step changed follows the
true fraction, and pure bf16 with a small lr is caught and explained at the first step."""

from __future__ import annotations

import logging

import pytest
import torch

from rollout_sleep.run.update_check import METRIC, UpdateCheck, checkpoint_magnitude, lr_note


def tiny_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # a language model's init std
    return model


def train(dtype: torch.dtype, lr: float, steps: int = 6, every: int = 5, sample: int = 512):
    """``steps`` AdamW steps with the check armed each step; returns the check, its results per step and the true
    fraction of weights with a non-zero gradient that each step changed (every element compared)."""
    model = tiny_model(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    check = UpdateCheck(opt, every=every, sample=sample)
    x = torch.randn(32, 64, dtype=dtype)
    results, truth = [], []
    for step in range(1, steps + 1):
        before = [p.detach().clone() for p in model.parameters()]
        check.arm(step)
        model(x).pow(2).mean().backward()
        opt.step()
        moved = [p.grad != 0 for p in model.parameters()]
        truth.append(sum(int(((p != b) & m).sum()) for p, b, m in zip(model.parameters(), before, moved))
                     / sum(int(m.sum()) for m in moved))
        opt.zero_grad()
        results.append(check.result(step, grad_norm=1.0))
    return check, results, truth


def test_bf16_with_a_small_lr_is_measured_and_explained(caplog):
    with caplog.at_level(logging.WARNING, logger="rollout_sleep.run.update_check"):
        check, results, truth = train(torch.bfloat16, 1e-6)
    first = results[0]
    assert first[METRIC] < 0.05 and first[f"{METRIC}/bfloat16"] == first[METRIC], first
    assert abs(first[METRIC] - truth[0]) < 0.02, (first, truth[0])  # the sample follows every element's truth
    [record] = caplog.records  # once, at the first check
    msg = record.getMessage()
    assert "of the sampled bfloat16 weights" in msg and "did not change at step 1" in msg, msg
    assert "lr=1e-06 is below bfloat16's spacing near |w|~0.013 (6.1e-05), so it rounds away" in msg, msg
    assert "model.dtype=float32 with train.mixed_precision=bf16" in msg and "stochastic rounding" in msg
    # checked steps: the first, then every 5th; the others give nothing
    assert [bool(r) for r in results] == [True, False, False, False, True, False]


@pytest.mark.parametrize("dtype, lr", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3)])
def test_weights_that_move_are_counted_and_not_warned(dtype, lr, caplog):
    with caplog.at_level(logging.WARNING, logger="rollout_sleep.run.update_check"):
        check, results, truth = train(dtype, lr)
    name = str(dtype).removeprefix("torch.")
    for r, t in zip(results, truth):
        if r:
            assert r[METRIC] > 0.9 and r[f"{METRIC}/{name}"] == r[METRIC] and abs(r[METRIC] - t) < 0.02, (r, t)
    assert not caplog.records


def test_fixed_positions_and_bounded_memory():
    """Each tensor's sampled positions are drawn once and reused; at most ``sample`` per tensor (all of a smaller
    one); frozen parameters (no gradient) are not read."""
    model = tiny_model(torch.float32)
    model[2].requires_grad_(False)  # as a PEFT model's frozen base
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    check = UpdateCheck(opt, every=1, sample=300)
    x = torch.randn(8, 64)
    seen = []
    for step in (1, 2):
        check.arm(step)
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        seen.append({k: v.clone() for k, v in check.indices.items()})
        assert check.result(step, grad_norm=1.0)[METRIC] == 1.0
    assert set(seen[0]) == {id(model[0].weight), id(model[0].bias)}  # the frozen layer is not sampled
    assert all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])
    assert 290 <= seen[0][id(model[0].weight)].numel() <= 300  # 300 drawn (repeats removed) of 16384
    assert seen[0][id(model[0].bias)].tolist() == list(range(256))  # a smaller tensor: every element
    assert check.sampled_elements() <= 300 + 256


def test_lr_note_reads_the_checkpoint(tmp_path):
    """The config-time note: the typical |w| read from a few matrices of the checkpoint."""
    from safetensors.torch import save_file

    save_file({"model.layers.0.mlp.down_proj.weight": torch.randn(64, 128) * 0.02,
               "model.embed_tokens.weight": torch.randn(300, 128)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    magnitude = checkpoint_magnitude(tmp_path)
    assert 0.01 < magnitude < 0.017, magnitude  # the median |w| of N(0, 0.02): 0.0135; the embedding is left out
    assert "train.lr=1e-06 is below half of bfloat16's spacing" in lr_note(1e-6, torch.bfloat16, magnitude)
    assert checkpoint_magnitude(tmp_path / "nope") is None


def test_a_parameter_resized_between_checks_gets_new_positions():
    """``p.data = smaller`` keeps the Parameter (and its id) but shrinks it: the sampled positions drawn for the old
    size used to index past the end (IndexError inside optimizer.step)."""
    p = torch.nn.Parameter(torch.randn(5000))
    opt = torch.optim.SGD([p], lr=0.1)
    check = UpdateCheck(opt, every=1, sample=64)
    for step, n in enumerate((5000, 10)):
        p.data = torch.randn(n)
        p.grad = torch.ones_like(p)
        check.arm(step)
        opt.step()
        assert check.result(step, 1.0)[METRIC] == 1.0
    assert check.sampled_elements() == 10


def test_lr_note_ignores_non_finite_weights(tmp_path):
    """A NaN or inf among the sampled weights made the median NaN, and the config-time note then crashed the recipe
    ('cannot convert float NaN to integer' in spacing); the hint now reads the finite values only."""
    from safetensors.torch import save_file

    w = torch.randn(64, 128) * 0.02
    w[0, :3] = torch.tensor([float("nan"), float("inf"), float("nan")])
    save_file({"model.layers.0.mlp.down_proj.weight": w}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    magnitude = checkpoint_magnitude(tmp_path)
    assert 0.01 < magnitude < 0.017, magnitude
    assert lr_note(1e-6, torch.bfloat16, magnitude) is not None
    save_file({"model.layers.0.mlp.down_proj.weight": torch.full((4, 4), float("nan"))},
              str(tmp_path / "model.safetensors"))
    assert checkpoint_magnitude(tmp_path) is None
