"""Time one GRPO training phase (``GRPOLoss.step``) on a model shape, by log-prob path and optimizer.

    python benchmarks/train_phase.py --size qwen3-4b --out results/h100/train_phase_qwen3-4b.json

The work of one recipe step (16 prompts x 8 completions of 128 tokens, bf16 weights, AdamW, micro-batches
of 32, gradient checkpointing), on random token ids, without the engine. Variants:
``completion`` (logits for completion columns only, chunked float32 log-softmax; the recipe's path) vs
``full_rowwise`` (logits for every column, one float32 log-softmax per row: the previous path), and fused vs
foreach AdamW. Warm-up, then ``--repeats`` timed runs each (CUDA synchronized), median; peak memory each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rollout_sleep.engine.completion import Completion
from rollout_sleep.grpo import loss as grpo
from rollout_sleep.weights.checkpoints import SHAPES, qwen3_config

from common import device_name, gib, versions, write_json


def full_rowwise(model, ids, attn, positions, n, temperature=1.0):
    """The previous path: logits for every column, float32 log-softmax one row at a time."""
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits[:, -(n + 1):-1]
    targets = ids[:, -n:]
    return torch.stack([torch.log_softmax(logits[i].float() / temperature, -1).gather(1, targets[i, :, None])[:, 0]
                        for i in range(logits.shape[0])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="qwen3-4b", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    cfg = qwen3_config(args.size)
    torch.manual_seed(0)
    with dev:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if not args.no_gradient_checkpointing:
        model.gradient_checkpointing_enable()
    vocab = cfg.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(10, vocab, (int(torch.randint(18, 30, (1,), generator=g)),), generator=g).tolist()
               for _ in range(16)]
    comps = [Completion(i // 8, prompts[i // 8], torch.randint(10, vocab, (128,), generator=g).tolist(),
                        [-1.0] * 128, "", "length") for i in range(128)]
    rewards = torch.rand(128, generator=g)
    result = {"size": args.size, "device": device_name(),
              "versions": versions("torch", "transformers"), "micro_batch": args.micro_batch,
              "gradient_checkpointing": not args.no_gradient_checkpointing, "variants": {}}
    original = grpo.completion_logprobs
    loss = grpo.GRPOLoss(group_size=8, pad_id=0, micro_batch=args.micro_batch)
    for path in ("completion", "full_rowwise"):
        for fused in (True, False):
            grpo.completion_logprobs = original if path == "completion" else full_rowwise
            opt = torch.optim.AdamW(model.parameters(), lr=1e-9, fused=fused, foreach=None if fused else True)
            times = []
            for r in range(args.repeats + 1):
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                loss.step(model, opt, prompts, comps, rewards)
                if cuda:
                    torch.cuda.synchronize()
                if r:
                    times.append(time.perf_counter() - t0)
            name = f"{path}+{'fused' if fused else 'foreach'}"
            result["variants"][name] = {"seconds": times, "median_s": statistics.median(times),
                                        "peak_allocated_gib": gib(torch.cuda.max_memory_allocated()) if cuda else None}
            print(name, json.dumps(result["variants"][name]), flush=True)
            del opt
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
    grpo.completion_logprobs = original
    write_json(args.out, result)


if __name__ == "__main__":
    main()
