"""The supervisor: a stage whose process dies comes back without a person, and a stage that keeps
dying ends the server loudly, for its orchestrator to replace it.

Triton restarts no python stub (2.51 here and 25.10 in the GPU image: the python backend's restart
is a "TODO"), and until 25.12 it keeps reporting a dead stub's model ready; the requests a dead
decoupled stub held are never answered. So the server helper (:class:`..triton_server.TritonServer`,
behind ``make serve``, the tests and the container's entrypoint) runs this next to the server:

- **Watch.** Every ``poll_s`` it checks each python stub the server started (a child process of
  ``tritonserver``, named by its model's path), and takes the faults stages report on the board
  (:mod:`.stages`: the ``llm`` stage reports a dead vLLM engine; the front door, too many streams
  stuck on dead stages).
- **Mark.** A death is put on the board at once (``restarting``, the restart counted): the front
  door refuses new stories with UNAVAILABLE and fails, within its next poll, every story with a
  stream open to the stage that died.
- **Clear.** The dead stage's processes are killed and waited for — what its stub had started
  (vLLM's engine core and workers, the watchdog), and for a stage that reported its own fault the
  stub itself — and the shared memory they held is removed: nothing of the old stage is left when
  the new one starts (on a GPU, the old engines would hold the memory the new ones need).
- **Reload.** The model is unloaded and loaded through Triton's repository API (explicit model
  control, with the admin header). Triton starts its stubs again with the same config; the server
  is not ready while the model loads. Then the stage is marked ``up``.
- **The front door** is the exception: the gRPC streams its clients hold can only be ended by
  ending the server's connections, so its death restarts the server in place (same ports): its
  clients get UNAVAILABLE at once instead of waiting on a stream nobody will finish.
- **Bounded.** More than ``max_restarts`` restarts of one stage within ``window_s`` (a crash
  loop), a load that fails ``load_attempts`` times, or a server that will not start again, and the
  supervisor gives up: the stage is marked ``failed``, the server is stopped, and the launcher
  exits non-zero so that an orchestrator replaces the replica. A server that dies on its own is
  not restarted here either (the launcher exits non-zero).

Why reload, by measurement (tiny model, 2-core CPU, benchmarks/README): a stage reload took
5 s (dit_sampler, bridge, vae_decoder) to 45 s (llm, both vLLM engines), a server restart 70 s;
a stage reload costs only the stories on that stage, a server restart every story in flight.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .. import names
from ..runtime.processes import (
    alive,
    children,
    cmdline,
    descendants,
    kill_and_wait,
    shm_mappings,
    start_time,
    unlink_unmapped_shm,
)
from ..runtime.stages import FAILED, RESTARTING, UP, Board

log = logging.getLogger("audiostory.supervisor")

STUB_BINARY = "triton_python_backend_stub"


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 3            # per stage within window_s; one more and the supervisor gives up
    window_s: float = 600.0
    load_attempts: int = 2           # loads of a stage before giving up
    load_timeout_s: float = 900.0    # one load (the llm stage starts two vLLM engines)
    poll_s: float = 0.25


@dataclass
class Stub:
    """A python-backend stub of the server, and what it started (``pid -> start time``)."""
    pid: int
    started: int
    model: str
    instance: str
    family: dict[int, int] = field(default_factory=dict)
    shm: set[str] = field(default_factory=set)      # /dev/shm files it and its family were seen mapping

    def look(self) -> None:
        """Record the processes it started since and the shared memory they map."""
        self.family.update(family_of(self.pid))
        self.shm.update(shm_mappings([self.pid, *self.family]))

    def alive(self) -> bool:
        return start_time(self.pid) == self.started

    @property
    def processes(self) -> dict[int, int]:
        """It and what it started, ``pid -> start time`` (what :func:`kill_and_wait` takes)."""
        return {self.pid: self.started, **self.family}


@dataclass
class Restart:
    """One recovery, for the log, the tests and the benchmark: when the fault was seen, what it
    was, and how long the stage took to come back."""
    model: str
    reason: str
    seen_at: float                   # time.monotonic() when the death was seen
    server: bool = False             # the whole server was restarted
    cleared_s: float | None = None   # seconds until the old processes were gone
    recovered_s: float | None = None  # seconds until the stage was up again
    failed: str = ""


def find_stubs(server_pid: int) -> dict[int, Stub]:
    """The server's python stubs: ``triton_python_backend_stub <repo>/<model>/1/model.py <shm> ... <instance> ...``."""
    out = {}
    for pid in children(server_pid):
        argv = cmdline(pid)
        started = start_time(pid)
        if started is None or not argv or not argv[0].endswith(STUB_BINARY) or len(argv) < 9:
            continue
        model = Path(argv[1]).parent.parent.name
        out[pid] = Stub(pid, started, model, argv[8])
    return out


def family_of(pid: int) -> dict[int, int]:
    out = {}
    for p in descendants(pid):
        s = start_time(p)
        if s is not None:
            out[p] = s
    return out


class Supervisor:
    """Watches ``server`` (a started :class:`TritonServer`), writing ``board``."""

    def __init__(self, server, board: Board, policy: RestartPolicy | None = None,
                 front_door: str = names.STREAM_MODEL):
        self.server = server
        self.board = board
        self.policy = policy or RestartPolicy()
        self.front_door = front_door
        self.failure: str | None = None
        self.history: list[Restart] = []
        self._watched: dict[int, Stub] = {}
        self._recent: dict[str, list[float]] = {}       # model -> monotonic times of its restarts
        self._pending: dict[str, Restart] = {}          # model -> its restart, queued or running
        self._server_restart: Restart | None = None     # a restart of the whole server, queued or running
        self._dead: dict[str, list[Stub]] = {}           # model -> its dead stubs (for clearing)
        self._reported: set[str] = set()
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> "Supervisor":
        self._learn()
        with self._lock:
            for model in self._stubless():
                self._down(model, "its process died before the supervisor started")
        for name, target in (("watch", self._watch), ("restart", self._work)):
            t = threading.Thread(target=target, name=f"supervisor-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)

    @property
    def busy(self) -> bool:
        """A restart is queued or running (a death being recorded counts: the lock is held then)."""
        with self._lock:
            return bool(self._pending) or self._server_restart is not None

    def _learn(self, models: set[str] | None = None, known: set[int] = frozenset()) -> None:
        """Watch the server's stubs (of ``models``, or all), except the pids in ``known`` (stubs of
        a model's previous load that are still finishing their requests)."""
        server = self.server.process
        if server is None:
            return
        for pid, stub in find_stubs(server.pid).items():
            if pid in known or (models is not None and stub.model not in models):
                continue
            stub.look()
            self._watched[pid] = stub
            if stub.model not in self.board.stages:
                self.board.set(stub.model, UP)

    def _stubless(self) -> list[str]:
        """Python models Triton has loaded (READY) that have no live stub: a stub that died between
        the server's readiness and the first look (called once, after the first :meth:`_learn`)."""
        from .triton_server import ADMIN_HEADER

        req = urllib.request.Request(f"http://{self.server.http_url}/v2/repository/index", data=b"{}", method="POST",
                                     headers={ADMIN_HEADER: self.server.admin_token})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                index = json.loads(r.read().decode())
        except (OSError, ValueError):
            return []
        with_stubs = {s.model for s in self._watched.values()}
        repo = Path(self.server.model_repository)
        return sorted({m["name"] for m in index if m.get("state") == "READY" and m["name"] not in with_stubs
                       and any(repo.glob(f"{m['name']}/*/model.py"))})

    # -- watching -------------------------------------------------------------------------------
    def _watch(self) -> None:
        last_families = time.monotonic()
        while not self._stop.wait(self.policy.poll_s):
            proc = self.server.process
            if not self._server_alive():
                if self._server_restart is None:          # not our own restart: the launcher's to handle
                    log.error("tritonserver exited (code %s); nothing more to supervise",
                              None if proc is None else proc.poll())
                    self._stop_leftovers()
                    return
                continue
            with self._lock:
                for pid, stub in list(self._watched.items()):
                    if not stub.alive() and self._server_alive():   # stubs die with their server
                        del self._watched[pid]
                        self._down(stub.model, f"its process {stub.instance} (pid {pid}) died", dead=[stub])
            for stage, reason in self.board.take_reports():
                with self._lock:
                    self._down(stage, reason or "the stage reported a fault", reported=True)
            if time.monotonic() - last_families > 5.0:      # processes a stub started since
                last_families = time.monotonic()
                with self._lock:
                    for stub in self._watched.values():
                        stub.look()

    def _server_alive(self) -> bool:
        """Read from /proc, not ``Popen.poll()``: poll answers None (running) while another thread
        waits on the process, and a dead server's stubs, which exit on their own, would then look
        like stages to restart."""
        proc = self.server.process
        return proc is not None and proc.returncode is None and alive(proc.pid)

    def _stop_leftovers(self, grace_s: float = 2.0) -> None:
        """The server died: stop what it left. A stub notices its parent's death within a second and
        exits, unless it cannot: one whose thread was waiting on the server's answer (a metric's
        ``set`` waits for ever, holding the GIL) never exits, and its engines live on with it. After
        ``grace_s``, every process the stubs were seen with is killed and the shared memory they
        held is removed (the server that owned the stubs' regions is gone)."""
        with self._lock:
            victims: dict[int, int] = {}
            shm: set[str] = set()
            for stub in [*self._watched.values(), *(s for dead in self._dead.values() for s in dead)]:
                victims.update(stub.processes)
                shm |= stub.shm
            self._watched.clear()
        live = [p for p, s in victims.items() if start_time(p) == s]
        shm |= set(shm_mappings(live))
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(start_time(p) == victims[p] for p in live):
            time.sleep(0.1)
        left = [p for p in live if start_time(p) == victims[p]]
        if left:
            log.warning("stopping %d process(es) the server left: %s", len(left),
                        ", ".join(f"{p} ({' '.join(cmdline(p))[:60]})" for p in left))
        stuck = kill_and_wait({p: victims[p] for p in left})
        if stuck:
            log.error("processes %s survived SIGKILL", stuck)
        unlink_unmapped_shm([], sorted(shm), timeout=0)

    def _down(self, model: str, reason: str, dead: list[Stub] = (), reported: bool = False) -> None:
        """Mark ``model`` restarting and queue its restart (once; later deaths join the queued one).
        Called with the lock held."""
        self._dead.setdefault(model, []).extend(dead)
        if reported:
            self._reported.add(model)
        if self.failure or model in self._pending or self._server_restart is not None:
            return
        now = time.monotonic()
        recent = [t for t in self._recent.get(model, []) if now - t <= self.policy.window_s] + [now]
        self._recent[model] = recent
        server = model == self.front_door
        restart = Restart(model, reason, now, server=server)
        self.history.append(restart)
        log.warning("stage %s is down: %s", model, reason)
        self.board.set(model, RESTARTING, reason, restarted=True)
        if len(recent) > self.policy.max_restarts:
            self._fail(f"stage {model} died {len(recent)} times within {self.policy.window_s:g} s "
                       f"(max_restarts {self.policy.max_restarts}): {reason}", model, restart)
            return
        if server:      # supersedes the stage restarts still queued
            for name in self.board.stages:
                if name != model:
                    self.board.set(name, RESTARTING, f"server restart: {model} died")
            self._pending.clear()
            self._server_restart = restart
        else:
            self._pending[model] = restart
        self._jobs.put(model)

    # -- restarting -----------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            model = self._jobs.get()
            if model is None or self._stop.is_set():
                return
            restart = self._server_restart if model == self.front_door else self._pending.get(model)
            if restart is None:
                continue
            try:
                if restart.server:
                    self._restart_server(restart)
                else:
                    self._restart_stage(restart)
            except Exception as e:  # noqa: BLE001 - a recovery that fails is a failure, said once
                if not self._stop.is_set() and (restart.server or self._server_alive()):
                    self._fail(f"restarting {model} failed: {type(e).__name__}: {e}", model, restart)
            finally:
                with self._lock:
                    if restart.server:
                        self._server_restart = None
                    else:
                        self._pending.pop(model, None)

    def _clear(self, model: str) -> None:
        """Kill what is left of the stage: the dead stubs' processes and, for a stage that reported
        its own fault, its live stubs with theirs; remove the shared memory they held."""
        with self._lock:
            victims: dict[int, int] = {}
            for stub in self._dead.pop(model, []):
                victims.update(stub.processes)      # a dead stub's own pid is skipped by its start time
            if model in self._reported:
                self._reported.discard(model)
                for pid, stub in list(self._watched.items()):
                    if stub.model == model:
                        del self._watched[pid]
                        victims.update(stub.processes)
        live = [p for p, s in victims.items() if start_time(p) == s]
        shm = shm_mappings(live)
        left = kill_and_wait(victims)
        if left:
            raise RuntimeError(f"processes {left} of {model} survived SIGKILL")
        unlink_unmapped_shm([], shm, timeout=0)

    def _restart_stage(self, restart: Restart) -> None:
        model = restart.model
        self._clear(model)
        restart.cleared_s = time.monotonic() - restart.seen_at
        with self._lock:      # the model's other stubs finish their requests on the old load: unwatched
            known = set(find_stubs(self.server.process.pid))
            for pid, stub in list(self._watched.items()):
                if stub.model == model:
                    del self._watched[pid]
        self._repository("unload", model)
        error = ""
        for _ in range(self.policy.load_attempts):
            error = self._repository("load", model)
            if not error:
                break
        if error:
            raise RuntimeError(f"load of {model} failed {self.policy.load_attempts} times: {error}")
        with self._lock:
            self._learn({model}, known)
            self.board.set(model, UP)
        restart.recovered_s = time.monotonic() - restart.seen_at
        log.warning("stage %s is up again after %.1f s", model, restart.recovered_s)

    def _restart_server(self, restart: Restart) -> None:
        with self._lock:
            self._watched.clear()
            self._dead.clear()
            self._reported.clear()
        # SIGKILL at once: the fault has cost every story already, and a graceful stop would wait on
        # the requests the dead front door holds (Triton's shutdown waits for them); the clients'
        # connections close now, which tells them (UNAVAILABLE) instead of leaving them waiting.
        self.server._stop_process(timeout=0)
        restart.cleared_s = time.monotonic() - restart.seen_at
        self.server._start_process(timeout=self.policy.load_timeout_s)
        with self._lock:
            self._learn()
            for name in self.board.stages:
                self.board.set(name, UP)
        restart.recovered_s = time.monotonic() - restart.seen_at
        log.warning("server restarted after %s died: up again after %.1f s", restart.model, restart.recovered_s)

    def _repository(self, action: str, model: str) -> str:
        """POST the repository API; the error text, or "" on success."""
        from .triton_server import ADMIN_HEADER

        req = urllib.request.Request(f"http://{self.server.http_url}/v2/repository/models/{model}/{action}",
                                     data=b"", method="POST", headers={ADMIN_HEADER: self.server.admin_token})
        try:
            with urllib.request.urlopen(req, timeout=self.policy.load_timeout_s):
                return ""
        except urllib.error.HTTPError as e:
            try:
                return json.loads(e.read().decode()).get("error", str(e))
            except ValueError:
                return str(e)
        except OSError as e:
            return f"{type(e).__name__}: {e}"

    def _fail(self, reason: str, model: str | None = None, restart: Restart | None = None) -> None:
        if self.failure:
            return
        self.failure = reason
        if restart is not None:
            restart.failed = reason
        log.error("giving up: %s", reason)
        if model is not None:
            self.board.set(model, FAILED, reason)
        self._stop.set()
        self._jobs.put(None)
        self.server._stop_process(timeout=10)      # a short grace: dead stubs' requests never finish

    def status(self) -> dict:
        """The board as the supervisor holds it, for logs and tests."""
        return {"failure": self.failure, "stages": {k: vars(v) for k, v in self.board.stages.items()},
                "pid": os.getpid()}
