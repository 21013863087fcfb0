"""The stage board: which stages of the running server are up, which are restarting, and why.

The supervisor (:mod:`.supervisor`, run by the server helper) owns it: it marks a stage
``restarting`` the moment it sees the stage's process die (or the stage reports a fault), and
``up`` once the stage is loaded again; the restart count per stage only grows. The stages read it:
the front door refuses new stories while a stage is down and fails, within one poll, the stories
whose stream went to a stage that died (Triton answers nothing for the requests a dead decoupled
stub held); the ``llm`` stage reports its own faults (a dead vLLM engine) through :func:`report`.

One JSON file, replaced atomically, its path in the environment variable :data:`ENV`, which the
server helper sets for the server and so for every stub. Without it (a server started by hand,
without the helper) there is no board: the stages still answer a fault they see with UNAVAILABLE,
but nothing restarts a stage.

Error text is the other channel: a stage that is down is named in the message, in our words
(:class:`StageDown`) or in Triton's (``Stub process 'dit_sampler_0_0' is not healthy``, a model
that is being reloaded); :func:`down_stage` reads either, so that a stage's death reaches the
client as UNAVAILABLE naming it, through BLS (which hands every error back as INTERNAL in 2.51).

Standard library only: the stubs, the supervisor and the tests import it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ENV = "AUDIOSTORY_STAGE_BOARD"
UP, RESTARTING, FAILED = "up", "restarting", "failed"
REPORT_PREFIX = "report."          # report files beside the board: report.<stage>


@dataclass(frozen=True)
class Stage:
    state: str = UP
    restarts: int = 0           # restarts since the server helper started (never decreases)
    reason: str = ""            # why it went down (the last time)
    since: float = 0.0          # wall-clock time of the last change

    @property
    def up(self) -> bool:
        return self.state == UP


class StageDown(RuntimeError):
    """A stage the request needs is down; answered UNAVAILABLE. ``lost``: the request was in the
    stage when it died (its work is gone), else the request was refused before it started."""

    def __init__(self, stage: str, detail: str, lost: bool = False):
        self.stage, self.detail, self.lost = stage, detail, lost
        if lost:
            text = (f"stage {stage} is down: {detail}; the request was lost with it, retry once the stage "
                    "is back (it is restarting)")
        else:
            text = f"stage {stage} is down: {detail}; it is restarting, retry in a few seconds"
        super().__init__(text)


class OverCapacity(RuntimeError):
    """A stage refused a new story it could not serve without stalling the ones it has;
    answered UNAVAILABLE (retry later), and no stage is down."""

    def __init__(self, stage: str, detail: str):
        self.stage, self.detail = stage, detail
        super().__init__(f"stage {stage} is over capacity: {detail}; retry later")


_OVER_CAPACITY = re.compile(r"stage (?P<model>[\w.-]+) is over capacity")


def over_capacity(message: str) -> str | None:
    """The stage a message says refused work for lack of capacity, or None."""
    m = _OVER_CAPACITY.search(message or "")
    return m.group("model") if m else None


# Messages that say a stage is down: ours, and Triton's for a dead stub or a model being reloaded.
_DOWN_PATTERNS = (
    re.compile(r"stage (?P<model>[\w.-]+) is down"),
    re.compile(r"Stub process '(?P<instance>[\w.-]+)' is not healthy"),
    re.compile(r"[Ff]ailed to process the request\(s\) for model instance '(?P<instance>[\w.-]+)'"),
    re.compile(r"Request for unknown model: '(?P<model>[\w.-]+)'"),
    re.compile(r"[Mm]odel '(?P<model>[\w.-]+)' is not ready"),
)


def model_of_instance(instance: str) -> str:
    """``dit_sampler_0_0`` -> ``dit_sampler`` (Triton names an instance ``<model>_<group>_<index>``)."""
    m = re.fullmatch(r"(.+)_\d+_\d+", instance)
    return m.group(1) if m else instance


def down_stage(message: str) -> str | None:
    """The stage a message says is down (its model name), or None."""
    for pattern in _DOWN_PATTERNS:
        m = pattern.search(message or "")
        if m:
            return m.group("model") if "model" in pattern.groupindex else model_of_instance(m.group("instance"))
    return None


def board_path() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class Board:
    """The writer's side (the supervisor). ``path`` is the board file; reports land beside it."""

    def __init__(self, path: str | os.PathLike, stages: list[str] = ()):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.stages: dict[str, Stage] = {name: Stage(since=time.time()) for name in stages}
        self.write()

    def set(self, name: str, state: str, reason: str = "", restarted: bool = False) -> Stage:
        old = self.stages.get(name, Stage())
        new = Stage(state, old.restarts + int(restarted), reason or old.reason, time.time())
        self.stages[name] = new
        self.write()
        return new

    def write(self) -> None:
        _write_json(self.path, {name: asdict(s) for name, s in self.stages.items()})

    def take_reports(self) -> list[tuple[str, str]]:
        """The faults stages reported since the last call (each report read once)."""
        out = []
        for p in sorted(self.path.parent.glob(REPORT_PREFIX + "*")):
            try:
                reason = json.loads(p.read_text()).get("reason", "")
                p.unlink()
            except (OSError, ValueError):
                continue
            out.append((p.name[len(REPORT_PREFIX):], reason))
        return out

    def remove(self) -> None:
        for p in [self.path, *self.path.parent.glob(REPORT_PREFIX + "*"), *self.path.parent.glob(".tmp.*")]:
            try:
                p.unlink()
            except OSError:
                pass
        try:
            self.path.parent.rmdir()
        except OSError:
            pass


class BoardView:
    """A stage's view of the board: re-read when the file changed (one ``stat`` per call)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else board_path()
        self._mtime = None
        self._stages: dict[str, Stage] = {}

    @property
    def present(self) -> bool:
        return self.path is not None

    def stages(self) -> dict[str, Stage]:
        if self.path is None:
            return {}
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return self._stages
        if mtime != self._mtime:
            try:
                raw = json.loads(self.path.read_text())
                self._stages = {name: Stage(**fields) for name, fields in raw.items()}
                self._mtime = mtime
            except (OSError, ValueError, TypeError):
                pass            # a reader never sees a half-written file (os.replace), but stay safe
        return self._stages

    def down(self, names) -> tuple[str, Stage] | None:
        """The first of ``names`` that is not up, with its entry."""
        stages = self.stages()
        for name in names:
            s = stages.get(name)
            if s is not None and not s.up:
                return name, s
        return None

    def restarts(self, name: str) -> int:
        s = self.stages().get(name)
        return 0 if s is None else s.restarts


def report(stage: str, reason: str, path: str | os.PathLike | None = None) -> bool:
    """A stage asks the supervisor to restart it (``reason`` says what died). False without a board."""
    board = Path(path) if path else board_path()
    if board is None:
        return False
    _write_json(board.parent / f"{REPORT_PREFIX}{stage}", {"reason": reason, "at": time.time()})
    return True
