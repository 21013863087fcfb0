"""The orphan watchdog: kills a python stub's engine processes when the stub dies.

Started by :func:`audiostory_ensemble.runtime.processes.guard_children` as
``python -m audiostory_ensemble.runtime.watchdog FD SERVER PIDS ENGINE_SHM OWN_SHM`` in its own session. It
blocks reading the pipe ``FD``, whose writing end only the stub holds: a byte ``q`` means a clean
shutdown (the engines were stopped by their owner) and the watchdog exits; end of file means the
stub died, for any reason including SIGKILL. It then sends SIGTERM and SIGKILL to ``PIDS`` (the
stub's descendants when it was guarded) and removes the shared memory they had mapped
(``ENGINE_SHM``), and the stub's own regions (``OWN_SHM``) too once the server ``SERVER`` is gone
(a live server still owns and removes those). Lists are comma-separated.

It uses the standard library only, so that it starts fast and cannot fail on an import.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _split(arg: str) -> list[str]:
    return [p for p in arg.split(",") if p]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    fd, server = int(argv[0]), int(argv[1])
    pids = [int(p) for p in _split(argv[2])]
    engine_shm, own_shm = _split(argv[3]), _split(argv[4])
    try:
        said = os.read(fd, 1)
    except OSError:
        said = b""
    if said == b"q":
        return 0
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        time.sleep(3)
    for path in engine_shm + ([] if _alive(server) else own_shm):
        try:
            os.unlink(path)
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
