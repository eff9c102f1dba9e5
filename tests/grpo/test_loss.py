"""The recipe's GRPO update against TRL's own loss code on identical inputs (tests/workers/grpo_case.py), for each
loss type, several micro-batches, temperatures, KL on and off, and two processes; the loss types against a
hand-computed case; vLLM's sampled log-probs against the trainer's at a temperature other than 1."""

from __future__ import annotations

import functools

import pytest
import torch

from rollout_sleep.grpo.loss import LOSS_TYPES, GRPOLoss, group_advantages, grpo_loss, pad_batch

from helpers import WORKERS, run_ranks
from workers import grpo_case as case


# float32 rounding: the same batch padded differently (per micro-batch, or with TRL's left padding and its
# position ids) moves the gradient by ~1e-5 of its norm; the differences this test guards against (micro-batch
# weighting, per-rank means, raw log-probs at temperature 0.7, the KL without its bias correction) are >= 1e-2.
LOSS_RTOL, GRAD_RTOL = 2e-5, 1e-4


DIST_WORKER = WORKERS / "grpo_dist_worker.py"


@pytest.fixture(scope="module")
def setup(ckpts):
    return ckpts["tied0"], case.policy(ckpts["tied0"])


@functools.lru_cache(maxsize=None)
def _inputs(path: str, temperature: float):
    return case.completions_for(case.policy(path), temperature)


@functools.lru_cache(maxsize=None)
def _ref(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)


@functools.lru_cache(maxsize=None)
def _trl(path: str, loss_type: str, micro_batch: int, temperature: float, beta: float, out: str):
    ids, logprobs = _inputs(path, temperature)
    return case.trl_step(case.policy(path), path, ids, logprobs, loss_type=loss_type, micro_batch=micro_batch,
                         temperature=temperature, beta=beta, output_dir=out)


def _assert_same(loss, grads, trl_loss, trl_grads, label):
    assert abs(loss - trl_loss) <= LOSS_RTOL * abs(trl_loss), (label, loss, trl_loss)
    rel = case.grad_rel_diff(grads, trl_grads)
    assert rel < GRAD_RTOL, (label, rel)


CASES = [("dapo", mb, t, beta) for mb in (16, 4) for t in (1.0, 0.7) for beta in (0.0, 0.04)]


CASES += [(lt, 4, 0.7, 0.04) for lt in LOSS_TYPES if lt != "dapo"]


def test_loss_types_hand_computed():
    """Ratios 1.5, 0.5, 1 (clip 0.2) and advantages +1, -2: token terms [-1.2, -0.5, -1] and [2, 3] (one pad)."""
    logp = torch.zeros(2, 3, requires_grad=True)
    old = -torch.log(torch.tensor([[1.5, 0.5, 1.0], [1.0, 1.5, 1.0]]))
    adv, mask = torch.tensor([1.0, -2.0]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    want = {"dapo": 2.3 / 5, "grpo": (-2.7 / 3 + 5 / 2) / 2, "dr_grpo": 2.3 / (2 * 4), "bnpo": 2.3 / 5}
    for loss_type, value in want.items():
        loss, _ = grpo_loss(logp, old, adv, mask, loss_type=loss_type, max_completion_length=4)
        assert abs(float(loss) - value) < 1e-6, (loss_type, float(loss), value)
    # normalizers of a whole batch (what GRPOLoss.step passes each micro-batch): 10 tokens, 4 sequences, 2 micro-batches
    assert abs(float(grpo_loss(logp, old, adv, mask, normalizer=10)[0]) - 0.23) < 1e-6
    assert abs(float(grpo_loss(logp, old, adv, mask, loss_type="grpo", normalizer=4)[0]) - 0.4) < 1e-6
    assert abs(float(grpo_loss(logp, old, adv, mask, loss_type="bnpo", normalizer=2)[0]) - 0.23) < 1e-6
    # dapo gradient: d(-r a)/dlogp = -r a where unclipped, 0 where the clip holds (1.5 > 1.2 with a > 0); / 5 tokens
    grpo_loss(logp, old, adv, mask)[0].backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -0.5, -1.0], [2.0, 3.0, 0.0]]) / 5, atol=1e-6), logp.grad
    with pytest.raises(ValueError, match="unknown loss type 'ppo'"):
        grpo_loss(logp, old, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, old, adv, mask, loss_type="dr_grpo")


@pytest.mark.parametrize("loss_type,micro_batch,temperature,beta", CASES)
def test_update_equals_trl(setup, tmp_path_factory, loss_type, micro_batch, temperature, beta):
    """16 completions in 1 or 4 micro-batches: the recipe's loss and gradient are TRL's (its default loss
    ``dapo``, and ``grpo``/``dr_grpo``/``bnpo``), at temperature 1 and 0.7, KL off and on (bias-corrected)."""
    path, model = setup
    ids, logprobs = _inputs(path, temperature)
    loss, grads, stats = case.recipe_step(model, _ref(path) if beta else None, list(range(16)), ids, logprobs,
                                          loss_type=loss_type, micro_batch=micro_batch, temperature=temperature,
                                          beta=beta)
    trl_loss, trl_grads = _trl(path, loss_type, micro_batch, temperature, beta, str(tmp_path_factory.mktemp("trl")))
    _assert_same(loss, grads, trl_loss, trl_grads, (loss_type, micro_batch, temperature, beta))
    # the case exercises what it claims: one sequence masked by the correction, KL not 0 when on
    assert abs(stats["sampling_weight_mean"] - 1.0) > 0.03 and (stats["kl"] > 0.1) == (beta > 0)


def test_two_processes_equal_trl(setup, tmp_path, tmp_path_factory):
    """Two processes over gloo, DDP, one prompt group each (their token counts differ): after DDP's all-reduce
    each rank holds TRL's full-batch gradient, and the mean of the ranks' losses is TRL's loss, for each loss type;
    with ``no_sync`` (as the recipe passes accelerate's) DDP all-reduces once per optimizer step, not per micro-batch."""
    path, _ = setup
    proc = run_ranks([str(DIST_WORKER), path, str(tmp_path)], timeout=600)
    ranks = [tmp_path / f"rank{r}.pt" for r in range(2)]
    assert all(p.exists() for p in ranks), proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = [torch.load(p) for p in ranks]
    for row in rows:  # 8 rows per rank in micro-batches of 4: no_sync makes it one all-reduce per step, not 2
        assert row["allreduce_rounds_without_no_sync"] == 2, row["allreduce_rounds_without_no_sync"]
        assert [row[t]["allreduce_rounds"] for t in LOSS_TYPES] == [1] * len(LOSS_TYPES)
    for loss_type in LOSS_TYPES:
        trl_loss, trl_grads = _trl(path, loss_type, 4, 0.7, 0.04, str(tmp_path_factory.mktemp("trl")))
        mean_loss = sum(r[loss_type]["loss"] for r in rows) / 2
        for rank, row in enumerate(rows):
            _assert_same(mean_loss, row[loss_type]["grads"], trl_loss, trl_grads, (loss_type, rank))


def test_recipe_config_loss_and_temperature():
    from rollout_sleep.run.config import ConfigError, load_config

    assert load_config(None, ["train.loss=dr_grpo"]).train.loss == "dr_grpo"
    assert load_config(None, []).train.loss == "dapo" and load_config(None, []).train.kl_bias_correction
    with pytest.raises(ConfigError, match="train.loss must be one of dapo, grpo, dr_grpo, bnpo"):
        load_config(None, ["train.loss=ppo"])
    with pytest.raises(ConfigError, match="train.temperature must be > 0"):
        load_config(None, ["train.temperature=0"])


def test_loss_is_configured_once_and_checked_naming_the_key():
    """``GRPOLoss`` refuses bad settings when built, each named (by its setting, or from a config by its key), and
    ``from_config`` reads the recipe's keys."""
    from rollout_sleep.run.config import load_config
    from rollout_sleep.run.schema import RecipeConfig

    with pytest.raises(ValueError, match="loss_type must be one of dapo, grpo, dr_grpo, bnpo, got 'ppo'"):
        GRPOLoss(group_size=8, loss_type="ppo")
    with pytest.raises(ValueError, match="loss_type 'dr_grpo' divides by max_completion_length"):
        GRPOLoss(group_size=8, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="group_size must be >= 2.*; sampling_clip_min \\(4.0\\) must not exceed"):
        GRPOLoss(group_size=1, sampling_clip_min=4.0)
    assert GRPOLoss(group_size=2, max_grad_norm=float("inf")).max_grad_norm == float("inf")  # no clipping
    cfg = load_config(None, ["train.loss=dr_grpo", "train.micro_batch=4", "train.max_tokens=32",
                             "train.sampling_correction=token_truncate", "train.kl_coef=0.04"])
    loss = GRPOLoss.from_config(cfg, pad_id=3)
    assert (loss.loss_type, loss.micro_batch, loss.max_completion_length, loss.sampling_correction, loss.kl_coef,
            loss.group_size, loss.pad_id) == ("dr_grpo", 4, 32, "token_truncate", 0.04, 8, 3)
    bad = RecipeConfig()
    bad.train.temperature, bad.train.sampling_correction = 0.0, "sequence"
    with pytest.raises(ValueError, match="train.sampling_correction must be one of .*; train.temperature must be > 0"):
        GRPOLoss.from_config(bad)


def test_grpo_pieces():
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 2.0]), group_size=2)
    assert adv[:2].abs().max() == 0 and adv[2] < 0 < adv[3]
    ids, attn, positions, mask = pad_batch([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[1, 2, 4, 5, 6], [0, 3, 7, 0, 0]]  # completions start at one column
    assert positions[1, 1:3].tolist() == [0, 1] and attn[1].tolist() == [0, 1, 1, 0, 0]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, stats = grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask)
    loss.backward()
    assert logp.grad[0, 1] < 0 < logp.grad[1, 0] and logp.grad[1, 1] == 0 and stats["clip_frac"] == 0.0
