"""EnginePool: the data-parallel split, the result order, the packed sync and the per-engine verify on the
session's real vLLM engine (in-process members); engine processes (the GPU layout) behind ``slow``."""

from __future__ import annotations

import types

import pytest
import torch

from rollout_sleep.engine.state import EngineStateError
from rollout_sleep.pool.packing import IPCUnavailableError, PackedWeights
from rollout_sleep.pool.pool import EnginePool
from rollout_sleep.pool.process import EngineProcess, EngineProcessError
from rollout_sleep.weights.spec import WeightMismatchError
from rollout_sleep.weights.verify import verify

from helpers import DTYPE, PROMPTS, hf_model


def _key(completions):
    return [(c.prompt_index, c.prompt_token_ids, c.token_ids) for c in completions]


def test_pool_splits_prompts_and_puts_completions_back_in_prompt_order(engine):
    greedy = dict(n=2, max_tokens=6, temperature=1.0, top_k=1)  # n > 1 needs sampling: top-1 is deterministic
    want = engine.generate(PROMPTS[:5], **greedy)
    pool = EnginePool.of([engine, engine, engine])  # three members sharing one engine: shares of 2, 2 and 1
    assert _key(pool.generate(PROMPTS[:5], **greedy)) == _key(want)
    assert len(pool.last_generate_seconds) == 3
    # fewer prompts than engines: the empty shares are not sent
    assert _key(pool.generate(PROMPTS[:1], **greedy)) == _key(want[:2])
    assert len(pool.last_generate_seconds) == 1
    with pytest.raises(ValueError, match="share one checkpoint"):
        EnginePool.of([engine, types.SimpleNamespace(model_path="/elsewhere")])


def test_pool_sync_packs_once_and_verify_checks_the_buffer_and_every_engine(engine, ckpts):
    model = hf_model(ckpts["tied1"])
    pool = EnginePool.of([engine])
    pool.sleep(level=2)
    with pytest.raises(WeightMismatchError, match="unexpected weight 'bogus'"):  # refused before anything
        pool.wake_up(weights={"bogus": torch.zeros(3)})
    assert pool.is_asleep and engine.is_asleep and pool._packed is None
    report = pool.wake_up(weights=model)  # one pack, the engine loads from views of the buffer
    assert not pool.is_asleep and not engine.is_asleep
    assert report.seconds["pack"] > 0 and "load" in report.engines[0].seconds
    assert "engine0_load_s" in report.as_dict() and report.wall_seconds >= report.seconds["pack"]
    ok = verify(pool, model)  # (that the direct route's weights are what vLLM computes with: tests/weights/test_stream.py)
    assert ok.ok and ok.engines[0].ok and ok.compared == ok.engines[0].compared > 0, ok
    # the trainer moved on after the sync: the buffer (and so every engine) no longer holds its weights
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    stale = verify(pool, model)
    assert not stale.ok and "buffer:model.norm.weight" in stale.mismatched
    # the next sync repacks the same buffer in place
    buffer_id = pool._packed.buffer_id
    pool.load_weights(model)
    assert pool._packed.buffer_id == buffer_id and verify(pool, model).ok
    # the trainer's parameters moved into the buffer: a training step writes there, a sync copies nothing
    adopted = pool.adopt(model)
    assert "model.norm.weight" in adopted and "lm_head.weight" not in adopted
    assert model.model.norm.weight.data_ptr() == dict(pool._packed.views())["model.norm.weight"].data_ptr()
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    pool.load_weights(model)
    assert verify(pool, model).ok
    # the trainer replaced a parameter object: the WeightStream the pool keeps is rebuilt, the new one packed
    model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight.detach() + 1.0)
    pool.load_weights(model)
    held = dict(pool._packed.views())["model.norm.weight"]
    assert torch.equal(held, model.model.norm.weight.detach().to(held.dtype)) and verify(engine, model).ok
    # an engine changed behind the pool's back: verify names that engine's tensors
    engine.load_weights(ckpts["tied0"])
    behind = verify(pool, model)
    assert not behind.ok and any(k.startswith("engine0:") for k in behind.mismatched), behind.mismatched


def test_pack_probes_each_run_of_slots_once_and_names_a_non_finite_tensor():
    spec = {"a": ((3,), torch.float32), "i": ((2,), torch.int64), "b": ((5,), torch.float32),
            "c": ((4,), torch.bfloat16)}
    packed = PackedWeights.for_spec(spec)
    assert [names for *_, names in packed._runs] == [["a"], ["b"], ["c"]]  # an integer slot splits a run
    weights = {"a": torch.ones(3), "i": torch.arange(2), "b": torch.ones(5), "c": torch.ones(4, dtype=torch.bfloat16)}
    packed.pack(weights.items())
    assert packed.non_finite() == []
    with pytest.raises(WeightMismatchError, match=r"non-finite values \(NaN or Inf\) in 'b'") as err:
        packed.pack(dict(weights, b=torch.tensor([1.0, float("inf"), 1, 1, 1])).items())
    assert "'a'" not in str(err.value) and "'c'" not in str(err.value)


def test_in_memory_weights_for_engine_processes_need_cuda(engine):
    if torch.cuda.is_available():
        pytest.skip("the refusal is CPU-only")
    packed = PackedWeights.for_spec({"w": ((2,), torch.float32)})
    with pytest.raises(IPCUnavailableError, match="needs a CUDA device.*checkpoint directory"):
        packed.share(0)
    pool = EnginePool.of([engine])
    pool.members = [EngineProcess(engine.model_path, 0, {})]  # a process member (never started: nothing to reach)
    with pytest.raises(IPCUnavailableError):
        pool.verify_weights([("model.norm.weight", torch.ones(128))])
    pool._level = 2
    with pytest.raises(IPCUnavailableError):
        pool.wake_up(weights=[("model.norm.weight", torch.ones(128))], strict=False)
    assert pool.is_asleep  # unchanged
    with pytest.raises(EngineProcessError, match="not running"):  # the path route would go to the process
        pool.wake_up(weights=engine.model_path)


@pytest.mark.slow
def test_engine_processes_generate_in_order_and_load_from_disk_on_cpu(ckpts):
    """Two real engine processes (the GPU layout) on CPU: ~1-2 min here."""
    from rollout_sleep.engine.engine import Engine  # noqa: F401  (the engines run it in their processes)

    greedy = dict(n=2, max_tokens=6, temperature=1.0, top_k=1)  # n > 1 needs sampling: top-1 is deterministic
    with EnginePool(ckpts["tied0"], engines=2, dtype=DTYPE) as pool:
        alone = EnginePool(ckpts["tied0"], engines=1, dtype=DTYPE)
        try:
            want = alone.generate(PROMPTS[:5], **greedy)
        finally:
            alone.close()
        assert _key(pool.generate(PROMPTS[:5], **greedy)) == _key(want)
        pool.sleep(level=2)
        model = hf_model(ckpts["tied1"])
        with pytest.raises(IPCUnavailableError):
            pool.wake_up(weights=model)
        assert pool.is_asleep
        with pytest.raises(EngineStateError):
            pool.generate(PROMPTS[:1], **greedy)
        report = pool.wake_up(weights=ckpts["tied1"])  # the disk route
        assert len(report.engines) == 2
        got = pool.generate(PROMPTS[:4], max_tokens=6, temperature=0.0)
        assert len(got) == 4 and [c.prompt_index for c in got] == [0, 1, 2, 3]
        processes = [m.process for m in pool.members]
    assert all(not p.is_alive() for p in processes)


def test_an_engine_process_that_never_answers_raises_a_named_timeout_and_dumps_its_stacks(capfd):
    """Every exchange with an engine process is bounded: the error names the engine, the command and the
    phase it is stuck in; its stacks reach its stderr; the member refuses further commands; close stops it."""
    import time

    from workers import silent_engine

    member = EngineProcess("unused", 3, {}, timeout_s=2)
    member.start(target=silent_engine.serve)
    process = member.process
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineProcessError, match=r"engine process 3 \(pid \d+\) did not answer 'start' "
                                                     r"within 2 s \(phase: 'stuck in a test'\)"):
            member.wait_ready(2)
        assert time.monotonic() - t0 < 15 and member.broken
        with pytest.raises(EngineProcessError, match="engine process 3 .* is unusable"):
            member.submit("info")
    finally:
        member.close(timeout=5)
    assert not process.is_alive()
    assert "silent_engine.py" in capfd.readouterr().err  # faulthandler's dump of the stuck process
