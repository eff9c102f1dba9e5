"""`vllm serve` driven over HTTP: a real server process on loopback with the tiny model (untied: on CPU a
path reload of a tied model keeps a stale LM head). On CPU vLLM refuses --enable-sleep-mode; the dev
routes still run the cycle (no memory is given back), so the whole flow is exercised for real."""

from __future__ import annotations

import os
import signal

import pytest

from rollout_sleep.engine.state import EngineStateError
from rollout_sleep.serve.remote import RemoteEngine
from rollout_sleep.serve.server import ServerUnreachableError
from rollout_sleep.weights.spec import WeightMismatchError

from helpers import PROMPTS, hf_greedy, hf_model


N = 12
LONG = [[(11 * j) % 240 + 3 for j in range(100)]]  # several full KV blocks: the prefix cache keeps them


def greedy(engine, prompts):
    return [c.token_ids for c in engine.generate(prompts, max_tokens=N, min_tokens=N, temperature=0.0)]


def assert_follows(engine, path, prompts=PROMPTS[:4]):
    """Greedy tokens equal transformers' greedy of ``path``: first 8 tokens of every prompt, and all N
    tokens for all but one prompt (fp32 on both sides; see helpers.assert_follows for the reasons)."""
    got, want = greedy(engine, prompts), hf_greedy(hf_model(path), prompts, N)
    assert all(g[:8] == w[:8] for g, w in zip(got, want)), (got, want)
    assert sum(g == w for g, w in zip(got, want)) >= len(prompts) - 1, (got, want)
    return got


def test_full_cycle_over_http_follows_the_new_checkpoint(server, ckpts):
    engine = RemoteEngine(server.client(), ckpts["untied0"])
    before = assert_follows(engine, ckpts["untied0"])
    long_before = greedy(engine, LONG)  # its prefix is now in the server's prefix cache

    assert engine.sleep(level=2).seconds["sleep"] > 0  # timed
    assert server.client().is_sleeping()
    with pytest.raises(EngineStateError, match="asleep"):
        engine.generate(PROMPTS[:1], max_tokens=2)  # would hang until the server wakes
    with pytest.raises(EngineStateError, match="level 2 needs weights"):
        engine.wake_up()
    report = engine.wake_up(weights=ckpts["untied1"])
    assert list(report.seconds) == ["wake_weights", "load", "wake_kv_cache", "reset"]
    assert not server.client().is_sleeping()

    after = assert_follows(engine, ckpts["untied1"])
    assert after != before
    assert greedy(engine, LONG) == hf_greedy(hf_model(ckpts["untied1"]), LONG, N) != long_before

    engine.load_weights(ckpts["untied0"])  # awake reload + reset, back to the first model
    assert greedy(engine, PROMPTS[:4]) == before


def test_level1_wakes_without_reload(server, ckpts):
    engine = RemoteEngine(server.client(), ckpts["untied0"])
    before = greedy(engine, PROMPTS[:2])
    engine.sleep(level=1)
    assert list(engine.wake_up().seconds) == ["wake_weights", "wake_kv_cache", "reset"]
    assert greedy(engine, PROMPTS[:2]) == before


def test_bad_reload_paths_are_refused_before_the_server_sees_them(server, ckpts, tmp_path):
    engine = RemoteEngine(server.client(), ckpts["untied0"])
    before = greedy(engine, PROMPTS[:2])
    engine.sleep(level=2)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        engine.wake_up(weights=tmp_path / "missing")
    with pytest.raises(WeightMismatchError):  # the tied checkpoint has no lm_head.weight
        engine.wake_up(weights=ckpts["tied1"])
    assert engine.is_asleep and server.client().is_sleeping()  # untouched: still asleep, still alive
    engine.wake_up(reload_checkpoint=True)
    assert greedy(engine, PROMPTS[:2]) == before


def test_server_killed_mid_run_is_reported_with_its_exit(server, ckpts):
    """It kills the session's shared server (the next test that needs one starts another)."""
    engine = RemoteEngine(server.client(timeout=30, retries=1), ckpts["untied0"])
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(10)
    with pytest.raises(ServerUnreachableError, match="exited with code -9"):
        engine.generate(PROMPTS[:1], max_tokens=2)


def test_remote_wake_keeps_the_reload_error_when_finishing_the_wake_fails(ckpts):
    """Pure logic (a stand-in client): the reload's error is raised, the failed finish is attached to it."""
    from rollout_sleep.serve.server import ServerError

    class Client:
        base_url, timeout = "http://stand-in", 5.0

        def models(self):
            return ["m"]

        def is_sleeping(self):
            return False

        def server_info(self):
            return {"model_config": {"dtype": "torch.float32"}, "device_config": {"device": "cpu"}}

        def sleep(self, level):
            return {}

        def wake_up(self, tags=None):
            if tags == ["kv_cache"]:
                raise ServerError("KV cache wake failed")
            return {}

        def reload_weights(self, path=None):
            raise ServerError("reload failed: bad file")

    engine = RemoteEngine(Client(), ckpts["untied0"])
    engine.sleep(level=2)
    with pytest.raises(ServerError, match="reload failed") as err:
        engine.wake_up(weights=ckpts["untied1"])
    assert any("KV cache wake failed" in note for note in getattr(err.value, "__notes__", []))
