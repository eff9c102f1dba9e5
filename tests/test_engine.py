"""The engine's sleep → wake → reload → reset cycle against the real vLLM engine."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, assert_follows, hf_greedy, hf_model
from rollout_sleep.engine.state import EngineStateError
from rollout_sleep.weights.stream import WeightStream
from rollout_sleep.weights.spec import WeightMismatchError

N = 16  # tokens compared per prompt

# Agreement with transformers is checked by conftest.assert_follows (thresholds and reasons there).


def greedy(engine, prompts=PROMPTS, n=N):
    return [c.token_ids for c in engine.generate(prompts, max_tokens=n, min_tokens=n, temperature=0.0)]


def test_generate_returns_tokens_and_logprobs(engine):
    outs = engine.generate(PROMPTS[:2], max_tokens=5, temperature=1.0, n=3, seed=1)
    assert len(outs) == 6 and [o.prompt_index for o in outs] == [0, 0, 0, 1, 1, 1]
    for o in outs:
        assert len(o.logprobs) == len(o.token_ids) > 0
        assert all(lp <= 0.0 for lp in o.logprobs)
    text = engine.generate(["12+7="], max_tokens=3, temperature=0.0)
    assert text[0].prompt_token_ids == engine.tokenizer("12+7=").input_ids


def test_fast_output_path_equals_vllms_own_detokenized_output(engine):
    """generate() asks vLLM for no per-step detokenization and flat log-probs, then decodes once:
    tokens, log-probs and texts must equal what vLLM's default (per-token dicts, incremental text) gives."""
    kw = dict(n=16, max_tokens=40, temperature=1.0, seed=7)
    fast = engine.generate(PROMPTS[:4], **kw)
    slow = engine.generate(PROMPTS[:4], detokenize=True, flat_logprobs=False, **kw)
    assert [c.token_ids for c in fast] == [c.token_ids for c in slow]
    assert [c.logprobs for c in fast] == [c.logprobs for c in slow]
    assert [c.text for c in fast] == [c.text for c in slow]
    assert any(c.text for c in fast)


def test_wake_with_new_weights_follows_them(engine, ckpts):
    before = greedy(engine)
    new = hf_model(ckpts["tied1"])
    sleep = engine.sleep(level=2)
    assert engine.state == "asleep(level=2)" and sleep.seconds["sleep"] > 0  # timed
    report = engine.wake_up(weights=WeightStream(new, dtype=engine.dtype))
    assert list(report.seconds) == ["wake_weights", "load", "wake_kv_cache", "reset"]  # the safe order
    after = greedy(engine)
    assert sum(a != b for a, b in zip(before, after)) >= 6, "new weights must change the greedy outputs"
    assert_follows(engine, new)


def test_prefix_cache_never_serves_old_weights(engine, ckpts):
    """An awake weight update (no sleep) is where vLLM keeps its prefix cache: without the engine's reset,
    this long prompt is answered from KV computed with the old weights (checked: vLLM 0.32 CPU gives the
    old model's tokens). A sleep drops the cache inside vLLM as well; both paths are checked."""
    long_prompt = [[(11 * j) % 250 + 1 for j in range(300)]]  # 18+ full KV blocks to cache
    old = greedy(engine, long_prompt)
    assert greedy(engine, long_prompt) == old  # served again (from the prefix cache)
    new = hf_model(ckpts["tied1"])
    engine.load_weights(new.state_dict())  # awake: weights replaced under a warm prefix cache
    after = greedy(engine, long_prompt)
    assert after != old
    assert_follows(engine, new, long_prompt)
    engine.sleep(level=2)
    engine.wake_up(weights=WeightStream(hf_model(ckpts["tied0"])))
    assert greedy(engine, long_prompt) == old


def test_level1_keeps_weights(engine):
    before = greedy(engine)
    engine.sleep(level=1)
    report = engine.wake_up()
    assert "load" not in report.seconds
    assert greedy(engine) == before


def test_reload_from_checkpoint_path(engine, ckpts):
    before = greedy(engine)
    engine.sleep(level=2)
    engine.wake_up(weights=ckpts["tied1"])  # tied model on CPU: streamed, head included (vLLM CPU bug)
    assert_follows(engine, hf_model(ckpts["tied1"]))
    engine.sleep(level=2)
    engine.wake_up(reload_checkpoint=True)
    assert greedy(engine) == before


@pytest.mark.slow  # duplicate (CI time): test_models[qwen3-untied] wakes an untied engine from a path, asserts
# vLLM's path reload was the route, verifies bitwise and compares log-probs with a fresh engine on those weights
def test_untied_model_path_reload_uses_vllm_path_route(ckpts):
    """vLLM's own path reload (untied model). In a subprocess: one vLLM engine per process."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
from conftest import assert_follows, hf_model
from rollout_sleep.engine.engine import Engine
eng = Engine({ckpts["untied0"]!r}, dtype="float32")
eng.sleep(level=2)
eng.wake_up(weights={ckpts["untied1"]!r})
assert_follows(eng, hf_model({ckpts["untied1"]!r}))
print("FOLLOWS")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "FOLLOWS" in proc.stdout, proc.stderr[-3000:]


def test_generate_while_asleep_is_refused_and_engine_recovers(engine):
    before = greedy(engine)
    engine.sleep(level=2)
    with pytest.raises(EngineStateError, match="asleep"):
        engine.generate(PROMPTS, max_tokens=2)
    engine.wake_up(reload_checkpoint=True)
    assert greedy(engine) == before


def test_level2_wake_without_weights_is_refused(engine):
    before = greedy(engine)
    engine.sleep(level=2)
    with pytest.raises(EngineStateError, match="needs new weights"):
        engine.wake_up()
    assert engine.state == "asleep(level=2)"  # unchanged, still wakeable
    with pytest.raises(ValueError, match="not both"):
        engine.wake_up(weights={}, reload_checkpoint=True)
    engine.wake_up(reload_checkpoint=True)
    assert greedy(engine) == before


def test_sleep_twice_unknown_level_and_double_wake_are_refused(engine):
    with pytest.raises(ValueError, match="unknown sleep level"):
        engine.sleep(level=3)
    with pytest.raises(EngineStateError, match="already awake"):
        engine.wake_up()
    engine.sleep(level=1)
    with pytest.raises(EngineStateError, match="already asleep"):
        engine.sleep(level=2)
    engine.wake_up()
    assert greedy(engine, PROMPTS[:1], 2)


def test_bad_weights_leave_the_engine_untouched(engine, ckpts):
    before = greedy(engine)
    sd = hf_model(ckpts["tied1"]).state_dict()
    renamed = dict(sd)
    renamed["model.layers.0.mlp.gate.weight"] = renamed.pop("model.layers.0.mlp.gate_proj.weight")
    with pytest.raises(WeightMismatchError) as err:
        engine.load_weights(renamed)
    msg = str(err.value)
    assert "unexpected weight 'model.layers.0.mlp.gate.weight'" in msg
    assert "missing weight 'model.layers.0.mlp.gate_proj.weight'" in msg
    bad_shape = dict(sd)
    bad_shape["model.norm.weight"] = torch.ones(7)
    engine.sleep(level=2)
    with pytest.raises(WeightMismatchError, match="shape mismatch for 'model.norm.weight'"):
        engine.wake_up(weights=bad_shape)
    assert engine.is_asleep  # validation happens before anything is woken or loaded
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        engine.wake_up(weights="/nonexistent/checkpoint")
    engine.wake_up(reload_checkpoint=True)
    assert greedy(engine) == before


def test_interrupted_stream_blocks_generation_until_a_complete_load(engine, ckpts):
    sd = hf_model(ckpts["tied1"]).state_dict()

    def broken():
        for i, item in enumerate(sd.items()):
            if i == 5:
                raise RuntimeError("trainer died mid-sync")
            yield item

    engine.sleep(level=2)
    with pytest.raises(RuntimeError, match="mid-sync"):
        engine.wake_up(weights=broken())
    assert not engine.is_asleep
    with pytest.raises(EngineStateError, match="interrupted"):
        engine.generate(PROMPTS, max_tokens=2)
    engine.load_weights(sd)
    assert_follows(engine, hf_model(ckpts["tied1"]))


def test_cpu_memory_report_says_what_it_measures(engine):
    rep = engine.sleep(level=2)
    assert rep.memory_kind == ("cuda_free" if torch.cuda.is_available() else "cpu_rss")
    assert set(rep.memory_gib) == {"before", "asleep"}
    engine.wake_up(reload_checkpoint=True)


def test_release_cached_memory_only_when_short(monkeypatch):
    """Pure logic (no GPU here): empty PyTorch's cache only if free memory can't hold what the engine maps back."""
    import rollout_sleep.engine.memory as mem_mod

    emptied = []
    monkeypatch.setattr(mem_mod.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mem_mod.torch.cuda, "mem_get_info", lambda: (10 * 2**30, 80 * 2**30))
    monkeypatch.setattr(mem_mod.torch.cuda, "empty_cache", lambda: emptied.append(1))
    assert mem_mod.release_cached_memory(8.5) is False and not emptied      # 10 GiB free >= 8.5 + 1 margin
    assert mem_mod.release_cached_memory(9.5) is True and len(emptied) == 1  # short by the margin
    assert mem_mod.release_cached_memory(None) is True and len(emptied) == 2  # need unknown: always


def test_kv_cache_bytes_for_matches_vllms_cache(engine):
    """vLLM turns the engine's KV-cache bytes into blocks; our per-token size must give the same token count."""
    from rollout_sleep.engine.memory import kv_cache_bytes_for

    cache = engine.llm.llm_engine.vllm_config.cache_config
    tokens = cache.num_gpu_blocks * cache.block_size
    assert kv_cache_bytes_for(engine.model_path, tokens, engine.dtype, cache.block_size) == 256 << 20
    assert kv_cache_bytes_for(engine.model_path, tokens + 1, engine.dtype, cache.block_size) > 256 << 20


def test_sleep_keeping_the_trainer_cache_suppresses_only_the_sleeps_empty_cache(monkeypatch):
    """Pure logic (no GPU here): inside the sleep, vLLM's ``empty_cache`` is a no-op; after it, the real one."""
    import rollout_sleep.engine.memory as mem_mod

    calls = []
    monkeypatch.setattr(mem_mod.torch.cuda, "empty_cache", lambda: calls.append("emptied"))
    with mem_mod.cache_kept():
        mem_mod.torch.cuda.empty_cache()
    assert calls == []
    mem_mod.torch.cuda.empty_cache()
    assert calls == ["emptied"]
    with pytest.raises(RuntimeError), mem_mod.cache_kept():
        raise RuntimeError("vLLM failed mid-sleep")
    mem_mod.torch.cuda.empty_cache()
    assert calls == ["emptied", "emptied"]


def test_enforce_eager_default_yields_to_an_explicit_compile_request(ckpts, monkeypatch):
    # enforce_eager=True makes vLLM drop torch.compile whatever compilation_config says: the CPU default (eager)
    # applies only where the caller asked nothing about compilation, as ServerProcess does.
    import vllm

    from rollout_sleep.engine.engine import Engine

    seen = []

    class Stop(Exception):
        pass

    def fake_llm(**kwargs):  # the arguments Engine hands vLLM, no engine started
        seen.append(kwargs.get("enforce_eager"))
        raise Stop

    monkeypatch.setattr(vllm, "LLM", fake_llm)
    cases = [({}, True), ({"enforce_eager": None}, True), ({"enforce_eager": False}, False),
             ({"compilation_config": {"mode": 3}}, False), ({"compilation_config": 3}, False),
             ({"optimization_level": 2}, False), ({"enforce_eager": True, "compilation_config": 3}, True)]
    for kwargs, _ in cases:
        with pytest.raises(Stop):
            Engine(ckpts["untied0"], dtype="float32", **kwargs)
    # on a GPU: vLLM's default (compiled) unless asked
    want = [bool(kw.get("enforce_eager")) if torch.cuda.is_available() else eager for kw, eager in cases]
    assert seen == want, list(zip(cases, seen))
