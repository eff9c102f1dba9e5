"""What the benchmarks share: where a result was measured (device, versions), GPU memory figures, the floor of
a device-to-device copy, child processes bounded in time, and results written as JSON.

The benchmarks are scripts (``python benchmarks/<name>.py``) that import this module by name; they import the
installed ``rollout_sleep`` (a checkout's own with ``PYTHONPATH=src``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the repository: recipes/, configs/, examples/
GIB = 2**30


def gib(nbytes: float) -> float:
    """Bytes in GiB."""
    return nbytes / GIB


def device_name() -> str:
    """GPU 0's name (asked of ``nvidia-smi``: no CUDA context is made in this process), else ``"cpu"``."""
    if shutil.which("nvidia-smi"):
        try:
            return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                                  capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            pass
    return "cpu"


def gpu_used_mib() -> float | None:
    """GPU 0's memory in use (MiB) as ``nvidia-smi`` reports it (every process's); ``None`` without it."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10).stdout
        return float(out.split()[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def versions(*names: str) -> dict[str, str]:
    """Python's version and the installed packages' (:func:`rollout_sleep.versions`: vLLM, torch, transformers,
    TRL unless ``names`` are given)."""
    from rollout_sleep import versions as installed

    return {"python": platform.python_version(), **installed(*names)}


def write_json(path: str | os.PathLike, result: Any) -> Path:
    """Write ``result`` as JSON (anything JSON cannot hold as its ``str``); rewritten as a benchmark goes, so a
    stopped run keeps what it measured."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    return path


class PeakMemory:
    """Device-wide GPU memory in use (total - free, every process's) while the block runs, sampled every
    ``period_s`` in a thread: ``base_used`` at the start, ``peak_used`` (bytes). Off CUDA nothing is measured
    and every figure is ``None``.

    Example:
        >>> with PeakMemory() as mem:                                     # doctest: +SKIP
        ...     run_the_step()
        >>> mem.peak_gib, mem.peak_above_base_gib, mem.headroom_gib       # doctest: +SKIP
    """

    def __init__(self, period_s: float = 0.01):
        import torch

        self._torch, self.period_s = torch, period_s
        self.cuda = torch.cuda.is_available()
        self.base_used: int | None = None
        self.peak_used: int | None = None
        self.total: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _used(self) -> int:
        free, self.total = self._torch.cuda.mem_get_info()
        return self.total - free

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_used = max(self.peak_used, self._used())
            self._stop.wait(self.period_s)

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            self.base_used = self.peak_used = self._used()
            self._thread = threading.Thread(target=self._poll, daemon=True, name="peak-memory")
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def peak_gib(self) -> float | None:
        """The peak in use on the device."""
        return None if self.peak_used is None else gib(self.peak_used)

    @property
    def peak_above_base_gib(self) -> float | None:
        """The peak above what was in use when the block started."""
        return None if self.peak_used is None else gib(self.peak_used - self.base_used)

    @property
    def headroom_gib(self) -> float | None:
        """What the device still had free at the peak."""
        return None if self.peak_used is None else gib(self.total - self.peak_used)


def d2d_floor(nbytes: int, repeats: int = 5, warmup: int = 1, device: str = "cuda") -> list[float]:
    """Seconds of each of ``repeats`` copies of ``nbytes`` from one flat buffer to another (after ``warmup``):
    the floor any weight sync on ``device`` is measured against."""
    import torch

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(warmup + repeats):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    del src, dst
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return times


def run_bounded(cmd: list[str], timeout: float, env: dict | None = None,
                stacks: bool = False) -> tuple[int | str, str, str, str]:
    """Run ``cmd`` in its own process group, its output in temporary files (a stopped child's is kept). Past
    ``timeout``, or when this process is told to stop (SIGTERM, e.g. an outer ``timeout``), the whole group is
    stopped (SIGTERM, then SIGKILL): servers and engine processes it started included, which would otherwise
    keep their GPU memory; with ``stacks`` it is first asked for its Python stacks (SIGUSR1, for processes that
    registered ``faulthandler`` on it). Whatever the group left running when ``cmd`` ended is killed too.

    Returns ``(exit code or "timeout", stdout, stderr, the stacks written at the timeout)``; after a timeout
    stderr starts with ``timed out after N s``.
    """
    env = dict(env if env is not None else os.environ, PYTHONUNBUFFERED="1")
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env, start_new_session=True)

        def signal_group(sig: int) -> bool:
            try:
                os.killpg(proc.pid, sig)
                return True
            except ProcessLookupError:
                return False

        def stop_group() -> None:
            if signal_group(signal.SIGTERM):
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    pass
            signal_group(signal.SIGKILL)
            proc.wait()

        def on_term(signum, frame):
            stop_group()
            raise SystemExit(128 + signum)

        previous = signal.signal(signal.SIGTERM, on_term)
        stacks_from = None
        try:
            code: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = "timeout"
            if stacks:
                stacks_from = os.fstat(err.fileno()).st_size
                if signal_group(signal.SIGUSR1):
                    time.sleep(3)
            stop_group()
        finally:
            signal.signal(signal.SIGTERM, previous)
        signal_group(signal.SIGKILL)  # what the group left running: none of it may outlive the call
        out.seek(0)
        err.seek(0)
        stderr = err.read()
        written = stderr.encode()[stacks_from:].decode(errors="replace") if stacks_from is not None else ""
        if code == "timeout":
            stderr = f"timed out after {timeout:.0f} s\n" + stderr
        return code, out.read(), stderr, written



class Steps:
    """A probe's steps, each timed (CUDA synchronized) and recorded in ``res["steps"]`` as it passes; the first that
    fails ends the block with its error and traceback in ``res`` (what ran before stays), since a failure such as an
    illegal memory access leaves the CUDA context unusable for the steps after it.

    Example:
        >>> res = {}
        >>> with Steps(res) as step:
        ...     step("one", lambda: {"x": 1})
        ...     step("two", lambda: 1 / 0)
        STEP one ok
        {'x': 1}
        >>> sorted(res["steps"]), res["error"]
        (['one'], 'ZeroDivisionError: division by zero')
    """

    def __init__(self, res: dict):
        self.res = res
        res.setdefault("steps", {})

    def __call__(self, name: str, fn) -> Any:
        import torch

        t0 = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.res["steps"][name] = {"ok": True, "seconds": time.perf_counter() - t0, **(out or {})}
        print("STEP", name, "ok", flush=True)
        return out

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if err is None:
            return False
        import traceback

        self.res["error"] = f"{kind.__name__}: {err}"[:2000]
        self.res["traceback"] = "".join(traceback.format_exception(kind, err, tb))[-6000:]
        return True


def child_result(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """Run a probe's child (:func:`run_bounded`) and return the JSON of its last ``RESULT `` line, or its error and
    output's tail."""
    code, stdout, stderr, _ = run_bounded(cmd, timeout, env=env)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    why = stderr.splitlines()[0] if code == "timeout" and stderr else f"exit {code}, no result"
    return {"error": why, "output_tail": (stdout + stderr)[-6000:]}
