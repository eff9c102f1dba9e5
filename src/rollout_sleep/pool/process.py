"""One :class:`~rollout_sleep.engine.engine.Engine` in its own process, driven over a pipe (an
:class:`~rollout_sleep.pool.pool.EnginePool` member).

Each engine process runs vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): its scheduler, model runner
and output handling on a core of its own, its own sleep-mode (CuMem) allocator and KV cache. Commands
(:class:`Commands`: generate, sleep, wake, load, reset, verify, info) are the same code whether the engine runs in
a process (:class:`EngineProcess`) or in this one (:class:`LocalMember`, used on CPU tests and for one
engine). In-memory weights arrive as a :class:`~rollout_sleep.pool.packing.Shared` packed buffer (a CUDA IPC
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

RESULT_TIMEOUT_S = 1800.0  # default bound on one command (generate, wake, verify); EnginePool(command_timeout_s=)
SEND_TIMEOUT_S = 60.0  # bound on handing one command to the engine process (it reads as soon as it is idle)
PHASE_BYTES = 200  # the shared buffer the engine process writes its current phase into


class EngineProcessError(RuntimeError):
    """An engine process failed to start, died, or did not answer in time."""


class Commands:
    """What an engine member does, on the engine it holds (in whichever process that is)."""

    def __init__(self, engine: Any, phase: Any = None):
        self.engine = engine
        self.phase = phase  # a shared char buffer (engine processes): where this engine is, for the pool's errors
        self.mapped: dict[int, tuple[Any, tuple]] = {}  # buffer id → (buffer, its slots): mapped once and kept
        self.last_generate_s = 0.0

    def at(self, phase: str) -> None:
        """Record where this engine is (read by the pool when a command does not answer in time)."""
        if self.phase is not None:
            self.phase.value = phase.encode()[:PHASE_BYTES - 1]

    def _weights(self, weights: Any) -> Any:
        if not isinstance(weights, Shared):
            return weights  # a checkpoint path (or in-process weights)
        if weights.local is not None or weights.handle is not None:  # a new buffer replaces the old one
            if weights.slots is None:
                raise EngineProcessError(f"packed buffer {weights.buffer_id} arrived without its layout")
            self.at("opening the packed buffer's CUDA IPC handle" if weights.handle is not None else "mapping")
            self.mapped = {weights.buffer_id: (weights.local if weights.local is not None else
                                               open_handle(weights.handle), weights.slots)}
        elif weights.buffer_id not in self.mapped:
            raise EngineProcessError(f"packed buffer {weights.buffer_id} was never sent to this engine")
        buffer, slots = self.mapped[weights.buffer_id]
        self.at("using views of the packed buffer")
        return slot_views(buffer, slots)

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

    def reset(self) -> None:
        self.engine.reset_prefix_cache()

    def verify(self, weights: Any):
        from rollout_sleep.weights.verify import verify

        return verify(self.engine, self._weights(weights))

    def drop_buffer(self) -> None:
        self.mapped.clear()

    def info(self) -> dict:
        e = self.engine
        return {"pid": os.getpid(), "state": e.state, "level": e.sleep_level, "dtype": e.dtype,
                "startup_s": e.startup_seconds, "generate_s": self.last_generate_s, "model_path": e.model_path,
                "tied": e.tied, "spec": e.spec, "sleep_mode": e.sleep_mode, "on_cuda": e.on_cuda,
                "quantization": e.quantization,
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


def _serve(conn: Any, model: str, kwargs: dict, env: dict, phase: Any = None) -> None:
    """The engine process: build the engine, then answer commands until ``close``. Each reply carries the
    sequence number of its command; ``phase`` (shared with the pool) says what the process is doing; on
    ``SIGUSR1`` every thread's Python stack goes to stderr (the pool sends it to an engine that does not
    answer in time)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    for name in LAUNCHER_ENV:
        os.environ.pop(name, None)
    os.environ.update(env)  # before CUDA starts: the trainer's GPU is this process's only one
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    holder = Commands(None, phase)
    holder.at("importing vLLM")
    import torch.multiprocessing  # noqa: F401  (CUDA tensors arrive as IPC handles)

    from rollout_sleep.engine.engine import Engine

    try:
        holder.at("building the engine (vLLM start)")
        holder.engine = Engine(model, **kwargs)
        commands = holder
        commands.at("sending 'start' reply")
        conn.send((0, True, commands.info()))
    except BaseException as err:
        holder.at("sending 'start' error")
        conn.send((0, False, _portable(err)))
        return
    while True:
        commands.at("idle (waiting for a command)")
        try:
            seq, cmd, args = conn.recv()
        except (EOFError, OSError):  # the pool's process is gone
            break
        if cmd == "close":
            commands.at("closing the engine")
            commands.engine.close()
            conn.send((seq, True, None))
            break
        commands.at(f"running {cmd!r}")
        try:
            reply = (seq, True, getattr(commands, cmd)(*args))
        except BaseException as err:
            reply = (seq, False, _portable(err))
        commands.at(f"sending the reply to {cmd!r}")
        try:
            conn.send(reply)
        except (EOFError, OSError, BrokenPipeError):
            break
        except BaseException as err:  # the result did not pickle: say so rather than leave the pool waiting
            conn.send((seq, False, _portable(EngineProcessError(f"the result of {cmd!r} could not be sent: "
                                                                f"{type(err).__name__}: {err}"))))


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
    from rollout_sleep.engine.state import add_note

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
    members first and their results collected afterwards, so the engines work at the same time. Every
    exchange is bounded in time: a command not handed over within ``SEND_TIMEOUT_S`` or not answered within
    its timeout raises :class:`EngineProcessError` naming the engine, the command and the phase the engine
    process was in (its Python stacks are written to its stderr first), and the member is then *broken*:
    it refuses further commands (its pipe may hold a late reply) until the pool is rebuilt.
    """

    def __init__(self, model: str, index: int, engine_kwargs: dict, timeout_s: float = RESULT_TIMEOUT_S):
        self.model, self.index, self.engine_kwargs = model, index, engine_kwargs
        self.timeout_s = timeout_s  # default bound on one command's answer
        self.process = None
        self.info: dict = {}
        self.broken: str | None = None  # why this member no longer takes commands
        self._seq = 0  # sequence number of the last command sent (0: the start)
        self._cmd = "start"
        self._phase = None

    def start(self, target: Any = None) -> None:
        """Spawn the engine process (``target``: another function of ``(conn, model, kwargs, env, phase)``,
        for tests of the pool's side)."""
        import torch.multiprocessing as tmp

        ctx = tmp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._phase = ctx.Array("c", PHASE_BYTES, lock=False)
        self._phase.value = b"starting the process"
        self.process = ctx.Process(target=target or _serve,
                                   args=(child, self.model, self.engine_kwargs, _device_env(), self._phase),
                                   name=f"rollout-engine-{self.index}", daemon=False)
        self.process.start()
        child.close()
        atexit.register(self.close)

    @property
    def phase(self) -> str:
        """What the engine process last said it was doing."""
        try:
            return self._phase.value.decode(errors="replace") if self._phase is not None else "not started"
        except Exception:  # noqa: BLE001  (a diagnostic only)
            return "unknown"

    def wait_ready(self, timeout: float) -> dict:
        self.info = self.result(timeout, what="start")
        logger.info("engine process %d (pid %s) ready in %.1f s", self.index, self.info["pid"],
                    self.info["startup_s"])
        return self.info

    def _name(self) -> str:
        return f"engine process {self.index} (pid {getattr(self.process, 'pid', None)})"

    def _fail(self, why: str) -> EngineProcessError:
        """Mark this member broken, ask the engine process for its stacks, and the error to raise."""
        self.broken = why
        if self.process is not None and self.process.is_alive():
            dump_stacks(self.process.pid)
        logger.error("%s", why)
        return EngineProcessError(why + "; its Python stacks were written to its stderr (SIGUSR1); close this "
                                        "pool and build a new one")

    def submit(self, cmd: str, *args: Any) -> None:
        if self.broken is not None:
            raise EngineProcessError(f"{self._name()} is unusable ({self.broken}); build a new pool")
        if self.process is None or not self.process.is_alive():
            raise EngineProcessError(f"{self._name()} is not running (exit code "
                                     f"{getattr(self.process, 'exitcode', None)}); build a new pool")
        self._seq += 1
        self._cmd = cmd
        send_bounded(self._conn, (self._seq, cmd, args), SEND_TIMEOUT_S,
                     on_timeout=lambda: self._fail(
                         f"{self._name()} did not take command {cmd!r} within {SEND_TIMEOUT_S:.0f} s (phase: "
                         f"{self.phase!r})"))

    def result(self, timeout: float | None = None, what: str | None = None) -> Any:
        what = what or self._cmd
        limit = self.timeout_s if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            while not self._conn.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                if not self.process.is_alive():
                    self.broken = f"died during {what!r}"
                    raise EngineProcessError(f"{self._name()} died during {what!r} (exit code "
                                             f"{self.process.exitcode}, phase: {self.phase!r}); see its log above")
                if time.monotonic() >= deadline:
                    raise self._fail(f"{self._name()} did not answer {what!r} within {limit:.0f} s (phase: "
                                     f"{self.phase!r})")
            try:
                seq, ok, value = self._conn.recv()
            except (EOFError, OSError) as err:
                self.broken = f"its pipe closed during {what!r}"
                raise EngineProcessError(f"{self._name()} closed its pipe during {what!r} ({err}; exit code "
                                         f"{self.process.exitcode})") from err
            if seq == self._seq:
                break
            logger.warning("%s: dropped a stale reply (to command %d, waiting for %d)", self._name(), seq, self._seq)
        if not ok:
            from rollout_sleep.engine.state import add_note

            add_note(value, f"raised by {self._name()} during {what!r}")
            raise value
        return value

    def request_close(self) -> None:
        """Ask the engine to shut down (without waiting: :meth:`close` waits)."""
        try:
            if self.process is not None and self.process.is_alive() and not getattr(self, "_closing", False) \
                    and self.broken is None:
                self._seq += 1
                send_bounded(self._conn, (self._seq, "close", ()), 5.0, on_timeout=lambda: None)
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
        proc.join(timeout if self.broken is None else 1.0)
        if proc.is_alive():
            logger.warning("engine process %d (pid %s) did not exit in time: terminating it", self.index, proc.pid)
            proc.terminate()
            proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        self._conn.close()


def dump_stacks(pid: int) -> bool:
    """Ask process ``pid`` (an engine process: it registered ``faulthandler`` on ``SIGUSR1``) to write every
    thread's Python stack to its stderr; wait a moment for it. False where the signal could not be sent."""
    import signal

    if not hasattr(signal, "SIGUSR1"):
        return False
    try:
        os.kill(pid, signal.SIGUSR1)
    except OSError:
        return False
    time.sleep(0.5)
    return True


def send_bounded(conn: Any, message: Any, timeout: float, on_timeout: Any) -> None:
    """``conn.send(message)``, bounded in time: a message larger than a pipe's buffer blocks the sender until
    the receiver reads it, so those go through a helper thread; past ``timeout`` ``on_timeout()`` is raised
    (or, if it returns ``None``, the send is abandoned)."""
    import threading

    from multiprocessing.reduction import ForkingPickler

    data = bytes(ForkingPickler.dumps(message))
    if len(data) <= 16384:  # fits in an empty pipe: does not block
        conn.send_bytes(data)
        return
    errors: list[BaseException] = []

    def send() -> None:
        try:
            conn.send_bytes(data)
        except BaseException as err:  # noqa: BLE001  (re-raised in the caller)
            errors.append(err)

    thread = threading.Thread(target=send, name="engine-process-send", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        err = on_timeout()
        if err is not None:
            raise err
        return
    if errors:
        raise errors[0]
