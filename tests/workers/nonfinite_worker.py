"""Run by tests/run/test_nonfinite.py under torchrun (2 processes, gloo): the guard's all-reduce makes every rank
refuse a step whose gradient is NaN on one rank only, whether a rank computes its norm or was handed the clip's.
Writes ``rank<r>.json``."""

import json
import os
import sys

import torch
import torch.distributed as dist

from rollout_sleep.run.nonfinite import NonFiniteError, guard_optimizer

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
guard = guard_optimizer(opt, model)
clip = guard.clipping(torch.nn.utils.clip_grad_norm_)
row = {"rank": rank, "errors": []}
for handed in (False, True):  # rank 1 computes; then rank 1 is handed its (finite) clip norm
    model(torch.ones(2, 4)).sum().backward()
    if rank == 0:
        model[0].bias.grad[1] = float("nan")
    elif handed:
        clip(list(model.parameters()), 1.0)
    try:
        opt.step()
        row["errors"].append(None)
    except NonFiniteError as err:
        row["errors"].append(str(err))
    opt.zero_grad(set_to_none=True)
row["reused"] = guard.reused
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
    json.dump(row, fh)
dist.barrier()  # both ranks have written their rows
# exit without gloo's teardown: under load its destructor aborted the process ("terminate called without an
# active exception") after the work was done
sys.stdout.flush()
os._exit(0)
