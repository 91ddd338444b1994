"""A server's process tree read from /proc: its descendants, their summed peak RSS, and stopping them by PID."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every live process below pid (children, their children, ...), found by parent PID in /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except OSError:
            continue  # exited while we looked
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def peak_rss_mb(pid: int) -> float:
    """The summed peak resident sets (VmHWM) of pid and its live descendants, in MB. Pages two processes share
    count once in each, so for a tree this is an upper bound on its peak."""
    total = 0
    for member in [pid, *descendants(pid)]:
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in lines if line.startswith("VmHWM:"))
    return total / 1024


def is_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_all(pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM each of pids still alive, then SIGKILL those alive after timeout (a server's leftover workers)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in pids if is_alive(pid)]
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in alive if is_alive(pid)]
        if not alive:
            return
