"""``train.stochastic_rounding`` and torchao's optimizers: bf16 weights stepped in place keep small updates in
expectation, the state estimate is exact for torchao's kinds, the config refuses what cannot run and names what is
missing. torchao's step runs eagerly on the CPU (``build_optimizer``), so these take well under a second each."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch

from rollout_sleep.run.config import ConfigError, load_config
from rollout_sleep.run.memory_plan import ModelShape, PlanInputs, knob_alternatives, plan_memory
from rollout_sleep.run.optim import (OPTIMIZERS, build_optimizer, missing_package, optimizer_state_bytes,
                                     resident_state_bytes, run_stochastic_rounding, stochastic_rounding_on)
from rollout_sleep.run.output_dir import config_changes
from rollout_sleep.run.schema import resume_classes

from helpers import without_package

LR = 1e-6  # RL's typical learning rate: far under half of bf16's spacing (1.2e-4) near |w| ~ 0.02


def _shape(numels: tuple[int, ...], **kw) -> ModelShape:
    """A model of these parameter tensors for the memory plan (its dimensions matter only for activations)."""
    return ModelShape(tensor_numels=numels, hidden_size=64, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64,
                      intermediate_size=64, vocab_size=64, **kw)


def _delta(kind: str, rounding: bool, dtype: torch.dtype, steps: int = 2) -> torch.Tensor:
    """``w - w0`` after ``steps`` AdamW steps at :data:`LR` on weights of std 0.02 (``w0`` in bf16) stored in
    ``dtype``, every kind seeing the same positive gradients (so the float32 update is about -lr everywhere)."""
    torch.manual_seed(0)  # the rounding's random draws too
    w0 = (torch.randn(512, 256) * 0.02).to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    grads = [torch.rand(512, 256, generator=gen) + 0.1 for _ in range(steps)]
    p = torch.nn.Parameter(w0.to(dtype, copy=True))
    opt = build_optimizer(kind, [p], lr=LR, weight_decay=0.0, stochastic_rounding=rounding)
    for g in grads:
        p.grad = g.to(dtype)
        opt.step()
    return p.detach().float() - w0.float()


def test_stochastic_rounding_keeps_bf16_updates_in_expectation():
    """Against float32 AdamW on the same gradients: plain bf16 AdamW rounds ~98 % of the update away (the weights
    it changes are the few near 0); torchao's kinds with stochastic rounding change several times more weights and
    keep the mean update within a few percent (131072 weights: the rounding noise on the mean is ~2 %)."""
    reference = _delta("adamw", False, torch.float32).mean()
    assert reference == pytest.approx(-2 * LR, rel=0.1)
    plain = _delta("adamw", False, torch.bfloat16)
    assert abs(plain.mean() / reference) < 0.1
    for kind in OPTIMIZERS:
        rounded = _delta(kind, True, torch.bfloat16)
        assert float(rounded.mean() / reference) == pytest.approx(1.0, abs=0.1), kind
        assert (rounded != 0).float().mean() > 2 * (plain != 0).float().mean(), kind


def test_8bit_embedding_rows_that_skip_a_step_move_by_about_lr_not_hundreds_of_times_more():
    """torchao's AdamW8bit (``adamw8bit`` with stochastic rounding: configs/qwen3-8b.yaml's optimizer) on an input
    embedding: its 8-bit map rounded a second moment under ~1e-7 of its block's largest to 0 while the first moment
    kept its value, so a row used with a small gradient element and not used at the next step moved by
    lr * m / eps (measured: ~400 x lr in one step). With no zero code in the second moments' map (the test below)
    the rows move by about lr, and the embedding's moments stay 8-bit: the plan counts them so."""
    torch.manual_seed(0)  # float32 weights (rounded as usual): the update shows whole, not in bf16 spacings
    model = torch.nn.Sequential(torch.nn.Embedding(320, 128), torch.nn.Linear(128, 128, bias=False))
    emb, linear = model[0].weight, model[1].weight
    opt = build_optimizer("adamw8bit", model.parameters(), lr=LR, weight_decay=0.0, model=model,
                          stochastic_rounding=True)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(6):
        before = emb.detach().float().clone()
        grad = torch.zeros(320, 128)
        grad[torch.randint(320, (40,), generator=gen)] = torch.randn(40, 128, generator=gen) * 1e-2  # the step's tokens
        emb.grad, linear.grad = grad, torch.randn(128, 128, generator=gen)
        opt.step()
        worst = max(worst, float((emb.detach() - before).abs().max()) / LR)
    assert worst < 2, f"an embedding weight moved by {worst:.0f} x lr in one step"
    assert all(type(opt.state[p]["exp_avg"]).__name__ == "OptimState8bit" for p in (emb, linear))
    sizes = [(320 * 128, 4), (128 * 128, 4)]
    assert resident_state_bytes(opt, "cpu") == optimizer_state_bytes("adamw8bit", sizes, stochastic_rounding=True)


def test_8bit_weights_move_by_about_lr_at_a_step_whose_gradient_is_zero():
    """A GRPO step's gradient is 0 where every group's rewards tie (no advantage). torchao's AdamW8bit rounded a
    second moment under ~1.6e-7 of its block's largest to 0 (its unsigned map has a zero code) while the first moment
    kept its value, so the next step with a zero (or much smaller) gradient moved such weights of any quantized
    tensor by lr * m / eps (measured: ~820 x lr on 0.1 % of a Linear's weights; the tiny bf16 recipe's linears up to
    257 x lr after a step whose rewards all tied). Its second
    moments now have no zero code: a state from a checkpoint saved before is mended when loaded."""
    torch.manual_seed(0)  # float32 weights: the update shows whole
    gen = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter(torch.randn(256, 1024) * 0.02)
    emb = torch.nn.Embedding(320, 128)  # built without model=: its moments quantized as well
    rows = torch.zeros(320, 128)  # the step's tokens
    rows[torch.randint(320, (40,), generator=gen)] = torch.randn(40, 128, generator=gen) * 1e-2
    opt = build_optimizer("adamw8bit", [w, emb.weight], lr=LR, weight_decay=0.0, stochastic_rounding=True)
    worst = []
    for step in range(3):  # a step with a gradient, then two whose rewards all tied
        before = [w.detach().clone(), emb.weight.detach().clone()]
        w.grad = torch.randn(256, 1024, generator=gen) * 1e-2 if step == 0 else torch.zeros_like(w)
        emb.weight.grad = rows if step == 0 else torch.zeros_like(rows)
        opt.step()
        worst.append(max(float((p.detach() - b).abs().max()) / LR for p, b in zip((w, emb.weight), before)))
    assert max(worst) < 2, f"weights moved by {worst} x lr"
    # a state saved by the optimizer before (a zero code in its second moments' map) is mended on load
    saved = opt.state_dict()
    for state in saved["state"].values():
        state["exp_avg_sq"].qmap[0] = 0.0
    again = build_optimizer("adamw8bit", [w, emb.weight], lr=LR, weight_decay=0.0, stochastic_rounding=True)
    again.load_state_dict(saved)
    assert all(float(s["exp_avg_sq"].qmap[0]) > 0 for s in again.state.values())


class _Bnb8bitProtocol(torch.optim.AdamW):
    """bitsandbytes' 8-bit optimizer in pure logic: one sorted unsigned map (0 its first code) made by
    ``fill_qmap``, referenced by each state as ``qmap2``, and a loader of its own that runs none of PyTorch's hooks."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.name2qmap = {}
        self.fill_qmap()

    def fill_qmap(self):
        self.name2qmap["udynamic"] = torch.tensor([0.0, 3.25e-7, 7.75e-7, 1.0])

    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].setdefault("qmap2", self.name2qmap["udynamic"])
        return loss

    def load_state_dict(self, state_dict):
        self.__setstate__({"state": {p: dict(v) for p, v in zip(self.param_groups[0]["params"],
                                                                 state_dict["state"].values())},
                           "param_groups": self.param_groups})


@pytest.mark.parametrize("real", [False, True], ids=["protocol", "bitsandbytes"])
def test_bitsandbytes_second_moments_map_has_no_zero_code_when_built_and_when_loaded(real):
    """bitsandbytes' AdamW8bit rounds a second moment under half its map's smallest code to 0 (measured on the
    H100: 733 x lr moves at a zero-gradient step). Built for the recipe, its map's zero code is its smallest
    positive value, in the shared map and in every state's copy, and a state saved before the fix (a zero there)
    is mended by the optimizer's own loader. ``real``: bitsandbytes itself, where installed (its CPU step here)."""
    from rollout_sleep.run.optim import _second_moments_without_zero

    if real and importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs bitsandbytes")
    w = torch.nn.Parameter(torch.randn(64, 128) * 0.02)  # 8192 elements: quantized by bitsandbytes
    if real:
        opt = build_optimizer("adamw8bit", [w], lr=LR, weight_decay=0.0, stochastic_rounding=False)
    else:
        opt = _Bnb8bitProtocol([w], lr=LR)
        _second_moments_without_zero(opt)
    w.grad = torch.randn(64, 128)
    opt.step()
    maps = [opt.name2qmap["udynamic"], *(st["qmap2"] for st in opt.state.values())]
    assert all(float(q[0]) == float(q[1]) > 0 for q in maps), [q[:2] for q in maps]
    saved = opt.state_dict()
    quant = "__bnb_optimizer_quant_state__"  # bitsandbytes wraps its quantization state in its state dict
    for st in saved["state"].values():
        inner = st.get(quant, st)
        inner["qmap2"] = inner["qmap2"].clone()
        inner["qmap2"][0] = 0.0
    opt.load_state_dict(saved)
    assert all(float(st["qmap2"][0]) > 0 for st in opt.state.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bitsandbytes' 8-bit step)")
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_bitsandbytes_8bit_weights_move_by_about_lr_at_a_step_whose_gradient_is_zero():
    """The same steps with bitsandbytes' AdamW8bit (``adamw8bit`` without stochastic rounding: the two-copy path's
    8-bit optimizer): a step with a gradient, then two whose rewards all tied. A second moment its map rounds to 0
    while the first moment keeps its value would move weights by lr * m / eps, as torchao's did."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    w = torch.nn.Parameter((torch.randn(256, 1024) * 0.02).cuda())  # float32: the update shows whole
    emb = torch.nn.Parameter((torch.randn(320, 128) * 0.02).cuda())
    rows = torch.zeros(320, 128)
    rows[torch.randint(320, (40,), generator=gen)] = torch.randn(40, 128, generator=gen) * 1e-2
    opt = build_optimizer("adamw8bit", [w, emb], lr=LR, weight_decay=0.0, stochastic_rounding=False)
    assert type(opt).__module__.startswith("bitsandbytes"), type(opt)
    worst = []
    for step in range(3):
        before = [w.detach().clone(), emb.detach().clone()]
        w.grad = (torch.randn(256, 1024, generator=gen) * 1e-2 if step == 0 else torch.zeros(256, 1024)).cuda()
        emb.grad = (rows if step == 0 else torch.zeros_like(rows)).cuda()
        opt.step()
        worst.append(max(float((p.detach() - b).abs().max()) / LR for p, b in zip((w, emb), before)))
    assert max(worst) < 2, f"weights moved by {worst} x lr"


def test_state_bytes_estimate_is_exact_for_torchao_kinds():
    """After one step, on tensors chosen to hit each of torchao's cases: 4096 elements (quantized), 4224 (a multiple
    of 4-bit's block of 128 but not of 8-bit's 256), 100 (under 4096: moments in the parameters' dtype), and
    float32 parameters (quantized or not). A saved and reloaded state stays quantized (same bytes)."""
    shapes = [((64, 64), torch.bfloat16), ((33, 128), torch.bfloat16), ((100,), torch.bfloat16),
              ((2, 4096), torch.float32), ((10,), torch.float32)]
    sizes = [(torch.Size(s).numel(), torch.empty((), dtype=d).element_size()) for s, d in shapes]
    for kind, rounding in [(k, True) for k in OPTIMIZERS] + [("adamw4bit", False)]:
        params = [torch.nn.Parameter(torch.randn(s, dtype=d) * 0.02) for s, d in shapes]
        opt = build_optimizer(kind, params, lr=1e-3, weight_decay=0.0, stochastic_rounding=rounding)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        assert resident_state_bytes(opt, "cpu") == optimizer_state_bytes(kind, sizes, stochastic_rounding=rounding), kind
        saved = io.BytesIO()
        torch.save(opt.state_dict(), saved)
        saved.seek(0)
        again = build_optimizer(kind, params, lr=1e-3, weight_decay=0.0, stochastic_rounding=rounding)
        again.load_state_dict(torch.load(saved, weights_only=True))
        assert resident_state_bytes(again, "cpu") == resident_state_bytes(opt, "cpu"), kind
    # torchao keeps no float32 state for the embeddings (bitsandbytes does): the plan counts them quantized
    plain = optimizer_state_bytes("adamw8bit", [(8192, 2), (100, 2)], state32=(8192,))
    rounded = optimizer_state_bytes("adamw8bit", [(8192, 2), (100, 2)], state32=(8192,), stochastic_rounding=True)
    assert rounded == optimizer_state_bytes("adamw8bit", [(8192, 2), (100, 2)], stochastic_rounding=True) < plain
    shape = _shape((8192, 100), embedding_numels=(8192,))
    plan = plan_memory(PlanInputs(shape, optimizer="adamw8bit", stochastic_rounding=True))
    assert plan.phases["training"]["optimizer_state"] == rounded


def test_the_setting_decides_where_it_is_on():
    """``null`` (auto) is on only where the caller says bf16 weights are stepped in place with no float32 master;
    today's recipe says no, so its default keeps the optimizers it had."""
    assert stochastic_rounding_on(None, torch.bfloat16, in_place=True)
    assert not stochastic_rounding_on(None, "bfloat16", in_place=False)
    assert not stochastic_rounding_on(None, "float16", in_place=True)
    assert stochastic_rounding_on(True, "bfloat16", in_place=False)
    assert not stochastic_rounding_on(False, "bfloat16", in_place=True)
    assert not run_stochastic_rounding(load_config(None, ["model.dtype=bfloat16"]))
    assert run_stochastic_rounding(load_config(None, ["model.dtype=bfloat16", "train.stochastic_rounding=true"]))


def test_config_refuses_rounding_without_bf16_and_unknown_optimizers(tmp_path):
    """``true`` needs bf16 weights (a modes rule names the key and the fix); ``adamw4bit`` and bf16 rounding load
    (the YAML's true as well as the override's); an unknown optimizer or a setting that is no bool is refused;
    changing the setting on a resume is refused (it picks the optimizer, and so its saved state)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.stochastic_rounding=true"])
    (problem,) = [p for p in err.value.problems if "stochastic_rounding" in p]
    assert problem.startswith("train.stochastic_rounding=true with model.dtype=float32: ")
    assert "Fix: model.dtype=bfloat16" in problem
    assert load_config(None, ["train.optimizer=adamw4bit"]).train.optimizer == "adamw4bit"
    yaml = tmp_path / "c.yaml"
    yaml.write_text("model: {dtype: bfloat16}\ntrain: {optimizer: adamw4bit, stochastic_rounding: true}\n")
    assert load_config(yaml, []).train.stochastic_rounding is True
    assert load_config(None, ["train.stochastic_rounding=false"]).train.stochastic_rounding is False
    assert load_config(None, []).train.stochastic_rounding is None
    with pytest.raises(ConfigError, match="train.optimizer must be one of adamw, adamw8bit, adamw4bit, got 'adam'"):
        load_config(None, ["train.optimizer=adam"])
    with pytest.raises(ConfigError, match="train.stochastic_rounding must be true or false or null, got 'yes please'"):
        load_config(None, ["train.stochastic_rounding=yes please"])
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        build_optimizer("adam", [torch.nn.Parameter(torch.zeros(2))], lr=1e-3, weight_decay=0.0)
    # the rounding is an update rule, not state (torchao keeps it out of its param groups): a resume may change
    # it; a change of the optimizer's class it implies is refused against the checkpoint's record instead
    assert resume_classes()["train.stochastic_rounding"] == "applied"
    changes = config_changes({"train": {"stochastic_rounding": None}}, {"train": {"stochastic_rounding": False}})
    assert changes["fixed"] == [] and changes["applied"] == [("train.stochastic_rounding", None, False)]
    opt = build_optimizer("adamw4bit", [torch.nn.Parameter(torch.zeros(256, 256, dtype=torch.bfloat16))], lr=1e-3,
                          weight_decay=0.0, stochastic_rounding=True)
    state = opt.state_dict()
    again = build_optimizer("adamw4bit", [torch.nn.Parameter(torch.zeros(256, 256, dtype=torch.bfloat16))],
                            lr=1e-3, weight_decay=0.0, stochastic_rounding=False)
    again.load_state_dict(state)
    assert again.bf16_stochastic_round is False  # the run's setting, not the checkpoint's


def test_missing_torchao_is_named_with_the_fix(monkeypatch):
    """Without torchao: ``adamw4bit`` and any kind with rounding are refused at load time naming the key and
    ``pip install torchao``; ``build_optimizer`` raises the same; plain ``adamw`` needs nothing; the memory plan's
    knob says what the leaner optimizer needs."""
    without_package(monkeypatch, "torchao")
    with pytest.raises(ConfigError, match=r"train.optimizer=adamw4bit takes torchao's AdamW4bit, and torchao is not "
                                          r"installed: pip install torchao"):
        load_config(None, ["train.optimizer=adamw4bit"])
    with pytest.raises(ConfigError, match=r"train.stochastic_rounding \(on\) takes torchao's _AdamW.*pip install "
                                          r"torchao.*train.stochastic_rounding=false"):
        load_config(None, ["model.dtype=bfloat16", "train.stochastic_rounding=true"])
    with pytest.raises(ImportError, match="pip install torchao"):
        build_optimizer("adamw", [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))], lr=1e-3,
                        weight_decay=0.0, stochastic_rounding=True)
    assert missing_package("adamw") is None and load_config(None, ["model.dtype=bfloat16"])
    shape = _shape((4096,))
    labels = [label for label, _ in knob_alternatives(PlanInputs(shape, optimizer="adamw8bit"))]
    assert "train.optimizer=adamw4bit (needs torchao: pip install torchao)" in labels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_torchao_state_and_keeps_it_quantized():
    """torchao's 8-bit state on CUDA (compiled step) offloaded between steps: the weights are bitwise those without
    the offload, between steps no state is on the GPU, and what comes back is still quantized (before, a plain
    host buffer dequantized it)."""
    from rollout_sleep.run.offload import OptimizerOffload

    pytest.importorskip("torchao")

    def run(offload: bool):
        torch.manual_seed(0)
        p = torch.nn.Parameter((torch.randn(64, 128, device="cuda") * 0.02).bfloat16())
        opt = build_optimizer("adamw8bit", [p], lr=1e-4, weight_decay=0.0, stochastic_rounding=True)
        mover = OptimizerOffload(opt) if offload else None
        for i in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
            if mover is not None:
                assert resident_state_bytes(opt, "cuda") == 0
        return p.detach().clone(), opt, mover

    ref, _, _ = run(False)
    w, opt, mover = run(True)
    assert torch.equal(ref, w)
    assert resident_state_bytes(opt, "cpu") == optimizer_state_bytes("adamw8bit", [(64 * 128, 2)],
                                                                      stochastic_rounding=True)
    mover.reload()
    assert type(opt.state[opt.param_groups[0]["params"][0]]["exp_avg"]).__name__ == "OptimState8bit"
