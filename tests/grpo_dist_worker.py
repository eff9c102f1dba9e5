"""Run by tests/test_grpo_vs_trl.py under torchrun (2 processes, gloo): the recipe's update on DDP, each rank
one prompt group of tests/grpo_case.py (micro-batches of 4, temperature 0.7, KL 0.04), for each loss type;
writes each rank's loss and its gradient after DDP's all-reduce to ``rank<r>.pt``."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
import grpo_case as case  # noqa: E402
from rollout_sleep.grpo import LOSS_TYPES  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

path, out = sys.argv[1:3]
dist.init_process_group("gloo")
rank = dist.get_rank()
model = case.policy(path)
ids, logprobs = case.completions_for(model, 0.7)
ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
ddp = torch.nn.parallel.DistributedDataParallel(model)
rows = list(range(rank * case.GROUP, (rank + 1) * case.GROUP))
results = {}
for loss_type in LOSS_TYPES:
    loss, grads, _ = case.recipe_step(ddp, ref, rows, ids, logprobs, loss_type=loss_type, micro_batch=4,
                                      temperature=0.7, beta=0.04, grad_model=model)
    results[loss_type] = {"loss": loss, "grads": grads}
torch.save(results, Path(out) / f"rank{rank}.pt")
dist.barrier()
dist.destroy_process_group()
