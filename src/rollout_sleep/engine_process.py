"""One :class:`~rollout_sleep.engine.Engine` in its own process, driven over a pipe (an :class:`EnginePool` member).

Each engine process runs vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): its scheduler, model runner
and output handling on a core of its own, its own sleep-mode (CuMem) allocator and KV cache. Commands
(:class:`Commands`: generate, sleep, wake, load, verify, info) are the same code whether the engine runs in
a process (:class:`EngineProcess`) or in this one (:class:`LocalMember`, used on CPU tests and for one
engine). In-memory weights arrive as a :class:`~rollout_sleep.packing.Shared` packed buffer (a CUDA IPC
handle, mapped once and kept) and are loaded from views of it with the engine's checked routes.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import time
import traceback
from typing import Any

from .packing import Shared, open_handle, slot_views

logger = logging.getLogger(__name__)

RESULT_TIMEOUT_S = 1800.0  # no single command (generate, wake, verify) should take this long


class EngineProcessError(RuntimeError):
    """An engine process failed to start, died, or did not answer in time."""


class Commands:
    """What an engine member does, on the engine it holds (in whichever process that is)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self.mapped: dict[int, Any] = {}  # buffer id → the packed buffer, mapped once (CUDA IPC) and kept
        self.last_generate_s = 0.0

    def _weights(self, weights: Any) -> Any:
        if not isinstance(weights, Shared):
            return weights  # a checkpoint path (or in-process weights)
        if weights.local is not None or weights.handle is not None:  # a new buffer replaces the old one
            self.mapped = {weights.buffer_id: weights.local if weights.local is not None else
                           open_handle(weights.handle)}
        elif weights.buffer_id not in self.mapped:
            raise EngineProcessError(f"packed buffer {weights.buffer_id} was never sent to this engine")
        return slot_views(self.mapped[weights.buffer_id], weights.slots)

    def _load(self, fn, weights: Any, **kw: Any) -> Any:
        if not isinstance(weights, Shared):
            return fn(self._weights(weights), **kw)
        check, self.engine.check_finite = self.engine.check_finite, False  # the packer probed NaN/Inf once for all
        try:
            return fn(self._weights(weights), **kw)
        finally:
            self.engine.check_finite = check

    def generate(self, prompts: list, sampling: Any, kwargs: dict) -> tuple[float, list]:
        """(this engine's own seconds, its completions)."""
        t0 = time.perf_counter()
        out = self.engine.generate(prompts, sampling, **kwargs)
        self.last_generate_s = time.perf_counter() - t0
        return self.last_generate_s, out

    def sleep(self, level: int):
        return self.engine.sleep(level=level)

    def wake(self, weights: Any, reload_checkpoint: bool, method: str | None, strict: bool):
        if weights is None:
            return self.engine.wake_up(reload_checkpoint=reload_checkpoint, method=method, strict=strict)
        return self._load(self.engine.wake_up, weights, method=method, strict=strict)

    def load(self, weights: Any, method: str | None, strict: bool):
        return self._load(self.engine.load_weights, weights, method=method, strict=strict)

    def verify(self, weights: Any):
        from .verification import verify

        return verify(self.engine, self._weights(weights))

    def drop_buffer(self) -> None:
        self.mapped.clear()

    def info(self) -> dict:
        e = self.engine
        return {"pid": os.getpid(), "state": e.state, "level": e.sleep_level, "dtype": e.dtype,
                "startup_s": e.startup_seconds, "generate_s": self.last_generate_s, "model_path": e.model_path,
                "tied": e.tied, "spec": e.spec, "sleep_mode": e.sleep_mode, "on_cuda": e.on_cuda,
                "async_scheduling": getattr(getattr(getattr(getattr(e.llm, "llm_engine", None), "vllm_config", None),
                                                    "scheduler_config", None), "async_scheduling", None)}


class LocalMember:
    """A pool member whose engine lives in this process: commands run at :meth:`submit`."""

    def __init__(self, engine: Any, index: int):
        self.commands, self.index = Commands(engine), index
        self._result: tuple[bool, Any] | None = None

    def submit(self, cmd: str, *args: Any) -> None:
        try:
            self._result = (True, getattr(self.commands, cmd)(*args))
        except BaseException as err:
            self._result = (False, err)

    def result(self, timeout: float | None = None) -> Any:
        ok, value = self._result
        self._result = None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        self.commands.engine.close()


# set by a launcher (torchrun / accelerate) for the trainer's rank; the engine process is a world of one
LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def _serve(conn: Any, model: str, kwargs: dict, env: dict) -> None:
    """The engine process: build the engine, then answer commands until ``close``."""
    for name in LAUNCHER_ENV:
        os.environ.pop(name, None)
    os.environ.update(env)  # before CUDA starts: the trainer's GPU is this process's only one
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import torch.multiprocessing  # noqa: F401  (CUDA tensors arrive as IPC handles)

    from .engine import Engine

    try:
        commands = Commands(Engine(model, **kwargs))
        conn.send((True, commands.info()))
    except BaseException as err:
        conn.send((False, _portable(err)))
        return
    while True:
        try:
            cmd, args = conn.recv()
        except (EOFError, OSError):  # the pool's process is gone
            break
        if cmd == "close":
            commands.engine.close()
            conn.send((True, None))
            break
        try:
            conn.send((True, getattr(commands, cmd)(*args)))
        except BaseException as err:
            conn.send((False, _portable(err)))


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else an :class:`EngineProcessError` carrying its text; the
    traceback of the engine process is attached as a note either way."""
    note = "in the engine process:\n" + "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        out = pickle.loads(pickle.dumps(err))
        if type(out) is not type(err) or str(out) != str(err):
            raise TypeError
    except Exception:
        out = EngineProcessError(f"{type(err).__name__}: {err}")
    from .state import add_note

    add_note(out, note[-6000:])
    return out


def _device_env() -> dict:
    """``CUDA_VISIBLE_DEVICES`` naming this process's current GPU alone (an engine process uses the GPU of
    the trainer rank that started it); empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return {}
    index = torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return {"CUDA_VISIBLE_DEVICES": ids[index] if index < len(ids) else str(index)}


class EngineProcess:
    """A pool member whose engine lives in a spawned process (its own CUDA context and sleep allocator).

    ``start`` spawns it; ``wait_ready`` waits for the engine to be built. Commands are submitted to all
    members first and their results collected afterwards, so the engines work at the same time.
    """

    def __init__(self, model: str, index: int, engine_kwargs: dict):
        self.model, self.index, self.engine_kwargs = model, index, engine_kwargs
        self.process = None
        self.info: dict = {}

    def start(self) -> None:
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, self.model, self.engine_kwargs, _device_env()),
                                   name=f"rollout-engine-{self.index}", daemon=False)
        self.process.start()
        child.close()
        atexit.register(self.close)

    def wait_ready(self, timeout: float) -> dict:
        self.info = self.result(timeout, what="start")
        logger.info("engine process %d (pid %s) ready in %.1f s", self.index, self.info["pid"],
                    self.info["startup_s"])
        return self.info

    def submit(self, cmd: str, *args: Any) -> None:
        if self.process is None or not self.process.is_alive():
            raise EngineProcessError(f"engine process {self.index} is not running (exit code "
                                     f"{getattr(self.process, 'exitcode', None)}); build a new pool")
        self._cmd = cmd
        self._conn.send((cmd, args))

    def result(self, timeout: float | None = None, what: str | None = None) -> Any:
        what = what or getattr(self, "_cmd", "command")
        deadline = time.monotonic() + (RESULT_TIMEOUT_S if timeout is None else timeout)
        while not self._conn.poll(1.0):
            if not self.process.is_alive():
                raise EngineProcessError(f"engine process {self.index} (pid {self.process.pid}) died during "
                                         f"{what!r} (exit code {self.process.exitcode}); see its log above")
            if time.monotonic() > deadline:
                raise EngineProcessError(f"engine process {self.index} (pid {self.process.pid}) did not answer "
                                         f"{what!r} within {timeout or RESULT_TIMEOUT_S:.0f} s")
        ok, value = self._conn.recv()
        if not ok:
            from .state import add_note

            add_note(value, f"raised by engine process {self.index} (pid {self.process.pid}) during {what!r}")
            raise value
        return value

    def request_close(self) -> None:
        """Ask the engine to shut down (without waiting: :meth:`close` waits)."""
        try:
            if self.process is not None and self.process.is_alive() and not getattr(self, "_closing", False):
                self._conn.send(("close", ()))
                self._closing = True
        except (OSError, EOFError, BrokenPipeError):
            pass

    def close(self, timeout: float = 30.0) -> None:
        """Shut the engine down; stop the process if it has not exited within ``timeout`` seconds."""
        self.request_close()
        proc, self.process = self.process, None
        if proc is None:
            return
        atexit.unregister(self.close)
        try:
            if getattr(self, "_closing", False) and self._conn.poll(timeout):
                self._conn.recv()
        except (OSError, EOFError, BrokenPipeError):
            pass
        proc.join(timeout)
        if proc.is_alive():
            logger.warning("engine process %d (pid %s) did not exit within %.0f s: terminating it", self.index,
                           proc.pid, timeout)
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        self._conn.close()
