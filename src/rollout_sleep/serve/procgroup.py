"""Process groups for a managed server: the child in its own group, signals to the whole group, and the
watchdog script that stops the group when its owner goes away (``kill -9`` included)."""

from __future__ import annotations

import os
import sys

# Runs in the server's process group. It reads its stdin, a pipe whose write end only the owner holds: EOF
# means the owner closed it (stop()) or died (any way, kill -9 included). It then stops the whole group:
# SIGTERM, up to GRACE seconds for the others to exit, SIGKILL (itself included).
WATCHDOG_SCRIPT = r"""
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


def in_group(pgid: int) -> dict:
    """Popen arguments that put the child in process group ``pgid`` (0: a new group led by the child)."""
    if sys.version_info >= (3, 11):
        return {"process_group": pgid}
    return {"preexec_fn": lambda: os.setpgid(0, pgid)}


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to process group ``pgid`` (gone or not ours: nothing to do)."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` still has a member (zombies included)."""
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
