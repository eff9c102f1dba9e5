"""Run by tests/run/test_watchdog.py under torchrun (2 processes, gloo): the recipe's loop shape, a "generate"
phase then a wait for every rank, each watched as the recipe watches it. ROLLOUT_SLEEP_TEST_STALL stalls
one rank; argv: generate_s collective_s."""

import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from rollout_sleep.run.watchdog import Watchdog

generate_s, collective_s = (float(a) for a in sys.argv[1:3])
dist.init_process_group("gloo", timeout=timedelta(seconds=collective_s + 60))  # torch's timeout: a backstop
rank, world = dist.get_rank(), dist.get_world_size()
watchdog = Watchdog({"generate": generate_s, "collective": collective_s}, rank=rank, world=world,
                    hint="set watchdog.{phase}_s higher (0: no limit)")
for step in range(3):
    with watchdog.phase("generate", "vLLM to generate for 4 prompt(s), n=2"):
        time.sleep(0.1)
    with watchdog.phase("collective", f"all {world} ranks to reach the reward gather of step {step + 1}"):
        dist.all_reduce(torch.ones(1))
print(f"rank {rank} finished", flush=True)
watchdog.close()
