"""The managed server process: consent before binding beyond loopback, clear errors for unreachable servers,
enforce_eager passed once, a sleeping server reported at once, and a server that dies with its owner."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rollout_sleep.engine.state import EngineStateError
from rollout_sleep.serve.procgroup import group_alive
from rollout_sleep.serve.remote import RemoteEngine
from rollout_sleep.serve.server import ServerClient, ServerProcess, ServerUnreachableError, free_port


OWNER = """
import json, sys, time
from rollout_sleep.serve.server import ServerProcess
srv = ServerProcess(sys.argv[1], dtype="float32").start()
print("READY " + json.dumps({"url": srv.url, "pid": srv.pid}), flush=True)
time.sleep(3600)
"""


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


def test_addresses_without_consent_and_unreachable_servers_give_clear_errors(ckpts):
    with pytest.raises(ValueError, match="refusing to bind"):
        ServerProcess(ckpts["untied0"], host="0.0.0.0")
    with pytest.raises(ValueError, match="needs an api_key"):
        ServerProcess(ckpts["untied0"], host="0.0.0.0", allow_remote=True)
    with pytest.raises(ValueError, match="no sleep mode"):
        ServerProcess(ckpts["untied0"], sleep_mode=True)
    client = ServerClient(f"http://127.0.0.1:{free_port()}", timeout=5, retries=1)
    t0 = time.perf_counter()
    with pytest.raises(ServerUnreachableError, match="no answer.*is a vLLM server running there"):
        client.is_sleeping()
    assert time.perf_counter() - t0 < 10


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
