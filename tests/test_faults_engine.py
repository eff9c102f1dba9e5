"""Bad weights and broken streams against the real engine (issue #16, engine half): each is refused with an
error naming the problem, before anything is touched where that can be known, and a complete load recovers."""

from __future__ import annotations

import pytest
import torch

from conftest import PROMPTS, assert_follows, hf_model
from rollout_sleep.engine.state import IncompleteWeightsError
from rollout_sleep.weights.spec import WeightMismatchError


def greedy(engine, prompts=PROMPTS[:4], n=6):
    return [c.token_ids for c in engine.generate(prompts, max_tokens=n, min_tokens=n, temperature=0.0)]


def items_of(sd, skip=(), stop_after=None, error_after=None):
    """A generator over ``sd``'s items: leaving ``skip`` out, ending after ``stop_after`` items, or raising
    after ``error_after`` items (a trainer dying mid-sync)."""
    for i, (name, tensor) in enumerate(sd.items()):
        if i == error_after:
            raise RuntimeError("trainer died mid-sync")
        if i == stop_after:
            return
        if name not in skip:
            yield name, tensor


@pytest.fixture(scope="module")
def tied1(ckpts):
    model = hf_model(ckpts["tied1"])
    return model, dict(model.state_dict())


def test_incomplete_empty_or_consumed_generators_are_refused(engine, tied1):
    model, sd = tied1
    before = greedy(engine)
    n = len(sd)

    engine.sleep(level=2)
    with pytest.raises(WeightMismatchError) as err:
        engine.wake_up(weights=items_of(sd, stop_after=n // 2))  # half the tensors, default strict=True
    msg = str(err.value)
    assert "missing weight 'model.norm.weight'" in msg and "untouched" not in msg and "incomplete" in msg
    assert not engine.is_asleep
    with pytest.raises(IncompleteWeightsError, match="missing weight"):
        engine.generate(PROMPTS[:1], max_tokens=2)  # neither the old model nor the new one: refused

    engine.load_weights(sd)
    with pytest.raises(WeightMismatchError, match="missing weight 'model.layers.1.mlp.up_proj.weight'"):
        engine.load_weights(items_of(sd, skip={"model.layers.1.mlp.up_proj.weight"}))  # one tensor missing
    with pytest.raises(IncompleteWeightsError):
        engine.generate(PROMPTS[:1], max_tokens=2)

    engine.load_weights(sd)
    assert greedy(engine) != before
    consumed = iter(sd.items())
    list(consumed)
    for empty in ((x for x in ()), consumed):  # nothing to load: refused before anything is touched
        with pytest.raises(WeightMismatchError, match="empty"):
            engine.load_weights(empty)
        assert greedy(engine) != before  # still usable, still the new model
    engine.sleep(level=2)
    with pytest.raises(WeightMismatchError, match="empty"):
        engine.wake_up(weights=(x for x in ()))
    assert engine.is_asleep  # refused before waking
    engine.wake_up(weights=sd)
    assert_follows(engine, model)


@pytest.mark.parametrize("break_after", [1, 3])  # after the embedding (a layer boundary) / inside qkv_proj
def test_stream_breaking_mid_layer_or_at_a_boundary_recovers(engine, tied1, break_after):
    model, sd = tied1
    assert list(sd)[1:4] == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    engine.sleep(level=2)
    with pytest.raises(IncompleteWeightsError, match="mid-sync") as err:
        engine.wake_up(weights=items_of(sd, error_after=break_after))
    assert f"after {break_after} tensor" in str(err.value)
    assert isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(IncompleteWeightsError, match="interrupted"):
        engine.generate(PROMPTS[:1], max_tokens=2)
    for _ in range(3):  # every later complete load works (it failed with AttributeError: ... weight_loader)
        engine.load_weights(sd)
    assert_follows(engine, model)
    engine.sleep(level=2)
    engine.wake_up(weights=items_of(sd))
    assert_follows(engine, model)


def test_wrong_dtype_and_non_finite_weights_are_refused_with_names(engine, tied1):
    model, sd = tied1
    before = greedy(engine)

    half = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    for weights in (half, items_of(half)):
        with pytest.raises(WeightMismatchError, match=r"dtype mismatch for 'model.embed_tokens.weight'.*"
                                                      r"bfloat16.*float32(.|\n)*dtype=engine.dtype"):
            engine.load_weights(weights)
        assert greedy(engine) == before  # refused at the first tensor: nothing loaded

    bad = dict(sd)
    bad["model.layers.1.mlp.down_proj.weight"] = torch.full_like(sd["model.layers.1.mlp.down_proj.weight"], float("nan"))
    bad["model.norm.weight"] = sd["model.norm.weight"].clone()
    bad["model.norm.weight"][3] = float("inf")
    with pytest.raises(WeightMismatchError) as err:
        engine.load_weights(bad)  # a mapping: checked before anything is touched
    msg = str(err.value)
    assert "non-finite" in msg and "'model.layers.1.mlp.down_proj.weight'" in msg and "'model.norm.weight'" in msg
    assert "untouched" in msg and greedy(engine) == before

    engine.sleep(level=2)
    with pytest.raises(WeightMismatchError, match=r"non-finite(.|\n)*'model.layers.1.mlp.down_proj.weight'") as err:
        engine.wake_up(weights=(item for item in bad.items()))  # a stream: found as it passes
    assert "incomplete" in str(err.value)
    with pytest.raises(IncompleteWeightsError):
        engine.generate(PROMPTS[:1], max_tokens=2)  # no NaN output, no NaN KV
    engine.load_weights(sd)
    for _ in range(2):  # right at once, and it stays right
        assert_follows(engine, model)


def test_unknown_method_is_refused_before_anything_is_touched(engine, tied1):
    _, sd = tied1
    before = greedy(engine)
    with pytest.raises(ValueError, match="unknown load method 'bogus'"):
        engine.load_weights(sd, method="bogus")
    assert greedy(engine) == before  # not marked interrupted: nothing was loaded
    engine.sleep(level=2)
    with pytest.raises(ValueError, match="unknown load method 'bogus'"):
        engine.wake_up(weights=sd, method="bogus")
    assert engine.is_asleep  # refused before waking


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


def test_keeping_the_trainer_cache_also_blocks_torch_accelerator_empty_cache(monkeypatch):
    """Pure logic (no GPU here): vLLM 0.32 empties the cache at wake through ``torch.accelerator``."""
    import rollout_sleep.engine.memory as mem_mod

    calls = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("cuda"))
    monkeypatch.setattr(torch.accelerator, "empty_cache", lambda: calls.append("accelerator"))
    with mem_mod.cache_kept():
        torch.cuda.empty_cache()
        torch.accelerator.empty_cache()
    assert calls == []
    torch.accelerator.empty_cache()
    assert calls == ["accelerator"]


def test_a_wrong_dtype_mid_stream_names_the_tensor_and_the_fix(engine, tied1):
    model, sd = tied1
    mixed = dict(sd)
    mixed["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"].to(torch.float16)
    with pytest.raises(WeightMismatchError, match=r"incomplete(.|\n)*'model.layers.1.mlp.up_proj.weight'.*"
                                                  r"float16(.|\n)*dtype=engine.dtype"):
        engine.load_weights(item for item in mixed.items())
    with pytest.raises(IncompleteWeightsError, match="up_proj"):
        engine.generate(PROMPTS[:1], max_tokens=2)
    engine.load_weights(item for item in sd.items())
    assert_follows(engine, model)


def test_keep_trainer_cache_reports_what_happened(monkeypatch):
    """Pure logic (no GPU here): the report says whether PyTorch's cached free memory survived the call,
    whichever way vLLM released it (one it does not go through ``empty_cache`` for is caught too)."""
    import rollout_sleep.engine.memory as mem_mod
    from rollout_sleep.engine.phases import CycleReport

    mem = {"reserved": 10 << 30, "allocated": 6 << 30}
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: mem["reserved"])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: mem["allocated"])
    monkeypatch.setattr(torch.accelerator, "empty_cache", lambda: mem.update(reserved=mem["allocated"]))
    kept = CycleReport("sleep", memory_kind="cuda_free")
    with mem_mod.keeping_cache(kept, True):
        torch.accelerator.empty_cache()  # vLLM 0.32's wake: blocked
    assert kept.trainer_cache_kept is True and mem["reserved"] == 10 << 30
    lost = CycleReport("wake", memory_kind="cuda_free")
    with mem_mod.keeping_cache(lost, True):
        mem["reserved"] = mem["allocated"]  # released some other way
    assert lost.trainer_cache_kept is False and lost.as_dict()["trainer_cache_kept"] is False
    off = CycleReport("sleep", memory_kind="cuda_free")
    with mem_mod.keeping_cache(off, False):
        pass
    assert off.trainer_cache_kept is None and "trainer_cache_kept" not in off.as_dict()
