"""The rollout manager's loop and its fault handling, on the real engine."""

from __future__ import annotations

import pytest
import torch

from rollout_sleep.engine.contract import UnsupportedOperation
from rollout_sleep.engine.state import EngineStateError
from rollout_sleep.run.manager import RolloutManager

from helpers import PROMPTS, assert_follows, hf_greedy, hf_model


def test_loop_metrics(engine, ckpts):
    model = hf_model(ckpts["tied1"])
    mgr = RolloutManager(engine, model, verify_every=1)
    mgr.sync()  # awake engine: an in-place update, verified
    comps = mgr.rollout(PROMPTS, n=2, max_tokens=4, min_tokens=4, temperature=1.0)
    assert len(comps) == 16
    with mgr.training():
        assert engine.is_asleep
    mgr.sync()
    m = mgr.end_step()
    for key in ("generate_s", "sleep_s", "train_s", "wake_weights_s", "load_s", "wake_kv_cache_s", "reset_s",
                "verify_s", "tokens_per_s", "cycle_overhead_s"):
        assert key in m, key
    assert m["generated_tokens"] == 64 and mgr.end_step()["cycle_overhead_s"] == 0.0


@pytest.mark.parametrize("error", [RuntimeError("loss is nan"), KeyboardInterrupt()])
def test_error_in_training_leaves_a_resumable_loop(engine, ckpts, error):
    model = hf_model(ckpts["tied1"])
    mgr = RolloutManager(engine, model, verify_every=1)
    with pytest.raises(type(error)):
        with mgr.training():
            raise error
    assert engine.is_asleep  # still asleep: nothing half-done
    with pytest.raises(EngineStateError):
        engine.generate(PROMPTS, max_tokens=1)
    mgr.rollout(PROMPTS, max_tokens=2)  # wakes with the trainer's weights (verified), loop goes on
    assert_follows(engine, model)


def test_out_of_memory_in_training_names_the_memory(engine, ckpts):
    mgr = RolloutManager(engine, hf_model(ckpts["tied1"]))
    with pytest.raises(torch.cuda.OutOfMemoryError, match="while the engine slept at level 2"):
        with mgr.training():
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    mgr.sync()


def test_bad_sleep_level():
    with pytest.raises(ValueError, match="sleep_level"):
        RolloutManager(None, torch.nn.Linear(1, 1), sleep_level=3)


def test_nan_weights_are_blamed_on_training_not_the_sync(engine, ckpts):
    from rollout_sleep.run.nonfinite import NonFiniteError

    model = hf_model(ckpts["tied1"])
    mgr = RolloutManager(engine, model, verify_every=1)
    name, param = next(iter(model.named_parameters()))
    keep = param.detach().clone()
    with torch.no_grad():
        param[0, 0] = float("nan")  # what an unguarded NaN optimizer step leaves
    try:
        with pytest.raises(NonFiniteError, match=rf"the trainer's weights hold NaN/inf in 1 parameter\(s\) \({name}\)"
                                                 r".*came from training .*not from the sync"):
            mgr.sync()
    finally:
        with torch.no_grad():
            param.copy_(keep)
    mgr.sync()  # finite again: verified, the engine follows the trainer
    assert_follows(engine, model)


def test_each_phase_is_watched(engine, ckpts):
    from contextlib import contextmanager

    class Recording:  # the watchdog's interface; the real one (timeouts, exit) is tested in test_watchdog.py
        phases: list[str] = []

        @contextmanager
        def phase(self, name, waiting_for):
            assert waiting_for
            self.phases.append(name)
            yield

    watchdog = Recording()
    mgr = RolloutManager(engine, hf_model(ckpts["tied1"]), verify_every=1, watchdog=watchdog)
    mgr.rollout(PROMPTS, n=1, max_tokens=2)
    with mgr.training():
        pass
    mgr.sync()
    assert watchdog.phases == ["generate", "sleep", "train", "wake", "verify"]


def test_over_a_remote_engine_the_cycle_runs_through_a_weights_folder(server, ckpts, tmp_path):
    """The manager takes any RolloutEngine, but over a ``RemoteEngine`` ``training()`` raised ``KeyError: 'before'``
    (a server's sleep report has no memory figures) with the server asleep, and ``sync()`` could only be refused
    (in-memory weights). Now what a server cannot take is refused before anything is touched, and with
    ``weights_dir`` each sync saves the trainer's weights there for the server to reload."""
    from rollout_sleep.serve.remote import RemoteEngine

    engine = RemoteEngine(server.client(timeout=180), ckpts["untied0"])
    model = hf_model(ckpts["untied0"])
    for kwargs, match in [({}, r"RemoteEngine\.wake_up\(weights=<the trainer's, in memory>\): .* Instead: "
                                r"RolloutManager\(engine, model, weights_dir="),
                          ({"weights_dir": tmp_path, "verify_every": 1}, r"RemoteEngine\.verify_weights .* Instead: ")]:
        with pytest.raises(UnsupportedOperation, match=match):
            RolloutManager(engine, model, **kwargs)
    assert engine.state == "awake"
    prompts, n = PROMPTS[:3], 6
    mgr = RolloutManager(engine, model, weights_dir=tmp_path / "weights")
    try:
        first = mgr.rollout(prompts, max_tokens=n, min_tokens=n, temperature=0.0)
        assert [c.token_ids for c in first] == hf_greedy(model, prompts, n)
        with mgr.training():
            assert engine.state == "asleep(level=2)"
            model.load_state_dict(hf_model(ckpts["untied1"]).state_dict())  # the trainer's step
        mgr.sync()
        assert engine.state == "awake"
        after = mgr.rollout(prompts, max_tokens=n, min_tokens=n, temperature=0.0)
        assert [c.token_ids for c in after] == hf_greedy(model, prompts, n) != [c.token_ids for c in first]
        metrics = mgr.end_step()
        assert metrics["save_s"] > 0 and metrics["load_s"] >= metrics["save_s"] and "sleep_s" in metrics
        assert not any(k.startswith("none_") for k in metrics), metrics
        with torch.no_grad():
            model.model.norm.weight.add_(1.0)  # an awake sync: an update in place through the folder
        mgr.sync()
        assert [c.token_ids for c in mgr.rollout(prompts, max_tokens=n, min_tokens=n, temperature=0.0)] == \
            hf_greedy(model, prompts, n)
    finally:
        engine.wake_up(reload_checkpoint=True) if engine.is_asleep else engine.load_weights(ckpts["untied0"])
