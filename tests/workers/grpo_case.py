"""One GRPO batch, fed to the recipe's update (``rollout_sleep.grpo.loss.GRPOLoss.step``) and to TRL's own code
(``GRPOTrainer._generate_and_score_completions`` then ``_compute_loss`` per micro-batch, as its training step
runs them). Used by tests/grpo/test_loss.py and grpo_dist_worker.py.

The batch: a tiny random Qwen3 (its weights perturbed, so that a KL to the unperturbed checkpoint is not 0),
2 prompts of different lengths x 8 completions of 1 to 6 tokens, rewards with ties, and "vLLM" log-probs: the
policy's own at the temperature plus noise, one sequence pushed past the sampling-correction cap (its ratio
e^1.5 > 3: masked) and one token without a log-prob (NaN: no correction).
"""

from __future__ import annotations

import copy

import torch

PROMPTS = [[5, 9, 2, 7, 11, 4, 3], [3, 8]]
GROUP = 8
MAX_TOKENS = 6
REWARDS = [1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.5, 2.0, 0.0]
CAPPED_ROW, NAN_ROW = 3, 9


def policy(path: str):
    """The checkpoint with its weights moved a little (deterministically): the model both sides train."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def completions_for(model, temperature: float) -> tuple[list[list[int]], list[list[float]]]:
    """Token ids (uneven lengths) and the sampler's log-probs of them (see the module docstring)."""
    gen = torch.Generator().manual_seed(2)
    lengths = [1 + (i * 5) % MAX_TOKENS for i in range(len(REWARDS))]  # 1..6, every length present
    ids = [torch.randint(10, 250, (n,), generator=gen).tolist() for n in lengths]
    logprobs = []
    with torch.no_grad():
        for i, tokens in enumerate(ids):
            prompt = PROMPTS[i // GROUP]
            logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1].float()
            lp = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
            lp = lp + torch.randn(lp.shape, generator=gen) * 0.01
            if i == CAPPED_ROW:
                lp[0] -= 1.5
            logprobs.append(lp.tolist())
    logprobs[NAN_ROW][0] = float("nan")
    return ids, logprobs


class _Recorder:
    """An optimizer that keeps the gradient it is asked to step with (and changes nothing)."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def step(self):
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def recipe_step(model, ref_model, rows: list[int], ids, logprobs, *, loss_type: str, micro_batch: int,
                temperature: float, beta: float, backward=None, grad_model=None, no_sync=None):
    """The recipe's loss and gradient on ``rows`` of the batch (its ``GRPOLoss``, TRL's defaults: sequence-level
    correction masked above 3, clip 0.2, bias-corrected KL). Returns ``(loss, {name: grad})``."""
    from rollout_sleep.engine.completion import Completion
    from rollout_sleep.grpo.loss import GRPOLoss

    groups = sorted({r // GROUP for r in rows})
    comps = [Completion(groups.index(r // GROUP), PROMPTS[r // GROUP], ids[r], logprobs[r], "", "length")
             for r in rows]
    recorder = _Recorder(grad_model or model)
    loss = GRPOLoss(group_size=GROUP, pad_id=0, loss_type=loss_type, kl_coef=beta, sampling_correction="sequence_mask",
                    sampling_clip_max=3.0, temperature=temperature, max_completion_length=MAX_TOKENS,
                    micro_batch=micro_batch, max_grad_norm=float("inf"))
    stats = loss.step(model, recorder, [PROMPTS[g] for g in groups], comps, torch.tensor([REWARDS[r] for r in rows]),
                      ref_model=ref_model, backward=backward, no_sync=no_sync)
    return stats["loss"], recorder.grads, stats


def trl_step(model, path: str, ids, logprobs, *, loss_type: str, micro_batch: int, temperature: float,
             beta: float, output_dir: str):
    """TRL's loss and gradient on the whole batch: a real ``GRPOTrainer`` (no vLLM on CPU) on a copy of
    ``model``, switched onto its vLLM path (``use_vllm``: the importance-sampling correction) with its
    ``_generate`` answering the batch's token ids and log-probs, as its vLLM generation would; then its own
    ``_generate_and_score_completions`` (advantages, token counts, IS ratios, reference log-probs) and
    ``_compute_loss`` on each micro-batch (TRL's ``split_tensor_dict``, unshuffled so that micro-batches match
    the recipe's), summed as its gradient accumulation sums them. Returns ``(loss, {name: grad})``."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import split_tensor_dict

    steps = len(REWARDS) // micro_batch
    args = GRPOConfig(output_dir=output_dir, per_device_train_batch_size=micro_batch,
                      gradient_accumulation_steps=steps, num_generations=GROUP, max_completion_length=MAX_TOKENS,
                      temperature=temperature, beta=beta, loss_type=loss_type, report_to="none", use_cpu=True,
                      bf16=False, seed=0)

    def reward(completions, reward, **_):
        return list(reward)

    trainer = GRPOTrainer(model=copy.deepcopy(model), reward_funcs=reward, args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["p0", "p1"], "reward": [0.0, 0.0]}),
                          processing_class=AutoTokenizer.from_pretrained(path))
    trainer.use_vllm = True

    def generate(prompts):
        rows = range(len(prompts))
        return ([PROMPTS[r // GROUP] for r in rows], [ids[r] for r in rows], None, ["" for _ in rows],
                [logprobs[r] for r in rows], {}, None, None)

    trainer._generate = generate
    trainer.model.train()
    batch = trainer._generate_and_score_completions(
        [{"prompt": f"p{r // GROUP}", "reward": REWARDS[r]} for r in range(len(REWARDS))])
    trainer.current_gradient_accumulation_steps = steps
    total = 0.0
    for part in split_tensor_dict(batch, steps):
        loss = trainer._compute_loss(trainer.model, part)
        loss.backward()
        total += float(loss)
    return total, {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def grad_rel_diff(a: dict, b: dict) -> float:
    """``|a - b| / |b|`` over all parameters together."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    diff = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a) ** 0.5
    return diff / max(sum(float(b[k].double().pow(2).sum()) for k in b) ** 0.5, 1e-30)
