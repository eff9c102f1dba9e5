"""The managed server's guards (issue #16, server half): no bind beyond loopback through ``extra_args``, no
server outliving its owner (kill -9 included), and a client that meets a server asleep says so at once.
One real ``vllm serve`` (CPU) serves every case that needs one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rollout_sleep.engine import EngineStateError
from rollout_sleep.procgroup import group_alive
from rollout_sleep.remote import RemoteEngine
from rollout_sleep.server import ServerClient, ServerProcess

OWNER = """
import json, sys, time
from rollout_sleep.server import ServerProcess
srv = ServerProcess(sys.argv[1], dtype="float32").start()
print("READY " + json.dumps({"url": srv.url, "pid": srv.pid}), flush=True)
time.sleep(3600)
"""


@pytest.mark.parametrize("extra", [["--host", "0.0.0.0"], ["--host=0.0.0.0"], ["--api-key", "k"], ["--port", "80"]])
def test_extra_args_cannot_bypass_the_loopback_guard(ckpts, extra):
    with pytest.raises(ValueError, match="not allowed in extra_args"):
        ServerProcess(ckpts["untied0"], extra_args=extra)


def test_a_config_file_cannot_bypass_the_loopback_guard(ckpts, tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("host: 0.0.0.0\nmax_num_seqs: 8\n")
    with pytest.raises(ValueError, match="sets host"):
        ServerProcess(ckpts["untied0"], extra_args=["--config", str(cfg)])
    cfg.write_text("max_num_seqs: 8\n")
    ServerProcess(ckpts["untied0"], extra_args=[f"--config={cfg}"])  # harmless settings pass


def test_enforce_eager_reaches_vllm_serve_once_and_never_against_the_caller(ckpts):
    # CPU (no sleep mode): eager by default, unless extra_args say anything about eager mode or compilation,
    # in any spelling vLLM's parser reads (underscores, a prefix, -cc / -O / --optimization-level, dotted keys).
    def eager_flags(**kw):
        cmd = ServerProcess(ckpts["untied0"], **kw).command
        return [a for a in cmd if "enforce" in a.replace("_", "-")]

    assert eager_flags() == ["--enforce-eager"]
    assert eager_flags(enforce_eager=False) == []
    for extra in (["--enforce-eager"], ["--enforce_eager"], ["--enforce"]):
        assert len(eager_flags(extra_args=extra)) == 1, extra
        assert len(eager_flags(enforce_eager=True, extra_args=extra)) == 1, extra
    assert eager_flags(extra_args=["--no-enforce-eager"]) == ["--no-enforce-eager"]
    for extra in (["-O3"], ["-O", "2"], ["--optimization-level", "2"], ["--compilation-config", '{"mode": 3}'],
                  ["--compilation_config={}"], ["-cc.mode=3"], ["--compilation-config.mode=3"]):
        assert eager_flags(extra_args=extra) == [], extra
    for kw in (dict(enforce_eager=False, extra_args=["--enforce-eager"]),
               dict(enforce_eager=True, extra_args=["--no-enforce-eager"])):
        with pytest.raises(ValueError, match="enforce_eager"):
            ServerProcess(ckpts["untied0"], **kw)


def _read_ready(owner: subprocess.Popen, timeout: float = 400.0) -> dict:
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = owner.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("READY "):
            return json.loads(line[len("READY "):])
    raise AssertionError("the owner did not start its server:\n" + "".join(lines[-40:]))


def test_sleeping_server_is_reported_at_once_and_the_server_dies_with_its_owner(ckpts):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, ckpts["untied0"]], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    pgid = None
    try:
        info = _read_ready(owner)
        pgid = info["pid"]
        client = ServerClient(info["url"], timeout=20, retries=0)
        engine = RemoteEngine(client, ckpts["untied0"])
        assert engine.generate([[5, 6, 7]], max_tokens=2)
        client.sleep(1)  # someone else puts it to sleep
        t0 = time.perf_counter()
        failures = []
        try:
            engine.generate([[5, 6, 7]], max_tokens=2)
            failures.append("generate on a sleeping server returned")
        except EngineStateError as err:
            if "asleep, put to sleep by another client" not in str(err):
                failures.append(f"unclear error: {err}")
        except Exception as err:  # noqa: BLE001 - recorded, the kill check below still runs
            failures.append(f"{type(err).__name__}: {err}")
        seconds = time.perf_counter() - t0
        if seconds >= 5:
            failures.append(f"the sleeping server was reported after {seconds:.0f} s, not at once")
        client.wake_up()
        assert engine.generate([[5, 6, 7]], max_tokens=2)

        os.kill(owner.pid, signal.SIGKILL)  # no atexit, no stop(): only the watchdog is left to act
        owner.wait(10)
        deadline = time.monotonic() + 60
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.5)
        if group_alive(pgid) or client.health(timeout=2):
            failures.append("server, engine core or worker outlived their owner (kill -9)")
        assert not failures, failures
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait(10)
        if pgid is not None and group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)


def test_remote_wake_keeps_the_reload_error_when_finishing_the_wake_fails(ckpts):
    """Pure logic (a stand-in client): the reload's error is raised, the failed finish is attached to it."""
    from rollout_sleep.server import ServerError

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
