"""The awake / asleep(level) state machine shared by the in-process :class:`~rollout_sleep.engine.engine.Engine` and
the HTTP :class:`~rollout_sleep.serve.remote.RemoteEngine`: the checks each sleep, wake and request goes through,
and the errors they raise (the state is unchanged when one is raised)."""

from __future__ import annotations

import numbers
from typing import Any

LEVELS = (1, 2)  # vLLM's sleep levels: 1 offloads the weights to host memory, 2 discards them


def check_level(level: Any, levels: tuple[int, ...] = LEVELS, what: str = "sleep_level") -> int:
    """``level`` as an ``int`` if it is one of ``levels`` (an integer: ``True`` / ``2.0`` are refused), else a
    ``ValueError`` naming ``what``.

    >>> check_level(2)
    2
    >>> check_level(3, what="engine.sleep_level")
    Traceback (most recent call last):
    ...
    ValueError: unknown engine.sleep_level 3; use one of 1, 2
    """
    if isinstance(level, bool) or not isinstance(level, numbers.Integral) or level not in levels:
        raise ValueError(f"unknown {what} {level!r}; use one of {', '.join(map(str, levels))}")
    return int(level)


class EngineStateError(RuntimeError):
    """A call that is not allowed in the engine's current state; the state is unchanged."""


class IncompleteWeightsError(EngineStateError):
    """The last weight load did not finish: the engine holds a mix of old and new weights."""


def add_note(err: BaseException, note: str) -> None:
    """``err.add_note(note)`` (Python 3.11+; on 3.10 the note is kept in ``__notes__`` only)."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:
        err.__notes__ = [*getattr(err, "__notes__", []), note]


def load_then_finish(load, finish, what: str = "load", state=lambda: "") -> None:
    """Run ``load`` (may be ``None``), then ``finish`` (the rest of the wake) whatever happened to it, so the engine
    ends in a known state; the load's error is the one raised, a failing ``finish`` attached to it as a note.

    >>> def load(): raise ValueError("bad tensor")
    >>> def finish(): raise RuntimeError("wake failed")
    >>> try:
    ...     load_then_finish(load, finish)
    ... except ValueError as err:
    ...     print(err, "|", err.__notes__[0])
    bad tensor | finishing the wake after the failed load also failed: RuntimeError: wake failed
    """
    load_error = None
    if load is not None:
        try:
            load()
        except BaseException as err:  # noqa: BLE001  (Ctrl-C included: the wake is still finished)
            load_error = err
    try:
        finish()
    except Exception as wake_error:
        if load_error is None:
            raise
        where = state()
        add_note(load_error, f"finishing the wake after the failed {what} also failed: "
                             f"{type(wake_error).__name__}: {wake_error}" + (f" (the engine is {where})" if where else ""))
    if load_error is not None:
        raise load_error


class SleepState:
    """The awake / asleep(level) / closed state shared by the in-process and the remote engine.

    ``subject`` names the thing in messages ("engine" / "server"); ``_level`` is ``None`` while awake.
    """

    _level: int | None = None  # None while awake
    levels: tuple[int, ...] = LEVELS  # the sleep levels this engine takes
    subject = "engine"
    asleep_risk = "vLLM would block or read discarded memory"  # what a request while asleep would do

    _closed = False

    @property
    def state(self) -> str:
        if self._closed:
            return "closed"
        return "awake" if self._level is None else f"asleep(level={self._level})"

    @property
    def closed(self) -> bool:
        return self._closed

    def mark_closed(self) -> None:
        """From now on every call is refused (:func:`rollout_sleep.engine.contract.operation`); neither awake
        nor asleep."""
        self._closed, self._level = True, None

    @property
    def is_asleep(self) -> bool:
        return self._level is not None

    @property
    def sleep_level(self) -> int | None:
        """The level the engine sleeps at, or ``None`` while awake."""
        return self._level

    def require_awake(self, what: str) -> None:
        """Refuse ``what`` (a request: generate, score, verify...) unless awake."""
        if self._level is not None:
            raise EngineStateError(f"cannot {what}: the {self.subject} is {self.state}; call wake_up(...) first "
                                   f"({self.asleep_risk})")

    def check_sleep(self, level: int) -> int:
        """A sleep at ``level`` is allowed: a level vLLM knows (an integer: ``True`` / ``2.0`` are refused),
        and not asleep already. Returns the level as an ``int``."""
        level = check_level(level, self.levels, what="sleep level")
        if self._level is not None:
            raise EngineStateError(f"the {self.subject} is already {self.state}; wake it before sleeping again")
        return level

    def check_wake(self, weights: Any, reload_checkpoint: bool, *, awake_hint: str, level2_hint: str) -> Any:
        """A wake is allowed (asleep; weights or a reload, not both; level 2 has something to load); returns
        the weights to load (the original checkpoint with ``reload_checkpoint``), or ``None``."""
        if self._level is None:
            raise EngineStateError(f"the {self.subject} is already awake; {awake_hint}")
        if weights is not None and reload_checkpoint:
            raise ValueError("pass weights or reload_checkpoint=True, not both")
        if reload_checkpoint:
            weights = self.model_path
        if self._level == 2 and weights is None:
            raise EngineStateError(level2_hint)
        return weights

    def check_awake_for_load(self) -> None:
        """An awake update (``load_weights``) is allowed: asleep engines take weights through ``wake_up``."""
        if self._level is not None:
            raise EngineStateError(f"the {self.subject} is {self.state}; use wake_up(weights=...) instead")
