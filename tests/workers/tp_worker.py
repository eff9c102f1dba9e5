"""Run by tests/engine/test_tensor_parallel.py under torchrun (2 processes, gloo): ONE tensor-parallel engine across the
two ranks (TP=2, vLLM's external_launcher), a sleep → wake with the trainer's weights → reset cycle, and the
engine's greedy tokens and teacher-forced log-probs compared with transformers on the new weights, and
``verify`` on each rank's shards (intact, then with two trainer tensors corrupted)."""

import json
import os
import sys

import torch
import torch.distributed as dist

ckpt_engine, ckpt_trainer, out_dir = sys.argv[1:4]
dist.init_process_group("gloo")
rank = dist.get_rank()

from rollout_sleep.engine.engine import Engine  # noqa: E402
from rollout_sleep.weights.stream import WeightStream  # noqa: E402
from rollout_sleep.weights.verify import verify  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

prompts = [[(7 * i + 3 * j) % 250 + 1 for j in range(12)] for i in range(4)]
engine = Engine(ckpt_engine, dtype="float32", seed=0, tensor_parallel_size=2)
before = [c.token_ids for c in engine.generate(prompts, max_tokens=8, min_tokens=8, temperature=0.0)]
model = AutoModelForCausalLM.from_pretrained(ckpt_trainer, dtype=torch.float32).eval()
engine.sleep(level=2)
report = engine.wake_up(weights=WeightStream(model, dtype=engine.dtype))
after = [c.token_ids for c in engine.generate(prompts, max_tokens=8, min_tokens=8, temperature=0.0)]
with torch.no_grad():
    hf = [model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0,
                         suppress_tokens=[model.config.eos_token_id])[0, len(p):].tolist() for p in prompts]
    seqs = [p + h for p, h in zip(prompts, hf)]
    want = [torch.log_softmax(model(torch.tensor([s])).logits[0, :-1].float(), -1)
            .gather(1, torch.tensor(s[1:])[:, None])[:, 0].tolist() for s in seqs]
got = engine.score(seqs)
gap = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w))
checked = verify(engine, model)
with torch.no_grad():  # a deliberate corruption of one trainer tensor: each rank's check must name it
    model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    model.model.layers[1].self_attn.k_proj.weight[-1, -1] += 1.0
bad = verify(engine, model)
with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
    json.dump({"rank": rank, "before": before, "after": after, "hf": hf, "logprob_gap": gap,
               "phases": list(report.seconds),
               "verify_ok": checked.ok, "compared": checked.compared, "verify_mismatched": sorted(checked.mismatched),
               "corrupted_ok": bad.ok, "corrupted_named": sorted(bad.mismatched)}, fh)
os._exit(0)
