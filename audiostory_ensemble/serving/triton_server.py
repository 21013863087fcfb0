"""Start and stop a local ``tritonserver`` with the environment this project needs.

The one place that knows how to run the server: ``make serve`` and the test fixtures both go
through :class:`TritonServer`.

Why the environment matters (Triton 2.51 taken out of the nvidia-pytriton wheel):
- ``LD_LIBRARY_PATH`` must hold the wheel's bundled libraries and the LIBDIR of *this* Python, or
  the python-backend stub loads a mismatched libpython.
- The stub's embedded interpreter ignores ``PYTHONPATH`` and finds its packages through the first
  ``python3`` on ``PATH``: the project venv's ``bin`` goes first.
- The allocator (:mod:`.allocator`): jemalloc preloaded into the server, and so into every stub
  and vLLM engine it starts, unless ``AUDIOSTORY_ALLOCATOR=system``.
- The server runs in its own session (``setsid``) so that a signal to the caller's process group
  does not reach engine subprocesses directly; :meth:`TritonServer.stop` signals the whole group.
- The supervisor (:mod:`.supervisor`, on by default): a stage whose process dies is reloaded
  through the repository API, so the server runs with explicit model control (every model loaded
  at start; the API behind the admin header); the stage board (:mod:`.stages`) lives in a
  temporary folder named to the stubs by ``AUDIOSTORY_STAGE_BOARD``.

Why this module is a little over 300 lines: it is also the ``make serve`` command (:func:`main`),
kept beside the class it drives so that the command and the fixtures start the server one way.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

from audiostory_ensemble.runtime import stages
from audiostory_ensemble.serving.allocator import preload_env
from audiostory_ensemble.serving.supervisor import RestartPolicy, Supervisor

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TRITON_HOME = PROJECT_ROOT / "build" / "tritonserver"


# APIs that take paths or names of host resources from the caller (shared-memory regions, trace
# files, log settings, model loading): open only to callers that send the admin header.
RESTRICTED_APIS = ("shared-memory", "model-repository", "trace", "logging")
ADMIN_HEADER = "audiostory-admin-token"                       # the HTTP header
GRPC_ADMIN_HEADER = "triton-grpc-protocol-" + ADMIN_HEADER     # gRPC metadata key Triton expects


class TritonServerError(RuntimeError):
    """The server did not start, or stopped unexpectedly. The message carries the log tail."""


def free_port(address: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def server_env(triton_home: Path = DEFAULT_TRITON_HOME, base: dict | None = None) -> dict:
    """The environment ``tritonserver`` and its python stubs need. The library path is set for the
    server this project extracts (``make setup``); an installed server (NVIDIA's image) has its own."""
    env = dict(os.environ if base is None else base)
    if Path(triton_home).resolve() == DEFAULT_TRITON_HOME.resolve():
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        libs = [str(triton_home / "lib"), libdir]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(p for p in libs if p)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    # The stub starts with an ASCII locale; vLLM/torch templates need UTF-8.
    env.setdefault("LC_ALL", "C.UTF-8")
    env.setdefault("LANG", "C.UTF-8")
    env.update(preload_env(env))
    return env


class TritonServer:
    """A ``tritonserver`` process on loopback (by default), started and stopped by this object.

    >>> with TritonServer("build/model_repository") as server:
    ...     print(server.grpc_url)
    """

    def __init__(
        self,
        model_repository: str | os.PathLike,
        *,
        address: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        load_models: list[str] | None = None,
        log_path: str | os.PathLike | None = None,
        log_verbose: int = 0,
        extra_args: list[str] | None = None,
        triton_home: str | os.PathLike = DEFAULT_TRITON_HOME,
        env: dict | None = None,
        admin_token: str | None = None,
        supervise: bool = True,
        restart_policy: RestartPolicy | None = None,
    ):
        self.model_repository = Path(model_repository).resolve()
        self.address = address
        self.http_port = http_port or free_port(address)
        self.grpc_port = grpc_port or free_port(address)
        self.metrics_port = metrics_port or free_port(address)
        # Ports picked here (free when picked): another process can take one before the server
        # binds it; a start that fails so is tried again on fresh ones.
        self._picked = [name for name, given in (("http_port", http_port), ("grpc_port", grpc_port),
                                                 ("metrics_port", metrics_port)) if not given]
        self.load_models = load_models
        # "-": the server writes to this process's stdout (a container's log)
        self.log_path = (None if str(log_path) == "-" else Path(log_path)) if log_path else \
            self.model_repository.parent / "tritonserver.log"
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args or [])
        self.triton_home = Path(triton_home)
        self.env = server_env(self.triton_home, env)
        # The server's working folder. The stubs' interpreter puts it first on sys.path, ahead of
        # the venv: a package beside it wins (a benchmark serving another tree sets its own).
        self.cwd: Path | None = None
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._tree: list[int] = []
        self._shm: list[str] = []
        self.supervise = supervise
        self.restart_policy = restart_policy or RestartPolicy()
        self.supervisor: Supervisor | None = None
        self.board: stages.Board | None = None
        # The admin header's value: given, from AUDIOSTORY_ADMIN_TOKEN, or random per start.
        self.admin_token = admin_token or os.environ.get("AUDIOSTORY_ADMIN_TOKEN") or secrets.token_hex(16)

    # -- addresses -------------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.address}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.address}:{self.metrics_port}/metrics"

    # -- lifecycle -------------------------------------------------------------------------
    def command(self) -> list[str]:
        binary = self.triton_home / "bin" / "tritonserver"
        if not binary.exists():
            raise TritonServerError(f"{binary} not found: run `make setup` first")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} does not exist")
        cmd = [
            str(binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.triton_home / 'backends'}",
            f"--http-address={self.address}",
            f"--grpc-address={self.address}",
            f"--metrics-address={self.address}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--pinned-memory-pool-byte-size=0",
            "--metrics-config=summary_latencies=true",  # 2.51 has summaries, not histograms
            f"--log-verbose={self.log_verbose}",
            "--exit-on-error=true",
            f"--grpc-restricted-protocol={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_token}",
            f"--http-restricted-api={','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={self.admin_token}",
        ]
        if self.load_models or self.supervise:
            # Explicit control (the supervisor reloads a dead stage; the API needs the admin header):
            # the named models, or every model of the repository.
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={name}" for name in (self.load_models or ["*"])]
        else:
            # Every model of the repository, and no API to load or unload models.
            cmd.append("--model-control-mode=none")
        return cmd + self.extra_args

    def start(self, timeout: float = 300.0) -> "TritonServer":
        if self.process is not None:
            raise TritonServerError("server already started")
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "wb")
        if self.supervise:      # the board's stages: the python models, once the supervisor has seen them
            import tempfile

            self.board = stages.Board(Path(tempfile.mkdtemp(prefix="audiostory-stages-")) / "board.json")
            self.env[stages.ENV] = str(self.board.path)
        try:
            for attempt in range(1, 4):
                try:
                    self._start_process(timeout)
                    break
                except TritonServerError as e:
                    if attempt == 3 or not self._picked or "already in use" not in str(e):
                        raise
                    self._stop_process()
                    for name in self._picked:
                        setattr(self, name, free_port(self.address))
            if self.supervise:
                self.supervisor = Supervisor(self, self.board, self.restart_policy).start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_process(self, timeout: float) -> None:
        """Start ``tritonserver`` and wait until it is ready (also the supervisor's restart)."""
        self.process = subprocess.Popen(
            self.command(),
            env=self.env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.cwd,
        )
        self.wait_ready(timeout)
        self._note_shm()

    def _stop_process(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the server's process group, SIGKILL what is left after ``timeout``; then remove
        the shared memory the tree had mapped that nobody maps any more (after a crash or a kill)."""
        from ..runtime.processes import descendants, kill_and_wait, start_time, unlink_unmapped_shm

        self._note_shm()
        proc = self.process
        code = None
        if proc is not None:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    # Every process of the tree at once, resource trackers last (kill_and_wait):
                    # they remove the semaphores vLLM's engines leave in /dev/shm.
                    tree = {p: start_time(p) for p in [proc.pid, *descendants(proc.pid)]}
                    kill_and_wait({p: t for p, t in tree.items() if t is not None})
                    proc.wait(10)
            code = proc.returncode
            # Children (python stubs, engine processes) share the group: make sure none survive.
            _signal_group(proc.pid, signal.SIGKILL)
            unlink_unmapped_shm(self._tree, self._shm)
        self._tree, self._shm = [], []
        return code

    @property
    def failure(self) -> str | None:
        """Why the supervisor gave up (the server is then stopped), or None."""
        return None if self.supervisor is None else self.supervisor.failure

    def _note_shm(self) -> None:
        """Record the server tree's processes and shared memory (the python backend's regions, the
        engines' queues): a server that crashed or was killed cannot remove them; :meth:`stop` does."""
        from ..runtime.processes import descendants, shm_mappings

        if self.process is not None and self.process.poll() is None:
            tree = [self.process.pid, *descendants(self.process.pid)]
            self._tree = sorted(set(self._tree) | set(tree))
            self._shm = sorted(set(self._shm) | set(shm_mappings(tree)))

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._note_shm()        # a server that dies while starting leaves its regions too
            code = self.process.poll()
            if code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {code} during start-up; log tail:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        raise TritonServerError(
            f"tritonserver was not ready within {timeout:.0f} s; log tail:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace") if self.log_path else "(the log went to stdout)"
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> int | None:
        """Stop the supervisor, then the server and everything it started (see :meth:`_stop_process`)."""
        if self.supervisor is not None:
            self.supervisor.stop()
        code = self._stop_process(timeout)
        self.process = None
        if self.board is not None:
            self.board.remove()
            self.board = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return code

    def __enter__(self) -> "TritonServer":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def server_options(argv: list[str] | None = None) -> tuple[dict, float]:
    """The command line of ``make serve`` and the container: :class:`TritonServer`'s keyword
    arguments, and the seconds to wait for readiness."""
    p = argparse.ArgumentParser(description="Run tritonserver on a model repository until interrupted.")
    p.add_argument("--model-repository", default=str(PROJECT_ROOT / "build" / "model_repository"))
    p.add_argument("--address", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for readiness")
    p.add_argument("--log", dest="log_path", default=None,
                   help="server log file (default: next to the repository; - for this process's stdout)")
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument("--triton-home", default=str(DEFAULT_TRITON_HOME),
                   help="the Triton installation (bin/tritonserver, backends/); default: the one `make setup` extracts")
    p.add_argument("--no-supervise", dest="supervise", action="store_false",
                   help="no supervisor: a dead stage stays dead (and Triton may still call it ready)")
    p.add_argument("--max-restarts", type=int, default=RestartPolicy.max_restarts,
                   help="restarts of one stage within --restart-window before giving up (exit 3)")
    p.add_argument("--restart-window", type=float, default=RestartPolicy.window_s, help="seconds")
    p.add_argument("extra_args", metavar="extra", nargs="*", help="extra tritonserver flags, after --")
    args = vars(p.parse_args(argv))
    timeout = args.pop("timeout")
    args["restart_policy"] = RestartPolicy(max_restarts=args.pop("max_restarts"), window_s=args.pop("restart_window"))
    return args, timeout


def main(argv: list[str] | None = None) -> int:
    """``make serve`` and the container's entrypoint: the server, supervised, until a signal.

    Exit status: 0 after SIGINT/SIGTERM; 1 when the server did not start or died on its own; 3 when
    the supervisor gave up (a crash-looping stage): in a container, the orchestrator replaces it."""
    args, timeout = server_options(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    server = TritonServer(**args)
    stop = {"now": False}

    def _on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    print(f"starting tritonserver on {server.model_repository} (log: {server.log_path or 'stdout'})", flush=True)
    try:
        server.start(timeout=timeout)
    except TritonServerError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(
        f"ready: gRPC {server.grpc_url}  HTTP {server.http_url}  metrics {server.metrics_url}"
        "  (Ctrl-C to stop)",
        flush=True,
    )
    try:
        while not stop["now"]:
            if server.failure:
                print(f"giving up: {server.failure}", file=sys.stderr)
                return 3
            if server.process.poll() is not None and not (server.supervisor and server.supervisor.busy):
                print(f"tritonserver exited; log tail:\n{server.log_tail()}", file=sys.stderr)
                return 1
            reap_orphans(server.process.pid)
            time.sleep(0.5)
    finally:
        server.stop()
    return 0


def reap_orphans(keep: int) -> None:
    """As process 1 (a container's entrypoint), collect the exit status of orphans the kernel hands
    to it (what a dead stub had started, once killed) so that they do not stay as zombies; the
    server's own status (``keep``) is left to its Popen."""
    if os.getpid() != 1:
        return
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == keep:
            return
        try:
            os.waitpid(info.si_pid, os.WNOHANG)
        except ChildProcessError:
            return


if __name__ == "__main__":
    sys.exit(main())
