"""LoRA with one copy of the base (rollout_sleep.lora.adapter) on the real vLLM CPU engine: the adapter reaches vLLM's
slot exactly (first through vLLM's own in-memory adapter path, then by direct slot copies), verify proves it
bitwise and catches a stale slot, the base stays the trainer's, level-0 sleep, and the recipe learns with it.
(Sharing the base's memory needs CUDA: vLLM's CPU kernels repack linear weights; the views themselves are
checked here on a plain model.)"""

from __future__ import annotations

import pytest
import torch

from helpers import DTYPE


@pytest.fixture(scope="module")
def lora_engine(ckpts):
    from rollout_sleep.engine.engine import Engine
    from rollout_sleep.lora.adapter import LoraSettings

    eng = Engine(ckpts["tied0"], dtype=DTYPE, seed=0, **LoraSettings(rank=8).engine_kwargs())
    yield eng
    eng.close()


def peft_model(path: str, seed: int = 0):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rollout_sleep.lora.adapter import LoraSettings

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, DTYPE)),
                           LoraSettings(rank=8, alpha=16).peft_config())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapter change the outputs
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def greedy_matches(engine, model, request, prompts) -> tuple[int, float]:
    """(prompts whose vLLM greedy tokens through the adapter equal the PEFT model's argmax, max |log-prob gap|)."""
    outs = engine.generate(prompts, max_tokens=6, temperature=0.0, lora_request=request)
    same, gap = 0, 0.0
    with torch.no_grad():
        for c in outs:
            ids = torch.tensor([c.prompt_token_ids + c.token_ids])
            logp = torch.log_softmax(model(ids).logits[0, len(c.prompt_token_ids) - 1:-1].float(), -1)
            same += logp.argmax(-1).tolist() == c.token_ids
            mine = logp.gather(-1, torch.tensor(c.token_ids)[:, None])[:, 0]
            gap = max(gap, float((mine - torch.tensor(c.logprobs)).abs().max()))
    return same, gap


def test_adapter_moves_alone_exactly_and_verify_proves_it(lora_engine, ckpts):
    from rollout_sleep.lora.adapter import AdapterSync
    from rollout_sleep.engine.state import EngineStateError
    from rollout_sleep.weights.stream import WeightStream
    from rollout_sleep.weights.verify import verify
    from rollout_sleep.weights.spec import WeightMismatchError

    eng = lora_engine
    model = peft_model(ckpts["tied0"])
    adapter = AdapterSync(eng, model)
    trainer_b = adapter.targets[0].B.detach().clone()
    assert adapter.push()["adapter_method"] == "install"
    # vLLM scales lora_B in place when it loads an adapter: it must have worked on a copy
    assert torch.equal(adapter.targets[0].B.detach(), trainer_b)
    assert adapter.verify().raise_if_failed().compared == 2 * len(adapter.targets) == 28
    prompts = [[5, 6, 7, 8], [20, 21, 22], [40, 41, 42, 43, 44]]
    base_tokens = [c.token_ids for c in eng.generate(prompts, max_tokens=6, temperature=0.0)]
    same, gap = greedy_matches(eng, model, adapter.request, prompts)
    assert same == len(prompts) and gap < 1e-4, (same, gap)

    # a training step moves the adapter: the next push copies into the slot directly, and is exact again
    with torch.no_grad():
        for t in adapter.targets:
            t.A.add_(torch.randn_like(t.A) * 0.2)
    assert adapter.push()["adapter_method"] == "slots"
    assert adapter.verify().ok
    same, gap = greedy_matches(eng, model, adapter.request, prompts)
    assert same == len(prompts) and gap < 1e-4, (same, gap)
    lora_tokens = [c.token_ids for c in eng.generate(prompts, max_tokens=6, temperature=0.0,
                                                     lora_request=adapter.request)]
    assert lora_tokens != base_tokens  # the adapter is what changed the outputs

    # the base never moved: vLLM's weights (read through its LoRA-wrapped layers) are the trainer's base
    verify(eng, WeightStream(model, dtype=eng.dtype, merge_adapters=False)).raise_if_failed()
    merged = verify(eng, WeightStream(model, dtype=eng.dtype))  # the merged model is not what vLLM holds
    assert not merged.ok and merged.mismatched

    # a stale slot is caught, by name
    with torch.no_grad():
        adapter.targets[3].B[0, 0] += 1e-3
    report = adapter.verify()
    assert not report.ok and list(report.mismatched) == [f"{adapter.targets[3].name}.lora_B"], report.mismatched
    adapter.push()
    assert adapter.verify().ok

    # level 0: the KV cache only; requests refused while asleep, the adapter still served after the wake
    eng.sleep(0)
    with pytest.raises(EngineStateError, match="asleep"):
        eng.generate(prompts, max_tokens=2, lora_request=adapter.request)
    eng.wake_up()
    assert adapter.verify().ok
    assert [c.token_ids for c in eng.generate(prompts, max_tokens=6, temperature=0.0,
                                              lora_request=adapter.request)] == lora_tokens

    # a diverged adapter is refused before it reaches vLLM; the engine keeps serving the last good one
    with torch.no_grad():
        adapter.targets[1].A[0, 0] = float("nan")
    with pytest.raises(WeightMismatchError, match="non-finite"):
        adapter.push()
    with torch.no_grad():
        adapter.targets[1].A[0, 0] = 0.0
    assert [c.token_ids for c in eng.generate(prompts, max_tokens=6, temperature=0.0,
                                              lora_request=adapter.request)] == lora_tokens


def test_model_on_views_holds_no_copy_and_computes_alike(ckpts):
    """The trainer's base as views of given tensors (what it gets from vLLM's weights on CUDA): built on the meta
    device, every parameter is the given memory, rotary tables computed, the same logits as from_pretrained."""
    from transformers import AutoConfig

    from helpers import hf_model
    from rollout_sleep.weights.views import model_on_views

    ref = hf_model(ckpts["untied0"])
    targets = dict(ref.state_dict())
    model = model_on_views(AutoConfig.from_pretrained(ckpts["untied0"]), targets, getattr(torch, DTYPE))
    ptrs = {t.data_ptr() for t in targets.values()}
    assert all(p.data_ptr() in ptrs and not p.requires_grad for p in model.parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    with pytest.raises(ValueError, match="lm_head.weight: no tensor"):
        model_on_views(AutoConfig.from_pretrained(ckpts["untied0"]),
                       {n: t for n, t in targets.items() if n != "lm_head.weight"}, getattr(torch, DTYPE))


def test_level0_releases_the_kv_cache_only(monkeypatch):
    """Level 0 on CUDA (logic only; CPU has no sleep allocator): only the allocations vLLM's sleep allocator
    tagged ``kv_cache`` are unmapped, the weights (which the trainer views) stay mapped, with either allocator
    generation (with ``is_asleep`` or without), and the wake maps the KV cache back only."""
    from types import SimpleNamespace

    import vllm.device_allocator.cumem as cumem

    from rollout_sleep.engine.memory import map_kv_cache, release_kv_cache

    unmapped = []
    monkeypatch.setattr(cumem, "unmap_and_release", lambda handle: unmapped.append(handle))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def allocator(style: str):
        data = {1: SimpleNamespace(tag="weights", handle=("w", 100)),
                2: SimpleNamespace(tag="kv_cache", handle=("kv0", 30)),
                3: SimpleNamespace(tag="kv_cache", handle=("kv1", 20))}
        alloc = SimpleNamespace(pointer_to_data=data, woken=[])
        alloc.wake_up = lambda tags=None: alloc.woken.append(tags)
        if style != "old":
            for d in data.values():
                d.is_asleep = False
        return alloc

    for style in ("old", "is_asleep"):
        unmapped.clear()
        alloc = allocator(style)
        monkeypatch.setattr(cumem.CuMemAllocator, "get_instance", staticmethod(lambda: alloc))
        assert release_kv_cache(None) == 50, style
        assert sorted(unmapped) == [("kv0", 30), ("kv1", 20)], style  # never the weights
        if style == "is_asleep":
            assert release_kv_cache(None) == 0 and len(unmapped) == 2  # already released: nothing twice
        map_kv_cache(None)
        assert alloc.woken == [["kv_cache"]], style
    # a worker maps it back through its own wake_up, which re-initializes what the model runner keeps in that
    # memory (vLLM 0.26's V2 runner: block-table layout tensors; skipping it crashed the first generate on the H100)
    from types import SimpleNamespace as NS

    calls = []
    worker = NS(wake_up=lambda tags=None: calls.append(tags))
    map_kv_cache(worker)
    assert calls == [["kv_cache"]] and alloc.woken == [["kv_cache"]]


def test_adapter_modules_keep_their_names_whatever_vllm_calls_the_rename_mapper(monkeypatch):
    """vLLM 0.32 reduces the model's hf_to_vllm_mapper to its renames with ``get_rename_mapper``, 0.26 with
    ``get_unstacked_mapper``: under either (or neither) the trainer's q/k/v adapters stay three modules that
    vLLM's packing puts into the three slices of ``qkv_proj`` (the full mapper would merge them: refused by name)."""
    import dataclasses

    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import PackedLoRALayerWeights
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.model_executor.models.utils import WeightsMapper

    from rollout_sleep.lora.worker import build_lora_model, check_distinct_modules, naming_mapper

    stacked = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v"),
               ".gate_proj": (".gate_up_proj", 0), ".up_proj": (".gate_up_proj", 1)}
    renames = {"model.language_model.": "model."}  # a genuine rename (as in multimodal wrappers) must survive

    class Unstacked:  # vLLM 0.26's spelling of the reduction
        def __init__(self, **kw):
            self.full = WeightsMapper(**kw)
            self.orig_to_new_stacked = self.full.orig_to_new_stacked

        def _map_name(self, key):
            return self.full._map_name(key)

        def get_unstacked_mapper(self):
            return dataclasses.replace(self.full, orig_to_new_stacked={})

    @dataclasses.dataclass
    class Bare:  # no reduction method at all: the stacked maps are dropped by rollout_sleep
        orig_to_new_prefix: dict
        orig_to_new_stacked: dict

        def _map_name(self, key):
            return WeightsMapper(orig_to_new_prefix=self.orig_to_new_prefix,
                                 orig_to_new_stacked=self.orig_to_new_stacked)._map_name(key)

    g = torch.Generator().manual_seed(0)
    r, hidden, q_out, kv_out, inter = 4, 16, 32, 8, 24
    shapes = {"self_attn.q_proj": q_out, "self_attn.k_proj": kv_out, "self_attn.v_proj": kv_out,
              "mlp.gate_proj": inter, "mlp.up_proj": inter}
    tensors = {}
    for sub, out in shapes.items():
        tensors[f"base_model.model.model.language_model.layers.0.{sub}.lora_A.weight"] = torch.randn(r, hidden, generator=g)
        tensors[f"base_model.model.model.language_model.layers.0.{sub}.lora_B.weight"] = torch.randn(out, r, generator=g)
    helper = PEFTHelper.from_dict({"r": r, "lora_alpha": 2 * r, "target_modules": list(shapes)})
    for full in (WeightsMapper(orig_to_new_prefix=renames, orig_to_new_stacked=stacked),
                 Unstacked(orig_to_new_prefix=renames, orig_to_new_stacked=stacked),
                 Bare(renames, stacked)):
        with pytest.raises(RuntimeError, match=r"onto one module model\.layers\.0\.self_attn\.qkv_proj"):
            check_distinct_modules(tensors, full)  # what the H100 (0.26) got: q, k, v merged, IndexError later
        mapper = naming_mapper(full)
        check_distinct_modules(tensors, mapper)
        lora = LoRAModel.from_lora_tensors(1, {k: v.clone() for k, v in tensors.items()}, helper, device="cpu",
                                           dtype=torch.float32, weights_mapper=mapper)
        assert sorted(lora.loras) == sorted(f"model.layers.0.{sub}" for sub in shapes), type(full).__name__
        for fused, subs in (("self_attn.qkv_proj", ["q_proj", "k_proj", "v_proj"]),
                            ("mlp.gate_up_proj", ["gate_proj", "up_proj"])):
            parent = fused.split(".")[0]
            packed = PackedLoRALayerWeights.pack([lora.loras[f"model.layers.0.{parent}.{s}"] for s in subs])
            want = [f"base_model.model.model.language_model.layers.0.{parent}.{s}" for s in subs]
            # one [r, in] A and one [out, r] B (scaled by alpha / r) per slice: what set_lora copies into
            # lora_{a,b}_stacked[i], and what AdapterSync's slot copies and verify expect there
            assert [a.shape for a in packed.lora_a] == [(r, hidden)] * len(subs)
            assert all(torch.equal(a, tensors[f"{w}.lora_A.weight"]) for a, w in zip(packed.lora_a, want))
            assert all(torch.equal(b, tensors[f"{w}.lora_B.weight"] * 2.0) for b, w in zip(packed.lora_b, want))

    # a vLLM whose PEFT helper has no rank/alpha patterns (0.26) would serve one scale for all: refused first
    config = {"r": r, "lora_alpha": 2 * r, "target_modules": list(shapes), "alpha_pattern": {"q_proj": 16}}
    monkeypatch.delattr(PEFTHelper, "get_rank_and_scaling")
    with pytest.raises(ValueError, match="sets alpha_pattern, which this vLLM's LoRA ignores"):
        build_lora_model(None, 1, tensors, config)


def test_an_adapter_push_is_an_engine_operation(lora_engine, ckpts, monkeypatch):
    """The adapter's push and verify ran outside the engine's lock: a push from another thread changed the adapter
    under a running generate (which then sampled from the new one), and on a closed engine they failed with
    ``AttributeError`` on its released vLLM. Now a push waits for the generate, and a closed engine refuses both."""
    import threading

    from rollout_sleep.engine.contract import EngineClosedError
    from rollout_sleep.engine.engine import Engine
    from rollout_sleep.lora.adapter import AdapterSync

    eng = lora_engine
    model = peft_model(ckpts["tied0"], seed=1)
    adapter = AdapterSync(eng, model)
    adapter.push()
    prompts = [[5, 6, 7, 8], [20, 21, 22]]

    def greedy():
        return [c.token_ids for c in eng.generate(prompts, max_tokens=6, temperature=0.0,
                                                  lora_request=adapter.request)]

    old = greedy()
    with torch.no_grad():  # the trainer's next step, pushed while a rollout with the current adapter runs
        for t in adapter.targets:
            t.B.add_(torch.randn_like(t.B))
    real, entered, release = eng.llm.generate, threading.Event(), threading.Event()

    def paused(*args, **kwargs):
        entered.set()
        release.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(eng.llm, "generate", paused)
    out: dict = {}
    rollout = threading.Thread(target=lambda: out.setdefault("tokens", greedy()), daemon=True)
    rollout.start()
    try:
        assert entered.wait(60)
        push = threading.Thread(target=lambda: out.setdefault("push", adapter.push()), daemon=True)
        push.start()
        push.join(1.0)
        assert push.is_alive(), "the adapter's push ran while a generate was running"
    finally:
        release.set()
    rollout.join(120)
    push.join(120)
    monkeypatch.undo()
    assert out["tokens"] == old and out["push"]["adapter_method"] == "slots"
    assert adapter.verify().ok and greedy() != old

    closed = Engine.attach(eng.llm, eng.model_path)  # a wrapper of the same vLLM: closing it leaves that running
    on_closed = AdapterSync(closed, model)
    closed.close()
    for call in (on_closed.push, on_closed.verify):
        with pytest.raises(EngineClosedError, match="this Engine is closed"):
            call()
