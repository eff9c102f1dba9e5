"""Run by tests/grpo/test_loss.py under torchrun (2 processes, gloo): the recipe's update on DDP, each rank
one prompt group of grpo_case.py (micro-batches of 4, temperature 0.7, KL 0.04), for each loss type, with
DDP's ``no_sync`` as the recipe passes accelerate's; writes each rank's loss, its gradient after DDP's all-reduce
and how many all-reduce rounds each step took (a DDP comm hook counts them; once more without ``no_sync``: one
round per micro-batch) to ``rank<r>.pt``."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import grpo_case as case  # noqa: E402
from rollout_sleep.grpo.loss import LOSS_TYPES  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

path, out = sys.argv[1:3]
dist.init_process_group("gloo")
rank = dist.get_rank()
model = case.policy(path)
ids, logprobs = case.completions_for(model, 0.7)
ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
ddp = torch.nn.parallel.DistributedDataParallel(model)
rounds = []  # one entry per all-reduce round (its first bucket; a round may have several buckets)


def counting_allreduce(state, bucket):
    if bucket.index() == 0:
        rounds.append(1)
    return allreduce_hook(state, bucket)


ddp.register_comm_hook(None, counting_allreduce)
rows = list(range(rank * case.GROUP, (rank + 1) * case.GROUP))
results = {}
for loss_type in LOSS_TYPES:
    rounds.clear()
    loss, grads, _ = case.recipe_step(ddp, ref, rows, ids, logprobs, loss_type=loss_type, micro_batch=4,
                                      temperature=0.7, beta=0.04, grad_model=model, no_sync=ddp.no_sync)
    results[loss_type] = {"loss": loss, "grads": grads, "allreduce_rounds": len(rounds)}
rounds.clear()
case.recipe_step(ddp, ref, rows, ids, logprobs, loss_type="dapo", micro_batch=4, temperature=0.7, beta=0.04,
                 grad_model=model)
results["allreduce_rounds_without_no_sync"] = len(rounds)
torch.save(results, Path(out) / f"rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
