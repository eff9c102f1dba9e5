"""The memory plan's arithmetic (dtypes, optimizers, knobs, the 8B verdicts), its refusal before vLLM starts, the
optimizer settings' checks, and the optimizer state's offload (a real transfer on CUDA; nothing to move on CPU)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from rollout_sleep.run.memory_plan import (GIB, MemoryPlanError, ModelShape, PlanInputs, activation_bytes, check,
                                           knob_alternatives, per_tensor_step_peak, plan_memory, problems)
from rollout_sleep.run.optim import optimizer_state_bytes
from rollout_sleep.weights.checkpoints import qwen3_config

from helpers import ROOT, load_recipe


CONFIG = ROOT / "configs" / "tiny-cpu.yaml"


def test_plan_arithmetic_follows_the_dtypes_and_the_knobs(ckpts):
    """Counts from a checkpoint's headers equal the model's (tied head once); weights and gradients take the
    dtype, PyTorch AdamW's moments the weights' dtype (bf16: 4 bytes a parameter, not fp32 Adam's 8), AdamW8bit
    ~2; gradients are freed for the rollout; offload takes the state out of the rollout and keeps it apart from
    the activations in training; checkpointing and smaller micro-batches lower the activations."""
    shape = ModelShape.from_checkpoint(ckpts["tied0"])
    assert shape == ModelShape.from_config(qwen3_config("tiny"))
    n, tensors = shape.params, len(shape.tensor_numels)
    for b in (2, 4):
        plan = plan_memory(PlanInputs(shape, dtype_bytes=b, optimizer="adamw"))
        r, t = plan.phases["rollout"], plan.phases["training"]
        assert r["trainer_weights"] == t["trainer_weights"] == t["gradients"] == n * b and r["gradients"] == 0
        assert r["optimizer_state"] == t["optimizer_state"] == 2 * b * n + 4 * tensors
        assert plan.total("training") == sum(t.values()) and plan.total("rollout") == sum(r.values())
    big = [(10**6, 2)]
    assert optimizer_state_bytes("adamw8bit", big) / 10**6 == pytest.approx(2.03, abs=0.01)
    assert optimizer_state_bytes("adamw", big) / 10**6 == pytest.approx(4.0, abs=0.01)
    # the embedding's state stays float32 under adamw8bit (transformers' Trainer does the same): 8 bytes each
    assert shape.embedding_numels == (320 * 128,)
    lean = plan_memory(PlanInputs(shape, dtype_bytes=2, optimizer="adamw8bit")).phases["training"]["optimizer_state"]
    rest = [(k, 2) for k in shape.tensor_numels]
    rest.remove((320 * 128, 2))
    assert lean == optimizer_state_bytes("adamw8bit", rest) + 8 * 320 * 128

    base = PlanInputs(shape, dtype_bytes=2, micro_batch=64, seq_len=512, completion_len=256,
                      gradient_checkpointing=False)
    off = plan_memory(dataclasses.replace(base, offload_optimizer=True))
    on = plan_memory(base)
    assert off.phases["rollout"]["optimizer_state"] == 0 and on.phases["rollout"]["optimizer_state"] > 0
    t = off.phases["training"]
    assert off.total("training") == on.total("training") - min(t["activations"], t["optimizer_state"])
    # streamed: the state lives in host memory; the step brings one tensor's at a time, smallest first, and frees
    # each gradient after its tensor steps (serially: gradients still held + one state); overlapped with the step
    # (the optimizer's default with host state), the previous tensor's state (going back) and the next one's
    # (coming in) are on the device too: the largest of (gradients still held + those three states)
    streamed = plan_memory(dataclasses.replace(base, offload_optimizer="stream"))
    order = sorted(shape.tensor_numels)
    states = [optimizer_state_bytes("adamw", [(k, 2)]) for k in order]
    step_peak = max(sum(order[j:]) * 2 + sum(states[max(j - 1, 0):j + 2]) for j in range(len(order)))
    serial = max(sum(order[j:]) * 2 + states[j] for j in range(len(order)))
    assert sum(per_tensor_step_peak("adamw", shape.tensor_numels, 2, state_in="host", overlap=False)) == serial \
        < step_peak == sum(per_tensor_step_peak("adamw", shape.tensor_numels, 2, state_in="host"))
    s = streamed.phases["training"]
    assert streamed.phases["rollout"]["optimizer_state"] == 0
    assert s["gradients_at_step"] + s["optimizer_state"] + s.get("optimizer_step", 0) == step_peak
    assert s["optimizer_state"] < t["optimizer_state"]
    rest = sum(v for k, v in s.items()
               if k not in ("activations", "optimizer_state", "optimizer_step", "gradients", "gradients_at_step"))
    assert streamed.total("training") == rest + max(s["gradients"] + s["activations"], step_peak)
    assert activation_bytes(dataclasses.replace(base, gradient_checkpointing=True)) < activation_bytes(base)
    assert activation_bytes(dataclasses.replace(base, micro_batch=32)) < activation_bytes(base)


def test_8b_on_an_80gb_card_verdicts_and_refusal_message():
    """Qwen3-8B on the free memory of an 80 GB H100 (78.5 GiB): fp32 weights with AdamW are refused, naming the
    phase, the excess and the knobs with what each makes of it; bf16 with AdamW8bit fits; gradient checkpointing
    off at micro-batch 32 does not, and the message names the micro-batch that does."""
    shape = ModelShape.from_config(qwen3_config("qwen3-8b"))
    assert shape.params == 8_190_735_360  # Qwen3-8B (untied head)
    kv = 4 * GIB
    inputs = PlanInputs(shape, dtype_bytes=4, optimizer="adamw", micro_batch=32, seq_len=168, completion_len=128,
                        kv_cache_bytes=kv)
    plan = plan_memory(inputs, budget_bytes=int(78.5 * GIB))
    assert plan.phases["training"]["optimizer_state"] / GIB == pytest.approx(61.0, abs=0.1)  # fp32 Adam: 8 B/param
    with pytest.raises(MemoryPlanError) as err:
        check(plan)
    msg = str(err.value)
    assert msg.startswith("the memory plan does not fit in 2 phases")
    assert "training needs" in msg and "GiB over" in msg and "train.optimizer=adamw8bit" in msg
    # the suggestion says what it needs where bitsandbytes is missing, and only there
    from rollout_sleep.run.optim import missing_package

    needs = "train.optimizer=adamw8bit (needs bitsandbytes: pip install bitsandbytes) ->"
    assert (needs in msg) == bool(missing_package("adamw8bit")), msg
    assert (needs in msg) or "train.optimizer=adamw8bit ->" in msg
    assert "train.offload_optimizer=true ->" in msg and "train.offload_optimizer=stream ->" in msg
    assert "train.step_per_tensor=true ->" in msg
    assert "train.memory_plan=warn" in msg
    lean = plan_memory(dataclasses.replace(inputs, dtype_bytes=2, optimizer="adamw8bit"), int(78.5 * GIB))
    assert lean.fits() and problems(lean) == []
    # 8-bit moments for all but the embedding (622M parameters, float32 moments): 18.95 GiB, not AdamW's 30.5
    assert lean.phases["training"]["optimizer_state"] / GIB == pytest.approx(18.95, abs=0.01)
    no_ckpt = plan_memory(dataclasses.replace(inputs, dtype_bytes=2, optimizer="adamw8bit",
                                              gradient_checkpointing=False), int(78.5 * GIB))
    (only,) = problems(no_ckpt)
    assert only.startswith("training needs") and "train.gradient_checkpointing=true ->" in only
    assert "(the largest that fits, halving)" in only


def test_the_per_tensor_step_on_the_device_makes_the_backward_the_8b_training_peak():
    """Qwen3-8B with the 8B config's knobs (one copy, torchao's AdamW8bit rounding stochastically, gradient
    checkpointing) at micro-batch 16: the plain step (the state, every gradient and the embedding's step buffers,
    8 bytes per element) is training's peak. Per tensor, the state staying on the device, the step meets only the
    gradients not yet freed (nearly all of them at its first, small tensors; the embedding's and the head's at the
    last, beside their buffers): training's peak is the backward pass's (state, gradients, activations), lower by
    the step buffers less the activations; the rollout is unchanged. With the state offloaded between steps too,
    the state comes back for the step beside the gradients still held; ``stream`` implies the per-tensor walk.
    The plan offers the knob before the offloads (it copies nothing)."""
    shape = ModelShape.from_config(qwen3_config("qwen3-8b"))
    base = PlanInputs(shape, dtype_bytes=2, optimizer="adamw8bit", stochastic_rounding=True, micro_batch=16,
                      seq_len=168, completion_len=128, gradient_checkpointing=True, weights_shared=True,
                      kv_cache_bytes=4 * GIB)
    plain, per = plan_memory(base), plan_memory(dataclasses.replace(base, step_per_tensor=True))
    p, t = plain.phases["training"], per.phases["training"]
    rest = sum(v for k, v in t.items()
               if k not in ("activations", "optimizer_state", "optimizer_step", "gradients", "gradients_at_step"))
    assert p["optimizer_step"] / GIB == pytest.approx(4.64, abs=0.01)  # 8 bytes x 151,936 x 4,096
    assert p["activations"] < p["optimizer_step"]
    assert plain.total("training") == rest + p["optimizer_state"] + p["gradients"] + p["optimizer_step"]
    assert per.phases["rollout"] == plain.phases["rollout"] and t["optimizer_state"] == p["optimizer_state"]
    held, state, step = per_tensor_step_peak("adamw8bit", shape.tensor_numels, 2, True)
    assert (t["gradients_at_step"], t["optimizer_state"], t.get("optimizer_step", 0)) == (held, state, step)
    # its peak: among the first, small tensors, beside (almost) every gradient; below the backward's
    assert t["gradients"] - held < 0.01 * GIB and step < 0.1 * GIB and held + step < t["gradients"] + t["activations"]
    assert per.total("training") == rest + t["optimizer_state"] + t["gradients"] + t["activations"]
    assert plain.total("training") - per.total("training") == p["optimizer_step"] - p["activations"]
    both = plan_memory(dataclasses.replace(base, step_per_tensor=True, offload_optimizer=True))
    b = both.phases["training"]
    assert both.phases["rollout"]["optimizer_state"] == 0
    assert both.total("training") == rest + max(b["gradients"] + b["activations"], held + state + step)
    streamed = dataclasses.replace(base, offload_optimizer="stream")
    assert plan_memory(streamed).phases == plan_memory(dataclasses.replace(streamed, step_per_tensor=True)).phases
    # the 8-bit step in one kernel per tensor (run.fused_adamw8bit, where CUDA and Triton are) holds no temporaries
    fused = plan_memory(dataclasses.replace(base, fused_step=True))
    assert "optimizer_step" not in fused.phases["training"] or fused.phases["training"]["optimizer_step"] == 0
    assert plain.total("training") - fused.total("training") == p["optimizer_step"] - p["activations"]
    labels = [label for label, _ in knob_alternatives(base)]
    assert labels.index("train.step_per_tensor=true") < labels.index("train.offload_optimizer=true") \
        < labels.index("train.offload_optimizer=stream")
    assert not any("step_per_tensor" in label for label, _ in knob_alternatives(streamed))
    assert "(stepped one tensor at a time, smallest first)" in per.table()


def test_recipe_prints_the_plan_and_refuses_before_the_engine_starts(tmp_path, monkeypatch, capsys):
    """On CPU the plan is printed and checked only against ``train.memory_budget_gib``: a budget too small stops
    setup with the plan's message before the engine is built; ``warn`` goes on to the engine."""
    recipe = load_recipe()
    built = []

    def no_engine(*args, **kwargs):
        built.append(kwargs)
        raise RuntimeError("the engine was reached")

    monkeypatch.setattr(recipe, "build_engine", no_engine)
    args = [f"output_dir={tmp_path / 'run'}", "train.memory_budget_gib=0.5", "train.memory_headroom_gib=0.1"]
    with pytest.raises(recipe.ConfigError, match=r"(?s)the memory plan does not fit.*rollout needs .* GiB of the 0.50 GiB"):
        recipe.GRPORecipe(recipe.load_config(str(CONFIG), args)).setup()
    assert built == []
    printed = capsys.readouterr().out
    assert "memory plan:" in printed and "free of 0.50" in printed
    assert (tmp_path / "run" / "memory_plan.json").exists()
    # pure bf16 with TRL's lr: before the engine, the note that its updates round away (rollout_sleep.run.update_check)
    notes = []
    handler = logging.Handler()
    handler.emit = notes.append
    logging.getLogger("rollout_sleep.run.update_check").addHandler(handler)
    try:
        with pytest.raises(RuntimeError, match="the engine was reached"):
            warn = [f"output_dir={tmp_path / 'warn'}", *args[1:], "train.memory_plan=warn", "model.dtype=bfloat16",
                    "train.lr=1e-6"]
            recipe.GRPORecipe(recipe.load_config(str(CONFIG), warn)).setup()
    finally:
        logging.getLogger("rollout_sleep.run.update_check").removeHandler(handler)
    assert len(built) == 1 and "running anyway" in capsys.readouterr().out
    assert [r.levelname for r in notes] == ["WARNING"], notes
    assert "train.lr=1e-06 is below half of bfloat16's spacing near |w|~" in notes[0].getMessage()


def test_lora_plan_holds_the_base_once_and_trains_only_the_adapter():
    """LoRA (rank 16 on every linear layer) of a Qwen3-32B shape on an 80 GB card: only the adapter has gradients
    and optimizer state; the engine keeps its weights through training (level 0); with the base shared (the
    trainer's base a view of vLLM's weights) it fits at micro-batch 8, with two copies it is refused."""
    from rollout_sleep.run.memory_plan import lora_adapter_numels

    shape = ModelShape.from_config(qwen3_config("qwen3-32b"))
    adapter = lora_adapter_numels(qwen3_config("qwen3-32b"), 16, ["all-linear"])
    per_layer = 16 * (2 * (5120 + 64 * 128) + 2 * (5120 + 8 * 128) + 3 * (5120 + 25600))
    assert sum(adapter) == 64 * per_layer
    shared = plan_memory(PlanInputs(shape, dtype_bytes=2, micro_batch=8, kv_cache_bytes=4 * GIB,
                                    adapter_numels=adapter, base_shared=True), 78 * GIB, 4 * GIB)
    r, t = shared.phases["rollout"], shared.phases["training"]
    assert r["trainer_weights"] == t["trainer_weights"] == t["gradients"] == sum(adapter) * 2
    assert r["optimizer_state"] == optimizer_state_bytes("adamw", [(n, 2) for n in adapter])
    assert t["engine_weights"] == r["engine_weights"] == shape.params * 2 and "engine_asleep" not in t
    assert shared.fits() and "LoRA" in shared.table() and "held once" in shared.table()
    two = plan_memory(dataclasses.replace(shared.inputs, base_shared=False), 78 * GIB, 4 * GIB)
    assert two.phases["rollout"]["trainer_weights"] == (shape.params + sum(adapter)) * 2
    assert not two.fits() and two.over("rollout") > 50 * GIB


def test_lora_adapter_counts_peft_modules_fused_and_moe_and_rejects_unknown_targets():
    """The adapter the plan counts is PEFT's own: Phi-3's fused qkv_proj / gate_up_proj (one A per fused linear),
    MoE experts (one adapter per expert), prefixed names; a target naming no module fails before vLLM starts
    (it used to count 0 parameters silently)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rollout_sleep.weights.checkpoints import family_config
    from rollout_sleep.run.memory_plan import lora_adapter_numels

    def peft_count(cfg, targets):
        with torch.device("meta"):
            m = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=4, target_modules=targets))
        return sum(p.numel() for n, p in m.named_parameters() if "lora_" in n)

    for family in ("phi3", "mixtral"):
        cfg = family_config(family, "tiny")
        assert sum(lora_adapter_numels(cfg, 4, ["all-linear"])) == peft_count(cfg, "all-linear")
    cfg = qwen3_config("tiny")
    assert sum(lora_adapter_numels(cfg, 4, ["self_attn.q_proj"])) == sum(lora_adapter_numels(cfg, 4, ["q_proj"])) > 0
    with pytest.raises(ValueError, match="q_prj"):
        lora_adapter_numels(cfg, 4, ["q_prj"])


def test_trainer_shards_follow_the_distributed_type_and_zero_stage():
    from rollout_sleep.run.memory_check import trainer_shards

    assert trainer_shards(4, "NO") == (1, 1, 1) and trainer_shards(4, "MULTI_GPU") == (1, 1, 1)
    assert trainer_shards(4, "FSDP") == (4, 4, 4)
    assert [trainer_shards(4, "DEEPSPEED", s) for s in (0, 1, 2, 3)] == \
        [(1, 1, 1), (1, 1, 4), (1, 4, 4), (4, 4, 4)]  # (weights, gradients, optimizer state)


def test_moe_activations_count_the_experts_each_token_visits():
    """Mixtral's intermediate_size is one expert's and two run per token; Qwen3-MoE's routed experts are
    moe_intermediate_size wide (top 8 of them), with a dense intermediate_size that no token uses."""
    from rollout_sleep.run.memory_plan import mlp_width

    base = dict(hidden_size=64)
    assert mlp_width({**base, "intermediate_size": 128}) == 128
    assert mlp_width({**base, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2}) == 28672
    assert mlp_width({**base, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
                      "num_experts_per_tok": 8}) == 6144
    assert mlp_width({**base, "intermediate_size": 5632, "moe_intermediate_size": 1408, "num_experts": 60,
                      "num_experts_per_tok": 4, "shared_expert_intermediate_size": 5632}) == 4 * 1408 + 5632


@pytest.mark.parametrize("family, shape", [
    # Qwen3-30B-A3B's proportions at a quarter width (8 of the experts per token, experts 3/4 of hidden wide)
    ("qwen3-moe", dict(hidden_size=256, moe_intermediate_size=192, num_experts=16, num_experts_per_tok=8,
                       intermediate_size=768, head_dim=64, num_attention_heads=4, num_key_value_heads=1)),
    # Mixtral's: top 2 of 8 experts, each twice the hidden width
    ("mixtral", dict(hidden_size=256, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2,
                     head_dim=64, num_attention_heads=4, num_key_value_heads=2)),
])
def test_moe_layer_activations_match_what_transformers_saves_for_backward(family, shape):
    """A decoder layer's activations as the plan counts them against the bytes autograd actually saves in one
    layer of the transformers model (float32, random weights): each routed expert also keeps the token's gathered
    copy and its output, hidden-wide, which with 8 experts per token is ~40% of Qwen3-MoE's layer."""
    from rollout_sleep.weights.checkpoints import family_config, random_model
    from rollout_sleep.run.memory_plan import ModelShape, layer_activation_bytes_per_token

    cfg = family_config(family, "tiny", dtype="float32")
    for k, v in shape.items():
        setattr(cfg, k, v)
    layer = random_model(cfg, dtype=torch.float32).train()
    batch, tokens = 2, 256
    hidden = torch.randn(batch, tokens, cfg.hidden_size, requires_grad=True)
    positions = torch.arange(tokens)[None].expand(batch, tokens)
    rotary = layer.model.rotary_emb(hidden, positions)
    skip = {p.untyped_storage().data_ptr() for p in layer.parameters()} | {hidden.untyped_storage().data_ptr()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.model.layers[0](hidden, position_embeddings=rotary, attention_mask=None, position_ids=positions)
    measured = sum(saved.values()) / (batch * tokens)
    planned = layer_activation_bytes_per_token(ModelShape.from_config(cfg), 4)
    assert 0.8 <= measured / planned <= 1.2, (measured, planned)


@pytest.mark.parametrize("lora", [False, True])
def test_the_per_tensor_plan_counts_bitsandbytes_state_as_the_plain_plan_does(lora):
    """bitsandbytes' AdamW8bit (no stochastic rounding) on Qwen3-8B, whose untied head is the embedding's size:
    per tensor with the state on the device the state is the plain optimizer's, byte for byte (its two
    quantization maps once, not once per tensor; only the embedding's state in float32, not the head's too), so
    the plan is never higher with the knob than without."""
    shape = ModelShape.from_config(qwen3_config("qwen3-8b"))
    base = PlanInputs(shape, dtype_bytes=2, optimizer="adamw8bit", micro_batch=16, seq_len=168, completion_len=128,
                      gradient_checkpointing=True, kv_cache_bytes=4 * GIB,
                      adapter_numels=[4096 * 16, 16 * 4096, 512] if lora else None)
    plain, per = plan_memory(base), plan_memory(dataclasses.replace(base, step_per_tensor=True))
    assert per.phases["rollout"] == plain.phases["rollout"]
    assert per.phases["training"]["optimizer_state"] == plain.phases["training"]["optimizer_state"]
    assert all(per.total(phase) <= plain.total(phase) for phase in ("rollout", "training"))


def test_the_plan_walks_the_per_tensor_step_the_optimizer_takes():
    """One default for both: where the state lives between the per-tensor steps, the copies overlapped with the
    step or not (by default overlapped with the state in host memory, as the recipe builds it), and the plan's walk
    of it; overlap with the state on the device is refused by both."""
    import inspect

    from rollout_sleep.run.per_tensor import PerTensorOptimizer

    for name in ("state_in", "overlap"):
        def default(f):
            return inspect.signature(f).parameters[name].default

        assert default(PerTensorOptimizer.__init__) == default(per_tensor_step_peak)
    params = list(torch.nn.Linear(4, 4).parameters())
    assert PerTensorOptimizer(torch.optim.AdamW(params), "host").overlap is True
    assert PerTensorOptimizer(torch.optim.AdamW(params), "device").overlap is False
    numels = [10, 30, 20]
    overlapped = per_tensor_step_peak("adamw", numels, 2, state_in="host", overlap=True)
    assert per_tensor_step_peak("adamw", numels, 2, state_in="host") == overlapped \
        != per_tensor_step_peak("adamw", numels, 2, state_in="host", overlap=False)
    with pytest.raises(ValueError, match="state_in='host' only"):
        per_tensor_step_peak("adamw", numels, 2, state_in="device", overlap=True)


@pytest.mark.parametrize("targets, fused", [(["q_proj", "v_proj"], True), ("all-linear", True), (["lm_head"], False),
                                            ("lm_head", False), (r".*(lm_head|q_proj)", False)])
def test_the_plan_counts_the_logits_when_lora_targets_the_head(ckpts, targets, fused):
    """A LoRA head is not a plain Linear: the trainer falls back to the model's logits, and the plan must count
    them, whether the head is named in a list, alone as a string, or inside a regex."""
    from types import SimpleNamespace

    from rollout_sleep.run.memory_check import fused_head

    assert fused_head(ckpts["tied0"], (1, 1, 1), SimpleNamespace(rank=4, targets=targets)) is fused
    assert fused_head(ckpts["tied0"], (1, 1, 1), SimpleNamespace(rank=0, targets=targets)) is True
    assert fused_head(ckpts["tied0"], (2, 1, 1), SimpleNamespace(rank=0, targets=targets)) is False  # sharded


@pytest.mark.parametrize("distributed_type", ["FSDP", "DEEPSPEED"])
def test_the_plan_offers_no_optimizer_step_knob_where_deepspeed_or_fsdp_own_the_step(tmp_path, distributed_type):
    """Under accelerate's FSDP or DeepSpeed the recipe refuses train.step_per_tensor and the optimizer offloads
    (they step and offload their own way): a plan that does not fit does not offer them, even with one process
    (shards 1, 1, 1); under DDP ("MULTI_GPU") it does."""
    from rollout_sleep.run.config import load_config
    from rollout_sleep.run.memory_check import plan_run
    from rollout_sleep.weights.checkpoints import make_checkpoint

    path = make_checkpoint(tmp_path / "tiny", "tiny", seed=0, dtype="float32")
    cfg = load_config(None, ["train.memory_budget_gib=0.01"], device="cuda")

    def knobs(kind):
        plan = plan_run(cfg, path, processes=1, shards=(1, 1, 1), longest_prompt=16, kv_bytes=1 << 20,
                        reward_bytes=0, base_shared=False, distributed_type=kind)[0]
        return " ".join(label for label, _ in knob_alternatives(plan.inputs))

    assert "train.step_per_tensor=true" in knobs("MULTI_GPU") and "train.offload_optimizer" in knobs("MULTI_GPU")
    assert "step_per_tensor" not in knobs(distributed_type) and "offload_optimizer" not in knobs(distributed_type)


def test_the_rollouts_measure_keeps_the_cache_training_left_before_the_wake(monkeypatch):
    """Pure logic (no GPU here: the cache's size is faked): the largest cache seen before a wake is reported beside
    the one at the rollouts' start, so a peak at the wake is explained by what training left (and released or not)."""
    from rollout_sleep.run import memory_check

    monkeypatch.setattr(memory_check.torch.cuda, "is_available", lambda: True)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    resident = memory_check.Resident()
    for cached in (3 * GIB, 7 * GIB, 5 * GIB):
        monkeypatch.setattr(memory_check, "cached_free_bytes", lambda c=cached: c)
        resident.note(model, opt, "cpu")
        resident.note_before_wake()
    measured = memory_check.measured_gib(model, opt, "cpu", resident)
    assert measured["rollout"]["pytorch_cached_free_before_wake"] == 7.0
    assert measured["rollout"]["pytorch_cached_free"] == 7.0
    monkeypatch.setattr(memory_check.torch.cuda, "is_available", lambda: False)
    resident = memory_check.Resident()
    resident.note(model, opt, "cpu")
    resident.note_before_wake()
    assert "pytorch_cached_free_before_wake" not in memory_check.measured_gib(model, opt, "cpu", resident)["rollout"]


def test_a_plan_made_again_once_vllm_holds_its_memory_keeps_the_free_memory_measured_before_it(ckpts, monkeypatch):
    """Pure logic (no GPU here: the free memory is faked). One copy falling back to two once vLLM has started
    plans again (``_decide_one_copy``): measured then, the free memory lacks vLLM's weights and KV cache, which
    the plan counts too, so vLLM counted twice (a bogus refusal on CUDA, and the phase peaks' baseline off by
    vLLM's memory). The budget stays the free memory before vLLM started."""
    from types import SimpleNamespace

    from rollout_sleep.run import memory_check
    from rollout_sleep.run.config import load_config

    recipe = load_recipe()
    free = {"now": 60 * GIB}
    monkeypatch.setattr(memory_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(memory_check.torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(memory_check.torch.cuda, "mem_get_info", lambda *a: (free["now"], 80 * GIB))
    cfg = load_config(None, ["train.memory_plan=warn"], device="cuda")
    fake = SimpleNamespace(cfg=cfg, rewards=[], model_path=ckpts["tied0"], main=False,
                           one_copy=SimpleNamespace(on=False), _longest=16, _shares_base=lambda: False,
                           acc=SimpleNamespace(state=SimpleNamespace(), num_processes=1, print=lambda *a: None,
                                               distributed_type=SimpleNamespace(value="NO")))
    first = recipe.GRPORecipe._memory_plan(fake, 1 << 20)
    assert first.budget_bytes == fake.plan_base_free == 60 * GIB
    free["now"] = 20 * GIB  # vLLM started: its weights, KV cache and workspace are taken
    again = recipe.GRPORecipe._memory_plan(fake, 1 << 20)
    assert again.budget_bytes == fake.plan_base_free == 60 * GIB


def _sizing_recipe(recipe, cfg, path, longest: int):
    """What the recipe's KV cache sizing reads, on one process without tensor parallelism."""
    from types import SimpleNamespace

    fake = SimpleNamespace(cfg=cfg, tp=1, model_path=path, acc=SimpleNamespace(num_processes=1), _longest=longest)
    fake._step_sequences = lambda: recipe.GRPORecipe._step_sequences(fake)
    return fake


def test_the_step_sized_kv_cache_holds_the_models_context_when_max_model_len_is_null(ckpts, monkeypatch):
    """Pure logic (no GPU here: CUDA is faked). ``engine.kv_cache=step`` sizes the KV cache on CUDA from one step's
    sequences, at least one sequence of the context vLLM runs with: with ``engine.max_model_len=null`` that is the
    model's own (vLLM refuses to start with a KV cache that cannot hold one sequence of it), not none."""
    from rollout_sleep.engine.memory import kv_cache_bytes_for
    from rollout_sleep.grpo.data import model_context
    from rollout_sleep.run.config import load_config

    recipe = load_recipe()
    monkeypatch.setattr(recipe.torch.cuda, "is_available", lambda: True)
    path = ckpts["tied0"]
    context = model_context(path)[0]
    for max_model_len, want in ((None, context), (context // 2, context // 2)):
        cfg = load_config(None, ["train.prompts_per_step=1", "train.generations=2", "train.max_tokens=8",
                                 f"engine.max_model_len={'null' if max_model_len is None else max_model_len}"],
                          device="cuda")
        got = recipe.GRPORecipe._kv_cache_bytes(_sizing_recipe(recipe, cfg, path, longest=16))
        one = kv_cache_bytes_for(path, want, cfg.model.dtype)
        assert one <= got < 2 * one


def test_the_step_sized_kv_cache_takes_its_margin_and_holds_every_sequences_blocks(ckpts, monkeypatch):
    """Pure logic (CUDA faked). By default (``engine.kv_cache_margin=0``) the KV cache holds exactly one step's
    sequences, each in whole 16-token blocks (vLLM's default on CUDA), and vLLM's null block, and at least one whole
    context and the null block (what vLLM checks at its start); a margin adds its share; a negative margin, and a
    margin beside another sizing (where it would be ignored), are refused by the config check."""
    from rollout_sleep.engine.memory import kv_cache_bytes_for, step_kv_cache_bytes
    from rollout_sleep.run.config import ConfigError, load_config

    recipe = load_recipe()
    monkeypatch.setattr(recipe.torch.cuda, "is_available", lambda: True)
    path = ckpts["tied0"]
    per_token = kv_cache_bytes_for(path, 16, "float32") // 16
    got = {}
    for margin in (None, "0.25"):
        cfg = load_config(None, ["train.prompts_per_step=4", "train.generations=2", "train.max_tokens=100",
                                 "engine.max_model_len=64"] + ([f"engine.kv_cache_margin={margin}"] if margin else []),
                          device="cuda")
        got[margin] = recipe.GRPORecipe._kv_cache_bytes(_sizing_recipe(recipe, cfg, path, longest=20))
    assert got[None] == 8 * (20 + 100 + 16) * per_token  # 8 sequences of 136 tokens: 1088, a whole number of blocks
    assert got["0.25"] == kv_cache_bytes_for(path, int(8 * 136 * 1.25), "float32")
    for longest in range(1, 80):  # every sequence's own blocks, however its prompt and completion fall on them,
        for n in (1, 3, 8):  # and the null block
            blocks = n * -(-(longest + 100) // 16) + 1
            assert step_kv_cache_bytes(path, n, longest, 100, dtype="float32") >= blocks * 16 * per_token
    for context in (100, 128, 129, 4096):  # a small step: one whole context and the null block (vLLM's start
        tokens = (-(-context // 128) + 1) * 128  # check), in blocks of up to 128 tokens (vLLM's CPU build's)
        assert step_kv_cache_bytes(path, 1, 4, 12, context, dtype="float32") == tokens * per_token
    with pytest.raises(ConfigError, match="engine.kv_cache_margin must be >= 0"):
        load_config(None, ["engine.kv_cache_margin=-0.1"])
    with pytest.raises(ConfigError, match="engine.kv_cache_margin must be <= 10"):
        load_config(None, ["engine.kv_cache_margin=1e308"])
    for other in ("engine.kv_cache=gpu_share", "engine.kv_cache_bytes=1000000"):  # another sizing: said, not ignored
        with pytest.raises(ConfigError, match=r"engine.kv_cache_margin=0.25 \(in the config file or an override\) "
                                              r"sizes the step-sized KV cache only, and "
                                              + other.split("=")[0].replace(".", r"\.")):
            load_config(None, ["engine.kv_cache_margin=0.25", other])


def test_a_step_sized_kv_cache_vllm_made_too_small_is_said_with_the_margin_that_fits(engine):
    """The real engine (vLLM's CPU build makes blocks of 128 tokens, not the 16 the size assumes): a step that
    fits its blocks is not reported; one that does not is, with the blocks made and needed and the margin that
    would give them; an engine that does not say its blocks (``None``) is not reported either."""
    from rollout_sleep.engine.memory import step_kv_cache_shortfall

    cache = engine.llm.llm_engine.vllm_config.cache_config
    size, blocks = cache.block_size, cache.num_gpu_blocks
    assert size and blocks
    assert step_kv_cache_shortfall(engine.llm, 1, 4, 8) is None
    sequences = blocks  # each needs a block of its own: one more than there are (the null block)
    said = step_kv_cache_shortfall(engine.llm, sequences, 4, 8)
    need = sequences + 1
    assert said and f"vLLM made {blocks} blocks of {size} tokens, and one step needs up to {need}" in said, said
    margin = float(said.split("engine.kv_cache_margin=")[1].split()[0])
    assert int(sequences * (4 + 8 + 16) * (1 + margin)) >= need * size  # the margin named gives the blocks needed
    assert step_kv_cache_shortfall(None, 1, 4, 8) is None
    from types import SimpleNamespace  # blocks of 544 tokens for 22 sequences of 33: no margin under 10 fits

    wide = SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=SimpleNamespace(
        cache_config=SimpleNamespace(block_size=544, num_gpu_blocks=3))))
    said = step_kv_cache_shortfall(wide, 22, 16, 17)
    assert "Set engine.kv_cache_bytes to hold 12512 tokens (engine.kv_cache_margin would need" in said, said
