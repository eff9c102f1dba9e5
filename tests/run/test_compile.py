"""``train.compile``: the trainer's decoder layers compiled in place (accelerate's regional compilation) train as
the eager model does, on a one-copy trainer (parameters that are views of fused engine tensors) with gradient
checkpointing; the recipe runs with it; launches it cannot run under are refused before anything starts."""

from __future__ import annotations

import time

import pytest
import torch

from rollout_sleep.engine.completion import Completion
from rollout_sleep.grpo.loss import GRPOLoss
from rollout_sleep.run.compiled import compile_model, compiled_blocks
from rollout_sleep.run.config import ConfigError, check_processes, load_config

from helpers import views_on_fused_layout

# float32 on the CPU: inductor's fused kernels reorder the reductions of RMSNorm and the softmax (measured: loss
# within 1e-6, gradients within ~3e-7 absolute); a wrong weight, a stale parameter or a lost gradient moves them
# by orders of magnitude more. The weights after two AdamW steps (lr 1e-3): AdamW divides by the gradient's own
# scale, so float32 noise in a near-zero gradient moves its update by up to ~lr (measured 2e-5).
LOSS_RTOL, GRAD_RTOL, GRAD_ATOL, WEIGHT_ATOL = 1e-5, 1e-4, 1e-5, 1e-4


class _Recording:
    """An optimizer that keeps each step's gradients (GRPOLoss.step zeroes them after the step)."""

    def __init__(self, optimizer):
        self.optimizer, self.grads = optimizer, []

    def step(self):
        self.grads.append({n: p.grad.clone() for n, p in self.names.items()})
        self.optimizer.step()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)


def _batch():
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 200, (n,), generator=gen).tolist() for n in (5, 7)]
    comps = [Completion(i // 4, prompts[i // 4], torch.randint(1, 200, (3 + i % 4,), generator=gen).tolist(), None,
                        "", None) for i in range(8)]
    return prompts, comps, torch.arange(8, dtype=torch.float32) % 3


def _train(compile_: bool):
    tensors, model, problems = views_on_fused_layout()
    model.gradient_checkpointing_enable()
    line = compile_model(model) if compile_ else None
    optimizer = _Recording(torch.optim.AdamW(model.parameters(), lr=1e-3))
    optimizer.names = dict(model.named_parameters())
    loss = GRPOLoss(group_size=4, micro_batch=8)
    prompts, comps, rewards = _batch()
    # the second step computes with the weights the first one's AdamW step wrote in place
    losses = [loss.step(model, optimizer, prompts, comps, rewards)["loss"] for _ in range(2)]
    return dict(model=model, problems=problems(model), losses=losses, grads=optimizer.grads, line=line,
                weights={n: t.clone() for n, t in tensors.items()})


def test_compiled_layers_train_as_eager_on_views_with_checkpointing():
    """Two GRPO steps (the second after an in-place AdamW update of the engine's tensors, which the compiled code
    must see): the loss and every gradient of each step, and the updated weights, as eager within float32 noise;
    the parameters are still the engine's memory, once, under their own names; the layers are compiled."""
    from torch._dynamo.utils import counters

    eager = _train(False)
    t0 = time.perf_counter()
    graphs = counters["stats"]["unique_graphs"]
    compiled = _train(True)
    assert counters["stats"]["unique_graphs"] > graphs, "nothing was compiled"
    layers = compiled["model"].model.layers
    assert all(layer in compiled_blocks(compiled["model"]) for layer in layers)
    assert "2 Qwen3DecoderLayer blocks compiled in place" in compiled["line"]
    assert compiled["problems"] == []  # one copy: the compile copied nothing, replaced no parameter
    assert [n for n, _ in compiled["model"].named_parameters()] == [n for n, _ in eager["model"].named_parameters()]
    for step, (a, b) in enumerate(zip(eager["losses"], compiled["losses"])):
        assert abs(a - b) <= LOSS_RTOL * max(abs(a), 1.0), (step, a, b)
    for step, (ga, gb) in enumerate(zip(eager["grads"], compiled["grads"])):
        assert ga.keys() == gb.keys()
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=GRAD_RTOL, atol=GRAD_ATOL,
                                       msg=lambda m: f"step {step + 1}, {name}: {m}")
    for name, w in eager["weights"].items():
        torch.testing.assert_close(compiled["weights"][name], w, rtol=0, atol=WEIGHT_ATOL)
    print(f"compiled run: {time.perf_counter() - t0:.1f} s")


def test_bad_values_and_launches_it_cannot_run_under_are_refused_naming_the_key():
    """A non-boolean value, DeepSpeed and FSDP version 1 are refused before anything starts, each naming
    train.compile, why and the fix; DDP, FSDP2 and one process run it; a model with no repeated block is refused."""
    with pytest.raises(ConfigError, match=r"train.compile must be true or false, got 'maybe'"):
        load_config(None, ["train.compile=maybe"])
    assert load_config(None, ["train.compile=true"]).train.compile is True
    assert load_config(None, []).train.compile is False  # off unless asked
    cfg = load_config(None, ["train.compile=true"])
    (deepspeed,) = check_processes(cfg, 2, "DEEPSPEED")
    assert deepspeed.startswith("train.compile=true with accelerate's DEEPSPEED") and "train.compile=false" in deepspeed
    (fsdp1,) = check_processes(cfg, 2, "FSDP", fsdp_version=1)
    assert "FSDP version 1" in fsdp1 and "fsdp_version: 2" in fsdp1
    for launch in [(1, "NO", None), (2, "MULTI_GPU", None), (2, "MULTI_CPU", None), (2, "FSDP", 2)]:
        assert check_processes(cfg, launch[0], launch[1], fsdp_version=launch[2]) == [], launch
    assert check_processes(load_config(None, []), 2, "DEEPSPEED") == []  # off: nothing to refuse
    with pytest.raises(ValueError, match="train.compile=true: Linear has no repeated blocks"):
        compile_model(torch.nn.Linear(2, 2))


@pytest.mark.slow
def test_recipe_trains_with_compiled_layers_and_verify(tmp_path):
    """recipes/grpo.py with train.compile=true on the tiny CPU config: 2 steps with verify after every sync (the
    engine holds the compiled trainer's weights bitwise), the decision logged, the checkpoint under the model's own
    parameter names. Marked slow: vLLM's start plus inductor's compiles (the second step's sequence lengths
    differ: one recompile with dynamic shapes) take ~1-2 min on 2 cores."""
    import json

    from safetensors.torch import load_file

    from helpers import ROOT, run_recipe

    out = tmp_path / "run"
    proc, log = run_recipe(ROOT / "configs" / "tiny-cpu.yaml", f"output_dir={out}", "train.compile=true",
                           "train.gradient_checkpointing=true", "train.steps=2", "save_every=0",
                           "engine.verify_every=1", "wandb.mode=disabled", timeout=600)
    assert proc.returncode == 0, log[-4000:]
    assert "train.compile: 2 Qwen3DecoderLayer blocks compiled in place" in log
    assert "no fused LM head" not in log, log[-4000:]  # the LM head stays eager: the fused head takes it
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["verify_s"] > 0 for r in rows), rows  # a failed verify fails the run
    names = load_file(out / "checkpoints" / "step_2" / "model.safetensors")
    assert names and not any("_orig_mod" in n for n in names), sorted(names)[:4]


def _deep_model(layers: int):
    """A tiny random Qwen3 with ``layers`` decoder layers (more than dynamo's recompile limit, 8), float32."""
    from transformers import AutoModelForCausalLM

    from rollout_sleep.weights.checkpoints import qwen3_config

    config = qwen3_config("tiny", "float32")
    config.num_hidden_layers, config.layer_types = layers, [config.layer_types[0]] * layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def test_only_the_decoder_layers_are_compiled_and_the_fused_head_still_runs(monkeypatch):
    """compile_model compiles the decoder layers and nothing outside them: a compiled LM head (accelerate's
    compile_regions_fsdp2 compiles every leaf outside the blocks too) turned the fused LM head off, and the
    [batch, n, vocab] logits came back. The log-probs then take the fused path, and equal the eager model's."""
    import rollout_sleep.grpo.logprobs as lp
    from rollout_sleep.grpo.logprobs import completion_logprobs, fused_head_problem
    from rollout_sleep.grpo.loss import pad_batch

    _, model, _ = views_on_fused_layout()
    ids, attn, positions, mask = pad_batch([[5, 9, 2, 7], [3, 8]], [[4, 4, 8], [6, 1]], pad_id=0)
    with torch.no_grad():
        want = completion_logprobs(model, ids, attn, positions, mask.shape[1])
    compile_model(model, backend="eager")  # dynamo's tracing alone: what is compiled, not inductor's code
    assert compiled_blocks(model) == list(model.model.layers)
    head, problem = fused_head_problem(model)
    assert problem is None and head is model.lm_head
    fused = []
    real = lp.linear_selected_logprobs
    monkeypatch.setattr(lp, "linear_selected_logprobs", lambda *a, **k: fused.append(1) or real(*a, **k))
    with torch.no_grad():
        got = completion_logprobs(model, ids, attn, positions, mask.shape[1])
    assert fused, "the compiled model's log-probs did not take the fused LM head"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_layers_share_one_graph_and_lengths_recompile_once_without_checkpointing():
    """Without gradient checkpointing a training forward built a KV cache (config.use_cache) that each layer
    updates at its own index: dynamo guarded on past_key_values.layers[i] and compiled a graph per layer until its
    recompile limit (8), past which the layers ran eager, and every later length ran all of them eager. With the
    log-probs' forward passing use_cache=False: one graph for every layer, one recompile (dynamic shapes) at the
    first new length, none after."""
    from torch._dynamo.utils import counters

    from rollout_sleep.grpo.logprobs import completion_logprobs
    from rollout_sleep.grpo.loss import pad_batch

    torch._dynamo.reset()
    model = _deep_model(10).train()  # training mode, no gradient checkpointing: use_cache stays on in the config
    compile_model(model, backend="eager")  # dynamo's guards and graphs, without inductor's compile time
    start, graphs = counters["stats"]["unique_graphs"], []
    for prompt, completion in [(5, 3), (7, 4), (9, 6), (4, 2)]:
        ids, attn, positions, mask = pad_batch([list(range(1, prompt + 1))] * 2, [[7] * completion] * 2, pad_id=0)
        completion_logprobs(model, ids, attn, positions, mask.shape[1]).sum().backward()
        graphs.append(counters["stats"]["unique_graphs"] - start)
    assert graphs == [1, 2, 2, 2], f"graphs compiled after each length: {graphs} (one for all 10 layers, then one "
    "dynamic recompile)"
