"""The engine's sleep → wake → reload → reset cycle against the real vLLM engine."""

from __future__ import annotations

import pytest
import torch

from rollout_sleep.engine.state import EngineStateError, IncompleteWeightsError
from rollout_sleep.weights.stream import WeightStream

from helpers import PROMPTS, assert_follows, hf_model, items_of


N = 16  # tokens compared per prompt


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


def test_level0_releases_the_kv_cache_through_vllms_own_call_where_it_has_one(engine, monkeypatch):
    """Level 0 (CUDA only: one copy, LoRA with one base) releases the KV cache and leaves the weights. vLLM 0.32+
    has a call for that (a pause, then a discard of its KV-cache memory; 0.34's extensible KV cache lies outside
    the sleep allocator, where an unmap of the tag would free nothing); the engine takes it where it exists, else
    (0.26) unmaps the tag on each worker. Run on the real engine with sleep mode claimed: vLLM's CPU build cannot
    discard, so that one call is recorded, not run; the pause and the wake are vLLM's own."""
    from rollout_sleep.engine.memory import map_kv_cache, release_kv_cache

    before = greedy(engine)
    llm, calls = engine.llm, []
    monkeypatch.setattr(engine, "sleep_mode", True)
    for name in ("sleep", "wake_up"):
        real = getattr(llm, name)
        monkeypatch.setattr(llm, name, lambda *a, _real=real, _name=name, **kw: (calls.append((_name, kw)),
                                                                                 _real(*a, **kw))[1])
    monkeypatch.setattr(llm, "release_kv_cache_memory", lambda: calls.append(("release_kv_cache_memory", {})))
    engine.sleep(level=0)
    assert calls == [("sleep", {"level": 0}), ("release_kv_cache_memory", {})]
    engine.wake_up()
    assert calls[2:] == [("wake_up", {"tags": ["kv_cache"]})] and engine.state == "awake"
    assert greedy(engine) == before  # the scheduler resumed: vLLM generates again

    # vLLM 0.26: no such call; each worker unmaps the KV cache's allocations, then maps them back
    monkeypatch.delattr(type(llm), "release_kv_cache_memory")
    monkeypatch.delattr(llm, "release_kv_cache_memory")
    calls.clear()
    real_rpc = llm.collective_rpc
    monkeypatch.setattr(llm, "collective_rpc", lambda fn, *a, **kw: calls.append(fn) if fn in (
        release_kv_cache, map_kv_cache) else real_rpc(fn, *a, **kw))
    engine.sleep(level=0)
    engine.wake_up()
    assert calls == [release_kv_cache, map_kv_cache] and greedy(engine) == before


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


def test_a_failing_wake_does_not_hide_the_load_error(engine, tied1, monkeypatch):
    _, sd = tied1
    real_wake = engine.llm.wake_up

    def wake_up(tags=None):
        if tags == ["kv_cache"]:
            raise RuntimeError("KV cache could not be mapped")
        return real_wake(tags=tags)

    engine.sleep(level=2)
    monkeypatch.setattr(engine.llm, "wake_up", wake_up)
    with pytest.raises(IncompleteWeightsError, match="mid-sync") as err:
        engine.wake_up(weights=items_of(sd, error_after=5))
    assert any("KV cache could not be mapped" in note for note in getattr(err.value, "__notes__", []))
    monkeypatch.undo()
    engine.wake_up(weights=sd) if engine.is_asleep else engine.load_weights(sd)
    greedy(engine)
