"""The orphan watchdog as its own program: a stub's death kills what it guarded and frees its shared
memory; a clean shutdown leaves both alone."""
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from audiostory_ensemble.runtime.processes import alive
from tests.serverutil import wait_for


def _guarded(tmp_path):
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    shm = Path("/dev/shm") / f"audiostory-test-{uuid.uuid4().hex}"
    shm.write_bytes(b"x" * 4096)
    read_fd, write_fd = os.pipe()
    dog = subprocess.Popen([sys.executable, "-m", "audiostory_ensemble.runtime.watchdog", str(read_fd),
                            str(os.getpid()), str(engine.pid), str(shm), ""],
                           pass_fds=(read_fd,), start_new_session=True)
    os.close(read_fd)
    return engine, shm, dog, write_fd


def test_the_stub_dying_kills_the_engines_and_removes_their_shared_memory(tmp_path):
    engine, shm, dog, write_fd = _guarded(tmp_path)
    try:
        time.sleep(0.5)
        assert alive(engine.pid) and shm.exists() and dog.poll() is None
        os.close(write_fd)                     # what the kernel does when the stub dies
        assert dog.wait(30) == 0
        engine.wait(10)
        assert not alive(engine.pid) and not shm.exists()
    finally:
        engine.kill()
        shm.unlink(missing_ok=True)


def test_a_clean_shutdown_leaves_the_engines_to_their_owner(tmp_path):
    engine, shm, dog, write_fd = _guarded(tmp_path)
    try:
        os.write(write_fd, b"q")
        os.close(write_fd)
        assert dog.wait(30) == 0
        wait_for(lambda: dog.poll() is not None, what="the watchdog to exit")
        assert alive(engine.pid) and shm.exists()
    finally:
        engine.kill()
        engine.wait(10)
        shm.unlink(missing_ok=True)
