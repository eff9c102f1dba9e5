"""Run by tests/weights/test_stream_distributed.py under torchrun (2 processes, gloo): one engine per rank and, for each mode
given (comma-separated: ddp, fsdp2, zero3; one launch serves them all, CI time), a fresh trainer wrapped in
DDP or sharded with FSDP2 / DeepSpeed ZeRO-3, a training step, a sync from the wrapped model, verify on every
rank. Each mode writes ``<mode>_rank<r>.json``; a mode that fails writes its error there and the next runs."""

import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

modes, ckpt_engine, ckpt_trainer, out_dir = sys.argv[1:5]
dist.init_process_group("gloo")
rank = dist.get_rank()

from rollout_sleep.engine.engine import Engine  # noqa: E402
from rollout_sleep.grpo.logprobs import _keeps_logits, completion_logprobs  # noqa: E402
from rollout_sleep.grpo.loss import pad_batch  # noqa: E402
from rollout_sleep.run.update_check import UpdateCheck  # noqa: E402
from rollout_sleep.weights.stream import WeightStream, unwrap  # noqa: E402
from rollout_sleep.weights.verify import verify  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

engine = Engine(ckpt_engine, dtype="float32", seed=0)  # external_launcher: inside this process group
torch.manual_seed(rank)  # each rank its own data: gradients must be reduced for ranks to agree
# the recipe's training forward: left-padded prompts, position ids, logits for the completion columns only
prompts = [torch.randint(1, 250, (n,)).tolist() for n in (3, 7)]
completions = [torch.randint(1, 250, (n,)).tolist() for n in (9, 4)]
ids, attn, positions, mask = pad_batch(prompts, completions, pad_id=0)


def train_loss(m, mode):
    assert _keeps_logits(m), f"{mode}: logits_to_keep not seen through the wrapper"
    logp = completion_logprobs(m, ids, attn, positions, mask.shape[1])
    return -(logp * mask).sum() / mask.sum()


def run(mode: str) -> dict:
    """A fresh trainer; the engine is first put back on its own checkpoint (a previous mode's weights would be
    close to this mode's: a sync that did nothing could then pass)."""
    engine.load_weights(ckpt_engine)
    model = AutoModelForCausalLM.from_pretrained(ckpt_trainer, dtype=torch.float32)
    if mode == "zero3":
        import deepspeed

        ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                     "optimizer": {"type": "SGD", "params": {"lr": 0.05}}, "zero_allow_untested_optimizer": True}
        wrapped, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        check = UpdateCheck(wrapped.optimizer, every=1)  # hooks the torch SGD inside ZeRO-3: its fp32 partitions
        check.arm(1)
        wrapped.backward(train_loss(wrapped, mode))
        wrapped.step()
    else:
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.05)
        check = UpdateCheck(opt, every=1)  # FSDP2: each DTensor's local shard
        check.arm(1)
        train_loss(wrapped, mode).backward()
        opt.step()
    updated = check.result(1, grad_norm=1.0)  # this rank's own sample (no reduce): its shards were read

    engine.sleep(level=2)
    stream = WeightStream(wrapped, dtype=engine.dtype, bucket_bytes=128 << 10)
    engine.wake_up(weights=stream)
    report = verify(engine, stream)
    tokens = engine.generate([[5, 6, 7, 8]], max_tokens=8, temperature=0.0)[0].token_ids
    gathered = [None, None]
    dist.all_gather_object(gathered, tokens)
    # a deliberate corruption of one trainer tensor, as each setup holds it: verify must name it
    target = "model.layers.0.mlp.down_proj.weight"
    param = dict(unwrap(wrapped).named_parameters())[target]
    with torch.no_grad():
        if hasattr(param, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    param.data[0, 0] += 1.0
        elif hasattr(param, "full_tensor"):
            param.to_local().add_(1.0)  # every rank's shard
        else:
            param[0, 0] += 1.0
    bad = verify(engine, WeightStream(wrapped, dtype=engine.dtype))
    sharded = any(hasattr(p, "full_tensor") or hasattr(p, "ds_id") for p in wrapped.parameters())
    return {"rank": rank, "ok": report.ok, "compared": report.compared,
            "same_tokens_on_ranks": gathered[0] == gathered[1], "sharded": sharded,
            "corrupted_ok": bad.ok, "corrupted_named": sorted(bad.mismatched), "updated": updated,
            "sampled": check.sampled_elements()}


for mode in modes.split(","):
    try:
        row = run(mode)
    except Exception as e:  # recorded; a failure on one rank only leaves the other in a collective (timeout)
        row = {"rank": rank, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
    with open(os.path.join(out_dir, f"{mode}_rank{rank}.json"), "w") as fh:  # files: the ranks' stdout interleaves
        json.dump(row, fh)
os._exit(0)  # vLLM's teardown would destroy the trainer's process group under it
