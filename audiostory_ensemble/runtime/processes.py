"""Processes a stub starts (vLLM's engines) and their shared memory: finding them, cleaning up after
them, and the orphan guard that takes them down when the stub dies however it dies."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``. Children are listed per thread (``task/<tid>/children``), and
    engines started from a loop thread are children of that thread, not of the main one."""
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for c in children:
                out.append(int(c))
                frontier.append(int(c))
    return out


def shm_mappings(pids: list[int]) -> list[str]:
    """The ``/dev/shm`` files the processes have mapped (vLLM's message queues, Triton's regions)."""
    out = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                path = fields[5] if len(fields) == 6 else ""
                if path.startswith("/dev/shm/") and not path.endswith("(deleted)"):
                    out.add(path)
        except OSError:
            continue
    return sorted(out)


def mapped_shm() -> set[str]:
    """The ``/dev/shm`` files some live process has mapped (in use by someone)."""
    pids = [int(d.name) for d in Path("/proc").iterdir() if d.name.isdigit()]
    return set(shm_mappings(pids))


def unlink_unmapped_shm(pids: list[int], paths: list[str], timeout: float = 10.0) -> list[str]:
    """After stopping ``pids``: wait (up to ``timeout``) for them to exit, then remove those of
    ``paths`` that no live process maps any more (a process killed at shutdown cannot unlink its
    shared memory); returns what was removed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    in_use = mapped_shm()
    removed = []
    for path in paths:
        if path not in in_use:
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie is dead for our purposes)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, it names one process, so
    that a pid the kernel has given to another process since is not taken for it. None when the
    process is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def cmdline(pid: int) -> list[str]:
    """The process's arguments (a process that renamed itself, as vLLM's do, may have one)."""
    try:
        parts = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
    return parts[:-1] if parts and parts[-1] == "" else parts


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (of every thread of it)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            continue
    return out


def resource_tracker(pid: int) -> bool:
    """Python's multiprocessing resource tracker: it removes the named semaphores its clients made
    (vLLM's engines, started by spawning, make some in /dev/shm) once they are all gone, unless it
    is killed with them."""
    return "multiprocessing.resource_tracker" in " ".join(cmdline(pid))


def kill_and_wait(processes: dict[int, int], timeout: float = 10.0) -> list[int]:
    """SIGKILL each ``pid -> start time`` that is still that process, and wait until all are gone;
    returns the pids still there after ``timeout`` (none, unless the kernel is stuck). Resource
    trackers are killed last, after ``timeout`` at most for them to clean up and exit on their own
    (their clients dead, they remove the semaphores those left)."""
    import signal

    def kill(pids):
        for pid in pids:
            if start_time(pid) == processes[pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def wait(pids, until):
        left = [p for p in pids if start_time(p) == processes[p]]
        while left and time.monotonic() < until:
            time.sleep(0.05)
            left = [p for p in left if start_time(p) == processes[p]]
        return left

    trackers = [p for p in processes if resource_tracker(p)]
    others = [p for p in processes if p not in trackers]
    kill(others)
    deadline = time.monotonic() + timeout
    left = wait(others, deadline)
    kill(wait(trackers, deadline))
    return left + wait(trackers, time.monotonic() + 5)


def guard_children(parent_pid: int | None = None) -> subprocess.Popen | None:
    """Start a watchdog that kills this process's current descendants when this process dies.

    vLLM's engine processes outlive a killed python-backend stub (gigabytes, and leaked shared
    memory). The watchdog gets SIGKILL-proof notice through a pipe: when the stub dies for any
    reason its end of the pipe closes, and the watchdog kills the recorded process tree and removes
    the shared-memory files they had mapped. :func:`release_guard` tells it to exit quietly.
    """
    parent = parent_pid or os.getpid()
    pids = descendants(parent)
    if not pids:
        return None
    engine_shm = shm_mappings(pids)
    own_shm = [p for p in shm_mappings([parent]) if p not in engine_shm]
    server = int(Path(f"/proc/{parent}/stat").read_text().rsplit(")", 1)[1].split()[1])
    read_fd, write_fd = os.pipe()
    # The package's folder on the watchdog's path: a stub may import it from a path of its own.
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.Popen([sys.executable, "-m", "audiostory_ensemble.runtime.watchdog", str(read_fd), str(server),
                             ",".join(map(str, pids)), ",".join(engine_shm), ",".join(own_shm)], pass_fds=(read_fd,),
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    os.close(read_fd)
    # Keep write_fd open for the life of this process; it closes when the process dies.
    _KEEP.append(write_fd)
    return proc


_KEEP: list[int] = []


def release_guard() -> None:
    """Normal shutdown: the engines were stopped cleanly, the watchdog may exit quietly."""
    while _KEEP:
        fd = _KEEP.pop()
        try:
            os.write(fd, b"q")
            os.close(fd)
        except OSError:
            pass
