"""A per-phase timeout: a run that stalls (a hung generate, a wake that never returns, a rank that never
reaches a collective) stops with a message naming the phase, the rank and what it waited for, followed by
every thread's stack, instead of hanging for days.

    watchdog = Watchdog({"generate": 1800, "collective": 600}, rank=0, world=2)
    with watchdog.phase("generate", "vLLM to finish 64 completions"):
        engine.generate(...)

Phases nest: a phase opened inside another (rewards scored inside the training block, a wait for the other
ranks inside the setup) pauses the outer one's clock until it ends, so a stall is blamed on the innermost
phase, under its own limit (an unwatched inner phase, timeout 0, pauses the outer one too).

A Python thread watches the deadlines; on expiry it writes the message, dumps every thread's stack with
:func:`faulthandler.dump_traceback` and ends the process with :data:`EXIT_CODE` (``os._exit``: nothing
that hangs can block it; a launcher like torchrun then stops the other ranks). In case that thread cannot
run (a C call holding the GIL: a C extension's long call, a regular expression that backtracks without end),
:func:`faulthandler.dump_traceback_later` is armed as a backstop ``grace_s`` later (its stacks, exit code 1),
and a small helper process, which needs no GIL of this one, names the phase ``grace_s / 2`` after the deadline.
A phase with no timeout (0 or missing) is not watched.

For tests only: ``ROLLOUT_SLEEP_TEST_STALL=<rank>:<phase>:<seconds>`` makes that rank sleep inside that
phase (after the deadline is armed), to prove the stall is caught.

>>> wd = Watchdog({"generate": 5.0})
>>> with wd.phase("generate", "a quick thing"):
...     pass
>>> wd.close()
"""

from __future__ import annotations

import faulthandler
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

logger = logging.getLogger(__name__)

EXIT_CODE = 75  # distinct from a Python error (1) and a signal kill

# The helper process: reads "arm <monotonic deadline> <JSON message>" / "clear" lines; writes the message to the
# stderr it shares with the watched process when a deadline passes; exits with the watched process (end of its
# input, or a new parent).
_HELPER = r"""
import json, os, select, sys, time
parent, deadline, message = os.getppid(), None, ""
while os.getppid() == parent:
    wait = 1.0 if deadline is None else min(max(deadline - time.monotonic(), 0.0), 1.0)
    if select.select([sys.stdin], [], [], wait)[0]:
        line = sys.stdin.readline()
        if not line:
            break
        command, _, rest = line.strip().partition(" ")
        if command == "arm":
            at, _, text = rest.partition(" ")
            deadline, message = float(at), json.loads(text)
        else:
            deadline = None
    elif deadline is not None and time.monotonic() >= deadline:
        os.write(2, message.encode())
        deadline = None
"""
# Longer timeouts (1e10 s and up overflow the timers) are clamped to this, over three years: the same as none.
MAX_TIMEOUT_S = 1e8
STALL_ENV = "ROLLOUT_SLEEP_TEST_STALL"


@dataclass
class _Watch:
    phase: str
    waiting_for: str
    timeout: float
    deadline: float


class Watchdog:
    """Args:
        timeouts: seconds per phase name (0 or absent: not watched).
        rank, world: this process's rank and the number of processes (for the message).
        grace_s: *optional*, how much later the GIL-free faulthandler backstop fires.
        hint: *optional*, appended to the message (e.g. which setting raises the limit); ``{phase}`` is
            replaced by the phase's name.
    """

    def __init__(self, timeouts: dict[str, float], *, rank: int = 0, world: int = 1, grace_s: float = 30.0,
                 hint: str = "raise the phase's timeout if it legitimately takes longer"):
        self.timeouts = {k: min(float(v), MAX_TIMEOUT_S) for k, v in timeouts.items() if v and v > 0}
        self.rank, self.world, self.grace_s, self.hint = rank, world, grace_s, hint
        self._active: dict[int, _Watch] = {}
        self._open: dict[int, list[int]] = {}  # thread id -> keys of its open phases, innermost last
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._helper = None  # the process that names a phase whose stall holds the GIL (started with the thread)
        self._told: str | None = None  # what the helper was last told
        self._stall = self._parse_stall(os.environ.get(STALL_ENV, ""))

    def _parse_stall(self, spec: str) -> tuple[str, float] | None:
        if not spec:
            return None
        try:
            rank, phase, seconds = spec.split(":")
            return (phase, float(seconds)) if int(rank) == self.rank else None
        except ValueError:
            raise ValueError(f"{STALL_ENV}={spec!r} must look like <rank>:<phase>:<seconds>") from None

    @contextmanager
    def phase(self, name: str, waiting_for: str, timeout: float | None = None):
        """Watch the block as phase ``name`` (``timeout`` overrides the configured one); the thread's enclosing
        phase, if any, is paused until the block ends."""
        limit = self.timeouts.get(name, 0.0) if timeout is None else min(float(timeout), MAX_TIMEOUT_S)
        key, thread = next(self._ids), threading.get_ident()
        with self._cond:
            stack = self._open.setdefault(thread, [])
            outer = self._active.pop(stack[-1], None) if stack else None
            left = outer.deadline - time.monotonic() if outer is not None else None
            stack.append(key)
            if limit > 0:
                self._active[key] = _Watch(name, waiting_for, limit, time.monotonic() + limit)
                self._start()
            self._cond.notify()
        self._arm_backstop()
        try:
            self._maybe_stall(name)
            yield
        finally:
            with self._cond:
                self._active.pop(key, None)
                stack.remove(key)
                if outer is not None and not self._closed:  # the outer phase's clock runs on from where it was
                    outer.deadline = time.monotonic() + left
                    self._active[stack[-1]] = outer
                if not stack:
                    self._open.pop(thread, None)
                self._cond.notify()
            self._arm_backstop()

    def _maybe_stall(self, name: str) -> None:
        if self._stall and self._stall[0] == name:
            time.sleep(self._stall[1])

    def close(self) -> None:
        """Stop watching (the run ended)."""
        with self._cond:
            self._closed = True
            self._active.clear()
            self._cond.notify()
        faulthandler.cancel_dump_traceback_later()
        helper, self._helper = self._helper, None
        if helper is not None:
            try:
                helper.stdin.close()  # its end of input: it exits
                helper.wait(timeout=5)
            except Exception:  # noqa: BLE001 - an ended run; the helper exits with this process anyway
                pass

    # ------------------------------------------------------------------------------------- internals
    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="rollout-sleep-watchdog", daemon=True)
            self._thread.start()
            try:
                self._helper = subprocess.Popen([sys.executable, "-I", "-S", "-c", _HELPER], stdin=subprocess.PIPE,
                                                stdout=subprocess.DEVNULL, text=True)
            except OSError as err:  # the thread and faulthandler's backstop still watch
                logger.warning("watchdog: no helper process (%s): a stall that holds the GIL will show its stacks "
                               "without the phase named", err)

    def _arm_backstop(self) -> None:
        with self._cond:
            soonest = min(self._active.values(), key=lambda w: w.deadline, default=None)
        try:
            if soonest is None:
                faulthandler.cancel_dump_traceback_later()
            else:
                faulthandler.dump_traceback_later(max(soonest.deadline - time.monotonic(), 0.0) + self.grace_s,
                                                  exit=True, file=sys.__stderr__)
        except (AttributeError, ValueError, OSError):  # no real stderr to write to: the thread alone watches
            pass
        self._tell_helper(soonest)

    def _tell_helper(self, w: _Watch | None) -> None:
        """Arm the helper process for ``w`` (``None``: nothing watched): if this process still runs ``grace_s / 2``
        after the deadline (the thread could not stop it: the GIL is held), the helper names the phase."""
        if self._helper is None:
            return
        if w is None:
            line = "clear\n"
        else:
            who = f"rank {self.rank} of {self.world}" if self.world > 1 else "the process"
            half = self.grace_s / 2
            message = (f"\nrollout_sleep watchdog: {who} spent more than {w.timeout:g} s in phase '{w.phase}' "
                       f"(waiting for {w.waiting_for}) and does not answer: the code it runs holds Python's "
                       f"interpreter lock (a C extension's long call, a regular expression that backtracks without "
                       f"end), so the watchdog cannot stop it cleanly. Python's own timeout dumps every thread's "
                       f"stack {half:g} s from now and ends the process (exit code 1). If this phase legitimately "
                       f"takes longer, {self.hint.format(phase=w.phase)}.\n")
            line = f"arm {w.deadline + half!r} {json.dumps(message)}\n"
        if line == self._told:
            return
        try:
            self._helper.stdin.write(line)
            self._helper.stdin.flush()
            self._told = line
        except (OSError, ValueError):  # the helper is gone: the thread and the backstop still watch
            self._helper = None

    def _watch(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                expired = [w for w in self._active.values() if w.deadline <= now]
                if expired:
                    self._expire(min(expired, key=lambda w: w.deadline))
                soonest = min((w.deadline for w in self._active.values()), default=None)
                self._cond.wait(None if soonest is None else max(soonest - now, 0.01))

    def _expire(self, w: _Watch) -> None:
        who = f"rank {self.rank} of {self.world}" if self.world > 1 else "the process"
        msg = (f"\nrollout_sleep watchdog: {who} spent more than {w.timeout:g} s in phase '{w.phase}' "
               f"(waiting for {w.waiting_for}); stopping the run (exit code {EXIT_CODE}). If this phase "
               f"legitimately takes longer, {self.hint.format(phase=w.phase)}. Every thread's stack follows.\n")
        try:
            sys.stdout.flush()
            sys.__stderr__.write(msg)
            sys.__stderr__.flush()
            faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)
            sys.__stderr__.flush()
        finally:
            os._exit(EXIT_CODE)
