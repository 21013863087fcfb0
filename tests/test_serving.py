"""The clip record, story assembly and the process guard (no server needed)."""
import numpy as np
import pytest

from audiostory_ensemble.pipeline.records import ClipMeta
from audiostory_ensemble.pipeline.request import parse_request
from audiostory_ensemble.pipeline.stitch import StoryAssembler


def test_clip_meta_round_trip():
    meta = ClipMeta("r1", 2, "a dog barks – twice", 33.3, 16.7, 16.7, True, 4.0, 7, 50)
    assert ClipMeta.decode(meta.encode()) == meta


def test_story_assembler_orders_by_index_and_checks_completeness():
    story = StoryAssembler()
    clip = lambda n: np.ones((2, n), np.float32)
    story.add(1, "b", clip(32000 * 4), 5.0, 4.0, True)
    with pytest.raises(ValueError, match=r"clips \[0\] of 2 never arrived"):
        story.finish()
    story.add(0, "a", clip(32000 * 8), 0.0, 5.0, False)
    out = story.finish()
    assert out.captions == ["a", "b"]
    assert out.audio.shape == (2, 32000 * 8 + 32000 * 4 - 96000)
    with pytest.raises(ValueError, match="arrived twice"):
        story.add(0, "a", clip(10), 0.0, 1.0, False)


def test_story_without_a_last_clip_ends_at_the_highest_index_once_the_stream_ended():
    story = StoryAssembler()
    story.add(0, "a", np.ones((2, 32000 * 8), np.float32), 0.0, 5.0, False)
    with pytest.raises(ValueError, match="no last clip"):
        story.finish(stream_ended=False)
    assert story.finish(stream_ended=True).captions == ["a"]


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_guard_kills_engine_processes_when_the_stub_is_killed():
    """A process started from a helper thread (as vLLM engines are, from the loop thread) must not
    outlive its parent after a SIGKILL."""
    import os
    import subprocess
    import sys
    import time

    shm = f"/dev/shm/audiostory_guard_test_{os.getpid()}"
    engine = ("import mmap, time\n"
              f"f = open({shm!r}, 'w+b'); f.truncate(4096); m = mmap.mmap(f.fileno(), 4096)\n"
              "print('mapped', flush=True); time.sleep(300)\n")
    code = (
        "import subprocess, sys, threading, time\n"
        "from audiostory_ensemble.runtime.processes import guard_children\n"
        "procs = []\n"
        f"t = threading.Thread(target=lambda: procs.append(subprocess.Popen([sys.executable, '-c', {engine!r}], "
        "stdout=subprocess.PIPE)))\n"
        "t.start(); t.join()\n"
        "procs[0].stdout.readline()\n"
        "guard_children()\n"
        "print(procs[0].pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert _alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 60
    while (_alive(child) or os.path.exists(shm)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
    assert not os.path.exists(shm), "the engine's shared memory was left behind"


def test_a_planned_clip_record_has_the_render_length_and_fades_of_its_mode():
    """One builder for every mode: a story's clips render the 3 s tail except the last; a script's
    clips take theirs from the timeline (a touching segment's tail, none after a gap)."""
    import numpy as np

    from audiostory_ensemble.llm.planner import PlannedClip
    from audiostory_ensemble.pipeline import script

    def planned(i, d, last, sc=None):
        return PlannedClip(i, "c", d, d, 0.0, last, np.zeros((1, 1)), np.zeros((1, 1)), script=sc)

    story = parse_request(lambda name: {"INSTRUCTION": np.array([b"rain"], dtype=object)}.get(name))
    first, last = (ClipMeta.of_planned(planned(0, 12.5, False), story, "r", 0.0, "k"),
                   ClipMeta.of_planned(planned(1, 7.25, True), story, "r", 0.0, "k"))
    assert (first.render_s, last.render_s) == (15.5, 7.25)
    assert not (first.fade_in or first.fade_out) and first.timeline_s == 0.0 and first.mode == "story"
    raw = ('[{"start": 1, "end": 5, "caption": "a"}, {"start": 5, "end": 9, "caption": "b"}, '
           '{"start": 10, "end": 11, "caption": "c"}]')
    params = parse_request(lambda name: {"SEGMENTS": np.array([raw.encode()], dtype=object)}.get(name))
    clips = script.plan_clips(params.segments)
    metas = [ClipMeta.of_planned(planned(c.index, c.duration_s, c.index == 2, c), params, "r", 0.0, "k") for c in clips]
    assert [m.render_s for m in metas] == [7.0, 4.0, 1.0]
    assert [(m.fade_in, m.fade_out) for m in metas] == [(False, True), (True, False), (False, False)]
    assert all(m.timeline_s == 11.0 and m.mode == "script" for m in metas)
