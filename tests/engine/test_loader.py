"""Weights into the real engine: the load routes, and every bad input (malformed items, wrong names, shapes
or dtypes, non-finite values, an untied head, a truncated checkpoint, a broken stream) refused with an error naming
it, before anything is touched where that can be known; a complete load recovers the engine."""

from __future__ import annotations

import shutil

import pytest
import torch

from rollout_sleep.engine.state import IncompleteWeightsError
from rollout_sleep.weights.spec import WeightMismatchError
from rollout_sleep.weights.verify import verify

from helpers import PROMPTS, ROOT, assert_follows, hf_greedy, hf_model, items_of


def greedy(engine, prompts=PROMPTS[:4], n=6):
    return [c.token_ids for c in engine.generate(prompts, max_tokens=n, min_tokens=n, temperature=0.0)]


def _meta(t):
    return torch.empty_like(t, device="meta")


def test_reload_from_checkpoint_path(engine, ckpts):
    before = greedy(engine, PROMPTS, 16)
    engine.sleep(level=2)
    engine.wake_up(weights=ckpts["tied1"])  # tied model on CPU: streamed, head included (vLLM CPU bug)
    assert_follows(engine, hf_model(ckpts["tied1"]))
    engine.sleep(level=2)
    engine.wake_up(reload_checkpoint=True)
    assert greedy(engine, PROMPTS, 16) == before


@pytest.mark.slow  # duplicate (CI time): test_families[qwen3-untied] wakes an untied engine from a path, asserts
# vLLM's path reload was the route, verifies bitwise and compares log-probs with a fresh engine on those weights
def test_untied_model_path_reload_uses_vllm_path_route(ckpts):
    """vLLM's own path reload (untied model). In a subprocess: one vLLM engine per process."""
    import subprocess
    import sys

    code = f"""
import sys; sys.path.insert(0, {str(ROOT / 'tests')!r})
from helpers import assert_follows, hf_model
from rollout_sleep.engine.engine import Engine
eng = Engine({ckpts["untied0"]!r}, dtype="float32")
eng.sleep(level=2)
eng.wake_up(weights={ckpts["untied1"]!r})
assert_follows(eng, hf_model({ckpts["untied1"]!r}))
print("FOLLOWS")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert "FOLLOWS" in proc.stdout, proc.stderr[-3000:]


def test_bad_weights_leave_the_engine_untouched(engine, ckpts):
    before = greedy(engine, PROMPTS, 16)
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
    assert greedy(engine, PROMPTS, 16) == before


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


@pytest.mark.parametrize("error_after, error", [(1, None), (3, None), (5, None), (3, KeyboardInterrupt())],
                         ids=["after-the-embedding", "inside-qkv", "inside-layer-0", "ctrl-c-inside-qkv"])
def test_a_broken_stream_blocks_generation_until_a_complete_load(engine, tied1, error_after, error):
    """A trainer dying mid-sync (after the embedding, a layer boundary; inside layer 0's fused qkv_proj; later in
    layer 0), or a Ctrl-C on its side: the wake is finished, the error is the one raised (a Ctrl-C kept as itself),
    generation is refused until a complete load, and every later complete load works."""
    model, sd = tied1
    assert list(sd)[1:4] == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    engine.sleep(level=2)
    if isinstance(error, KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            engine.wake_up(weights=items_of(sd, error_after=error_after, error=error))
    else:
        with pytest.raises(IncompleteWeightsError, match="mid-sync") as err:
            engine.wake_up(weights=items_of(sd, error_after=error_after, error=error))
        assert f"after {error_after} tensor" in str(err.value)
        assert isinstance(err.value.__cause__, RuntimeError)
    assert not engine.is_asleep  # the wake was finished whatever happened to the load
    reason = "KeyboardInterrupt" if isinstance(error, KeyboardInterrupt) else "interrupted"
    with pytest.raises(IncompleteWeightsError, match=reason):
        engine.generate(PROMPTS[:1], max_tokens=2)
    # every later complete load works (it failed with AttributeError: ... weight_loader; after a Ctrl-C, vLLM's
    # reload state was left half-built)
    for _ in range(3):
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


def test_malformed_items_meta_tensors_and_repeats_never_break_the_engine(engine, tied1):
    model, sd = tied1
    names = list(sd)
    before = greedy(engine)
    refused_before = {  # known before anything is touched
        "meta tensor in a mapping": {k: _meta(v) if k == names[4] else v for k, v in sd.items()},
        "meta tensor first in a stream": ((k, _meta(v) if k == names[0] else v) for k, v in sd.items()),
        "names only": (k for k in sd),
        "3-tuples in a list": [(k, v, 0) for k, v in sd.items()],
        "(tensor, name) pairs": ((v, k) for k, v in sd.items()),
        "numpy arrays": {k: v.numpy() for k, v in sd.items()},
        "a name twice in a list": [*sd.items(), (names[5], sd[names[5]] * 2)],
    }
    for case, weights in refused_before.items():
        with pytest.raises(WeightMismatchError, match="nothing was loaded") as err:
            engine.load_weights(weights)
        assert any(w in str(err.value) for w in ("meta device", "(name", "given twice")), (case, err.value)
        assert greedy(engine) == before, case  # untouched and usable
    # found mid-stream: the stream is ended cleanly, the engine marked incomplete, a complete load recovers
    for case, weights in {
        "meta tensor mid-stream": ((k, _meta(v) if k == names[4] else v) for k, v in sd.items()),
        "a non-pair mid-stream": iter([next(iter(sd.items())), "oops", *list(sd.items())[1:]]),
    }.items():
        engine.sleep(level=2)
        with pytest.raises(WeightMismatchError, match="incomplete"):
            engine.wake_up(weights=weights)
        with pytest.raises(IncompleteWeightsError):
            engine.generate(PROMPTS[:1], max_tokens=2)
        engine.load_weights(sd)
        assert verify(engine, model).ok, case


def test_a_tied_model_without_its_head_still_gets_the_new_head(engine, tied1):
    """named_parameters() of a tied model has no lm_head.weight: on CPU vLLM's packed head stayed stale,
    silently (generation followed neither model, verify failed, nothing raised)."""
    model, sd = tied1
    assert "lm_head.weight" not in dict(model.named_parameters())
    engine.load_weights(model.named_parameters())
    assert verify(engine, model).ok
    assert greedy(engine) == hf_greedy(model, PROMPTS[:4], 6)


def test_a_truncated_checkpoint_is_refused_before_loading(engine, ckpts, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(ckpts["tied1"], bad)
    f = next(bad.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])
    before = greedy(engine)
    engine.sleep(level=2)
    with pytest.raises(WeightMismatchError, match="truncated checkpoint file"):
        engine.wake_up(weights=bad)
    assert engine.is_asleep  # refused before waking
    engine.wake_up(reload_checkpoint=True)
    assert greedy(engine) == before


def test_a_subset_loads_whole_fused_groups_or_is_refused(engine, tied1, ckpts):
    """strict=False on CPU: ``auto`` took ``load_weights`` (AttributeError inside vLLM, engine incomplete);
    an explicit ``reload`` of v_proj alone rebuilt qkv_proj with q and k wrong, silently."""
    model, sd = tied1
    hybrid = hf_model(ckpts["tied0"])
    layer0 = {k: v for k, v in sd.items() if ".layers.0." in k}
    hybrid.load_state_dict(layer0, strict=False)
    before = greedy(engine)
    for method in (None, "reload"):
        with pytest.raises(WeightMismatchError, match=r"(?s)nothing was loaded.*fused .*qkv_proj"):
            engine.load_weights({"model.layers.0.self_attn.v_proj.weight": layer0["model.layers.0.self_attn.v_proj.weight"]},
                                strict=False, method=method)
        assert greedy(engine) == before
    engine.load_weights(layer0, strict=False)  # whole layer: loaded, the rest kept
    assert verify(engine, hybrid).ok


def test_an_untied_head_is_refused_by_a_tied_engine(engine, ckpts):
    """An untied model's weights into a tied engine: vLLM kept a head matching neither model, silently."""
    untied = dict(hf_model(ckpts["untied1"]).state_dict())
    before = greedy(engine)
    with pytest.raises(WeightMismatchError, match=r"(?s)nothing was loaded.*ties them") as err:
        engine.load_weights(untied)
    assert "nothing was loaded" in str(err.value) and "tie_word_embeddings" in str(err.value)
    assert greedy(engine) == before
    with pytest.raises(WeightMismatchError, match=r"(?s)nothing was loaded.*ties them"):
        engine.load_weights(ckpts["untied1"])  # a checkpoint directory too (CPU loaded its head by accident; GPU skips it)
    for level in (True, 2.0):  # bool is an int, 2.0 == 2: both passed the level check
        with pytest.raises(ValueError, match="unknown sleep level"):
            engine.sleep(level=level)
    assert greedy(engine) == before
    with pytest.raises(WeightMismatchError, match="differs from 'model.embed_tokens.weight'"):
        engine.load_weights(iter(untied.items()))  # a stream: found when the head arrives, nothing half-done after
    with pytest.raises(IncompleteWeightsError):
        engine.generate(PROMPTS[:1], max_tokens=2)
