"""The supervisor and the launcher that runs it (``make serve``, the container's entrypoint), on a
one-model repository: a dead stub comes back, a crash loop ends the launcher with status 3, a
server that dies ends it with status 1, a signal with 0; none leaves a process behind. The stage
board and the messages that name a dead stage, without a server. (The pipeline's stages killed
mid-story: tests/test_faults.py.)"""
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from audiostory_ensemble.runtime import stages
from audiostory_ensemble.runtime.processes import children, descendants, kill_and_wait, shm_mappings, start_time
from audiostory_ensemble.serving.triton_server import free_port
from tests.serverutil import ProcessTree, wait_for

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_the_board_is_written_whole_and_read_when_it_changes(tmp_path, monkeypatch):
    board = stages.Board(tmp_path / "b" / "board.json")
    view = stages.BoardView(board.path)
    assert view.stages() == {} and view.down(["llm"]) is None
    board.set("llm", stages.UP)
    board.set("dit_sampler", stages.RESTARTING, "its process died", restarted=True)
    assert view.down(["llm", "dit_sampler"])[0] == "dit_sampler"
    assert view.restarts("dit_sampler") == 1 and view.restarts("llm") == 0
    board.set("dit_sampler", stages.UP)
    s = view.stages()["dit_sampler"]
    assert s.up and s.restarts == 1 and s.reason == "its process died"      # the count only grows
    assert stages.report("llm", "the generate engine died", board.path)
    assert board.take_reports() == [("llm", "the generate engine died")] and board.take_reports() == []
    monkeypatch.delenv(stages.ENV, raising=False)          # a server started without the helper
    assert not stages.BoardView().present and stages.BoardView().stages() == {}
    assert stages.report("llm", "x") is False
    board.remove()
    assert not board.path.parent.exists()


@pytest.mark.parametrize("message, stage", [
    ("stage llm is down: the generate engine died; it is restarting, retry in a few seconds", "llm"),
    ("dit_sampler: vae_decoder: Stub process 'vae_decoder_0_0' is not healthy.", "vae_decoder"),
    ("Failed to process the request(s) for model instance 'bridge_0_1', message: Stub process is not healthy.",
     "bridge"),
    ("Request for unknown model: 'audiostory_stream' has no available versions", "audiostory_stream"),
    ("vae_decoder: Failed for execute the inference request. Model 'vae_decoder' is not ready.", "vae_decoder"),
    ("llm: malformed plan at clip 0", None),
    ("server busy: 2 stories in progress", None),
])
def test_a_message_names_the_stage_that_is_down(message, stage):
    assert stages.down_stage(message) == stage


def test_a_story_ends_unavailable_when_a_stage_it_waits_on_dies():
    from audiostory_ensemble.pipeline import story

    up = {"llm": stages.Stage(), "dit_sampler": stages.Stage()}
    died = {**up, "dit_sampler": stages.Stage(stages.RESTARTING, 1, "its process dit_sampler_0_0 (pid 7) died")}
    back = {**up, "dit_sampler": stages.Stage(stages.UP, 1, "its process dit_sampler_0_0 (pid 7) died")}

    def rendering():
        loop = story.StoryLoop("llm", "dit_sampler", 60.0, 0.0, up)
        loop.response(story.PLAN, story.ENTRY, stages=up)
        loop.stream_ended(story.PLAN)                        # the plan is written; clip 0 renders
        return loop

    stop = rendering().idle(1.0, False, died)
    assert (stop.reason, stop.stage) == ("unavailable", "dit_sampler")
    assert stop.message.startswith("stage dit_sampler is down: its process dit_sampler_0_0 (pid 7) died")
    assert rendering().idle(1.0, False, back).reason == "unavailable"     # died and came back: still lost
    assert rendering().idle(1.0, False, up) == story.WAIT
    # The plan was finished: the llm dying does not touch the story.
    llm_died = {**up, "llm": stages.Stage(stages.RESTARTING, 1, "the generate engine died")}
    assert rendering().idle(1.0, False, llm_died) == story.WAIT
    planning = story.StoryLoop("llm", "dit_sampler", 60.0, 0.0, up)
    assert planning.idle(1.0, False, llm_died).stage == "llm"
    # A clip stream opened after the sampler came back waits on the new one.
    late = story.StoryLoop("llm", "dit_sampler", 60.0, 0.0, up)
    late.response(story.PLAN, story.ENTRY, stages=back)
    assert late.idle(1.0, False, back) == story.WAIT
    # An error that names a dead stage is UNAVAILABLE, whichever stream it came on.
    vae = rendering().response("clip0", story.ERROR, error="dit_sampler: vae_decoder: Stub process "
                               "'vae_decoder_0_0' is not healthy.")
    assert (vae.reason, vae.stage) == ("unavailable", "vae_decoder") and vae.message.startswith("stage vae_decoder")


def test_killing_a_recorded_process_spares_a_pid_given_to_another(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    other = subprocess.Popen(["sleep", "60"])
    try:
        mine = {sleeper.pid: start_time(sleeper.pid), other.pid: start_time(other.pid) + 1}   # "reused" pid
        assert kill_and_wait(mine, timeout=10) == []
        assert sleeper.wait(10) == -signal.SIGKILL and other.poll() is None
    finally:
        other.kill()
        other.wait()


# -- the launcher -----------------------------------------------------------------------------------
@pytest.fixture
def repository(test_build_dir):
    repo = test_build_dir / "supervised_repository"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(FIXTURES / "stack_info", repo / "stack_info")
    return repo


class Launcher:
    """``python -m audiostory_ensemble.serving.triton_server`` (make serve's command) in its own session."""

    def __init__(self, repo, log_dir, *extra):
        self.ports = [free_port() for _ in range(3)]
        cmd = [sys.executable, "-m", "audiostory_ensemble.serving.triton_server", "--model-repository", str(repo),
               "--http-port", str(self.ports[0]), "--grpc-port", str(self.ports[1]),
               "--metrics-port", str(self.ports[2]), "--log", str(log_dir / "supervised_server.log"), *extra]
        self.tree = ProcessTree(cmd, log_dir / "supervised_launcher.log", env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.grpc_url = f"127.0.0.1:{self.ports[1]}"
        wait_for(self.ready, timeout=120, interval=0.2, what="the supervised server to be ready")
        # Triton answers ready before the launcher is done starting (its supervisor's first look).
        wait_for(lambda: "ready: gRPC" in Path(self.tree.log).read_text(), timeout=60, interval=0.2,
                 what="the launcher to say it is ready")

    def ready(self) -> bool:
        if self.tree.poll() is not None:
            raise AssertionError(f"launcher exited {self.tree.poll()}: {Path(self.tree.log).read_text()[-2000:]}")
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.ports[0]}/v2/health/ready", timeout=2).status == 200
        except OSError:
            return False

    @property
    def server_pid(self) -> int:
        (pid,) = [p for p in children(self.tree.proc.pid) if "tritonserver" in Path(f"/proc/{p}/cmdline").read_text()]
        return pid

    def stub_pid(self) -> int:
        (pid,) = [p for p in children(self.server_pid) if "stack_info" in Path(f"/proc/{p}/cmdline").read_text()]
        return pid

    def infer(self) -> dict:
        client = grpcclient.InferenceServerClient(self.grpc_url)
        query = grpcclient.InferInput("QUERY", [1], "BYTES")
        query.set_data_from_numpy(np.array([b"ping"], dtype=np.object_))
        try:
            return json.loads(client.infer("stack_info", [query]).as_numpy("INFO")[0])
        finally:
            client.close()

    def board_path(self) -> Path:
        (path,) = [line.split("=", 1)[1] for line in
                   Path(f"/proc/{self.server_pid}/environ").read_bytes().decode().split("\0")
                   if line.startswith(stages.ENV + "=")]
        return Path(path)

    def board(self) -> dict:
        return json.loads(self.board_path().read_text())


def test_a_dead_stub_is_reloaded_and_a_crash_loop_ends_the_launcher_with_status_3(repository, test_build_dir):
    launcher = Launcher(repository, test_build_dir, "--max-restarts", "1", "--restart-window", "600")
    tree = [launcher.tree.proc.pid, *descendants(launcher.tree.proc.pid)]
    try:
        assert launcher.infer()["echo"] == "ping"
        first = launcher.stub_pid()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: not launcher.ready(), timeout=10, interval=0.05, what="readiness to drop")
        wait_for(launcher.ready, timeout=60, interval=0.2, what="the stage to be reloaded")
        assert launcher.stub_pid() != first and launcher.infer()["echo"] == "ping"
        assert launcher.board()["stack_info"]["restarts"] == 1 and launcher.board()["stack_info"]["state"] == "up"
        board_dir = launcher.board_path().parent
        os.kill(launcher.stub_pid(), signal.SIGKILL)        # the second death within the window: give up
        assert launcher.tree.proc.wait(60) == 3
        assert "giving up: stage stack_info died 2 times" in Path(launcher.tree.log).read_text()
        wait_for(lambda: not [p for p in tree if start_time(p) is not None], timeout=30, what="no process left")
        assert not board_dir.exists()
    finally:
        launcher.tree.stop()


def test_a_server_that_dies_ends_the_launcher_with_status_1_and_a_signal_with_0(repository, test_build_dir):
    """The launcher exits 1 and nothing of the server is left: not even a stub that cannot exit by
    itself (``gauge_loop`` waits for ever on the dead server's answer to a metric set, holding the
    GIL), nor its shared memory."""
    shutil.copytree(FIXTURES / "gauge_loop", repository / "gauge_loop")
    launcher = Launcher(repository, test_build_dir)
    tree = [launcher.tree.proc.pid, *descendants(launcher.tree.proc.pid)]
    stuck = [p for p in children(launcher.server_pid) if "gauge_loop" in Path(f"/proc/{p}/cmdline").read_text()]
    shm = shm_mappings(tree)
    assert stuck and shm
    try:
        os.kill(launcher.server_pid, signal.SIGKILL)
        assert launcher.tree.proc.wait(60) == 1
        wait_for(lambda: not [p for p in tree if start_time(p) is not None], timeout=30, what="no process left")
        assert "stopping 1 process(es) the server left" in Path(launcher.tree.log).read_text()
        assert not [p for p in shm if os.path.exists(p)]
    finally:
        launcher.tree.stop()
    launcher = Launcher(repository, test_build_dir)
    try:
        os.kill(launcher.tree.proc.pid, signal.SIGTERM)
        assert launcher.tree.proc.wait(60) == 0
    finally:
        launcher.tree.stop()
