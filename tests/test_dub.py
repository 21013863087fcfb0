"""Dubbing on the client side without a server: subtitles -> script by the stated rules, and the
FFmpeg side (length, stream copy, mix, kept tracks) on media the tests make themselves. The served
path (the CLI against a real server, the web page) is in test_e2e.py."""
import json
import subprocess

import numpy as np
import pytest

from client.dub import DubError, mix, mux, probe
from client.subtitles import CueRules, SubtitleError, caption_of, read_cues, script_from_cues, script_from_file

# Cues as SDH tracks write them: capitals, speaker labels, dialogue dashes, a description inside a
# dialogue cue, a repeated description that overlaps, a cue too short, lyrics, two descriptions in
# one cue, an overlap with another sound, a cue after the video's end.
SRT = """1
00:00:00,500 --> 00:00:02,000
[DOOR CREAKS OPEN]

2
00:00:01,200 --> 00:00:03,000
JOHN: Who's there?

3
00:00:02,500 --> 00:00:05,000
(dog barking)
- Quiet, Rex!

4
00:00:04,000 --> 00:00:06,500
[dog barking]

5
00:00:06,500 --> 00:00:06,800
[door slams]

6
00:00:07,000 --> 00:00:07,300
\u266a la la la \u266a

7
00:00:08,250 --> 00:00:12,000
[thunder rumbling] [rain]

8
00:00:11,000 --> 00:00:14,000
<i>[wind howls]</i>

9
00:00:20,000 --> 00:00:22,000
[birds chirping]
"""
SRT_LINES = [2, 6, 10, 15, 19, 23, 27, 31, 35]      # the timing lines above

VTT = """WEBVTT

NOTE made by the tests: the same cues as the SRT, WebVTT style

door
00:00.500 --> 00:02.000 align:start position:10%
[DOOR CREAKS OPEN]

00:01.200 --> 00:03.000
<v John>Who's there?</v>

00:02.500 --> 00:05.000
(dog barking)
- Quiet, Rex!

00:04.000 --> 00:06.500
[dog barking]

00:06.500 --> 00:06.800
[door slams]

00:07.000 --> 00:07.300
\u266a la la la \u266a

00:08.250 --> 00:12.000
[thunder rumbling] [rain]

00:11.000 --> 00:14.000
<i>[wind howls]</i>

00:00:20.000 --> 00:00:22.000
[birds chirping]
"""
VTT_LINES = [6, 9, 12, 16, 19, 22, 25, 28, 31]

LENGTH = 13.5   # the video's length: cue 9 starts after it, cue 8 ends after it

DEFAULT = [{"start": 0.5, "end": 2.0, "caption": "door creaks open"},
           {"start": 2.5, "end": 6.5, "caption": "dog barking"},                 # cues 3 + 4: same sound
           {"start": 6.5, "end": 7.5, "caption": "door slams"},                  # 0.3 s widened to 1 s
           {"start": 8.25, "end": 13.5, "caption": "thunder rumbling, rain, wind howls"}]   # merged, cut at the end


@pytest.fixture(params=["srt", "vtt"])
def subtitles(request, tmp_path):
    path = tmp_path / f"sdh.{request.param}"
    path.write_text(SRT if request.param == "srt" else VTT, encoding="utf-8")
    return path, (SRT_LINES if request.param == "srt" else VTT_LINES)


def test_cues_are_read_with_their_timing_lines(subtitles):
    path, lines = subtitles
    cues = read_cues(path)
    assert [c.line for c in cues] == lines
    assert [(c.start, c.end) for c in cues][:2] == [(0.5, 2.0), (1.2, 3.0)]
    assert cues[7].text == "[wind howls]"          # formatting tags removed


def test_the_default_rules_give_exactly_the_stated_script(subtitles):
    path, lines = subtitles
    script = script_from_file(path, LENGTH)
    assert script.segments == DEFAULT
    assert script.lines == [[lines[0]], [lines[2], lines[3]], [lines[4]], [lines[6], lines[7]]]
    reasons = {d.line: d.reason for d in script.dropped}
    assert set(reasons) == {lines[1], lines[5], lines[8]}
    assert reasons[lines[1]].startswith("dialogue only")
    assert reasons[lines[5]].startswith("music only")
    assert "after the video's end" in reasons[lines[8]]


def test_each_option_changes_what_its_rule_says(subtitles):
    path, _ = subtitles
    clip = script_from_file(path, LENGTH, CueRules(overlap="clip")).segments
    assert clip == DEFAULT[:3] + [{"start": 8.25, "end": 11.0, "caption": "thunder rumbling, rain"},
                                  {"start": 11.0, "end": 13.5, "caption": "wind howls"}]
    assert script_from_file(path, LENGTH, CueRules(short="drop")).segments == DEFAULT[:2] + DEFAULT[3:]
    wide = script_from_file(path, LENGTH, CueRules(min_duration_s=2.0)).segments
    assert wide[1:3] == [DEFAULT[1], {"start": 6.5, "end": 8.25, "caption": "door slams"}]   # up to the next cue
    assert wide[0] == {"start": 0.5, "end": 2.5, "caption": "door creaks open"}   # 1.5 s, to the next cue
    talk = script_from_file(path, LENGTH, CueRules(dialogue=True)).segments
    assert talk[0] == {"start": 0.5, "end": 6.5, "caption": 'door creaks open, someone says "Who\'s there?", '
                                                            'dog barking, someone says "Quiet, Rex!"'}
    sung = script_from_file(path, LENGTH, CueRules(music=True)).segments
    assert {"start": 7.0, "end": 8.0, "caption": 'singing "la la la"'} in sung
    assert sung[2] == {"start": 6.5, "end": 7.0, "caption": "door slams"}   # widened only up to the song


def test_a_short_cue_widens_backwards_when_the_next_one_is_close():
    cues = read_cues(text="1\n00:00:01,000 --> 00:00:03,000\n[rain]\n\n2\n00:00:04,000 --> 00:00:04,200\n"
                          "[bang]\n\n3\n00:00:04,500 --> 00:00:06,000\n[wind]\n")
    segs = script_from_cues(cues, 6.0).segments
    assert segs[1] == {"start": 3.5, "end": 4.5, "caption": "bang"}
    squeezed = read_cues(text="1\n00:00:01,000 --> 00:00:02,000\n[a]\n\n2\n00:00:02,000 --> 00:00:02,050\n[b]\n\n"
                              "3\n00:00:02,050 --> 00:00:03,000\n[c]\n")
    script = script_from_cues(squeezed, 3.0)
    assert [s["caption"] for s in script.segments] == ["a", "c"]
    assert script.dropped[0].line == 6 and "no room" in script.dropped[0].reason


@pytest.mark.parametrize("text, caption", [
    ("[THUNDER RUMBLING]", "thunder rumbling"),
    ("[Door creaks] (footsteps)", "Door creaks, footsteps"),
    ("MAN 2: (whispering) Come here.", "whispering"),
    (">> [applause]", "applause"),
    ("- [glass shatters]\n- What was that?", "glass shatters"),
    ("[\u266a\u266a\u266a]", None),
    ("Hello.", None),
    ("", None),
])
def test_captions_follow_the_sdh_conventions(text, caption):
    assert caption_of(text)[0] == caption


def test_a_cue_the_server_would_refuse_is_named_by_its_line(tmp_path):
    bad = tmp_path / "bad.srt"
    bad.write_text("1\n00:00:01,000 --> 00:00:02,000\n[rain]\n\n2\n00:00:03,000 --> 00:00:05,000\n"
                   "[<|im_end|> explosion]\n", encoding="utf-8")
    with pytest.raises(SubtitleError,
                       match=r"line 6: SEGMENTS\[1\]\.caption must not contain the model's control token"):
        script_from_file(bad, 10.0)
    many = "".join(f"{i + 1}\n00:{i // 60:02d}:{i % 60:02d},000 --> 00:{i // 60:02d}:{i % 60:02d},500\n[tick {i}]\n\n"
                   for i in range(70))
    with pytest.raises(SubtitleError, match="70 segments; the limit is 64"):
        script_from_cues(read_cues(text=many), 80.0, CueRules(min_duration_s=0.5))
    with pytest.raises(SubtitleError, match="no cue describes a sound"):
        script_from_cues(read_cues(text="1\n00:00:01,000 --> 00:00:02,000\nHello.\n"), 5.0)
    (tmp_path / "junk.srt").write_bytes(b"\x00\x01 not subtitles")
    with pytest.raises(SubtitleError, match="junk.srt"):
        script_from_file(tmp_path / "junk.srt", 5.0)


# ---- FFmpeg: media made here ------------------------------------------------------------------------

SR_IN = 44100


def make_video(path, seconds: float, *, audio: np.ndarray | None = None, codec: str = "libx264"):
    """A test-pattern video (``seconds`` at 25 fps) with ``audio`` (int16 ``[T, 2]`` at 44.1 kHz)
    as a FLAC track when given."""
    args = ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=size=128x96:rate=25:duration={seconds}"]
    if audio is not None:
        args += ["-f", "s16le", "-ar", str(SR_IN), "-ac", "2", "-i", "-", "-c:a", "flac"]
    vcodec = ["-c:v", "libx264", "-preset", "ultrafast"] if codec == "libx264" else ["-c:v", codec, "-b:v", "200k"]
    subprocess.run(args + vcodec + [str(path)], input=None if audio is None else audio.tobytes(), check=True)
    return path


def stream_hash(path, spec: str) -> str:
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", spec, "-c", "copy", "-f", "streamhash",
                           "-hash", "md5", "-"], capture_output=True, text=True, check=True).stdout


def decoded(path, spec: str = "0:a:0") -> np.ndarray:
    """An audio track as float32 [2, T] at its own rate."""
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-map", spec, "-f", "f32le", "-"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, dtype="<f4").reshape(-1, 2).T


def audio_streams(path) -> list[dict]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a", "-show_entries",
                          "stream=codec_name,sample_rate:stream_tags=title", "-of", "json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)["streams"]


@pytest.fixture(scope="module")
def original():
    t = np.arange(int(4.3 * SR_IN)) / SR_IN
    tone = np.stack([0.3 * np.sin(2 * np.pi * 330 * t), 0.2 * np.sin(2 * np.pi * 550 * t)], axis=1)
    return np.round(tone * 32767).astype("<i2")


def test_mux_copies_the_video_and_writes_the_audio_as_given(tmp_path, original):
    video = make_video(tmp_path / "in.mkv", 4.3, audio=original)
    info = probe(video)
    assert abs(info.duration_s - 4.32) < 1e-6 and info.audio_streams == 1 and info.audio_channels == 2
    story = (np.random.default_rng(0).standard_normal((2, round(info.duration_s * 32000))) * 0.1).astype(np.float32)
    out = mux(video, story, tmp_path / "out.mkv", audio_codec="pcm_f32le", info=info)
    assert stream_hash(out, "0:v") == stream_hash(video, "0:v")
    assert [s["codec_name"] for s in audio_streams(out)] == ["pcm_f32le"]
    np.testing.assert_array_equal(decoded(out), story)

    kept = mux(video, story, tmp_path / "kept.mkv", keep_audio=True, audio_codec="pcm_f32le", info=info)
    streams = audio_streams(kept)
    assert [s["codec_name"] for s in streams] == ["flac", "pcm_f32le"]
    assert streams[1]["tags"]["title"] == "AudioStory"
    assert stream_hash(kept, "0:a:0") == stream_hash(video, "0:a:0")
    np.testing.assert_array_equal(decoded(kept, "0:a:1"), story)


def test_the_mix_is_the_story_plus_the_original_at_the_gain(tmp_path, original):
    from audiostory_ensemble.model.post import resample
    from client.dub import original_audio

    video = make_video(tmp_path / "in.mkv", 4.3, audio=original)
    info = probe(video)
    n = round(info.duration_s * 32000)
    story = (np.random.default_rng(1).standard_normal((2, n)) * 0.1).astype(np.float32)
    under = resample((original.T / 32768.0).astype(np.float32), SR_IN, 32000)
    expected = np.zeros((2, n), np.float32)
    expected[:, :under.shape[1]] = under[:, :n]
    got = original_audio(video, info, n)
    assert np.abs(got - expected).max() < 1e-6
    np.testing.assert_allclose(mix(story, got, -6.0), story + 10 ** (-6 / 20) * expected, atol=1e-6)


def test_a_video_without_audio_cannot_keep_or_mix_it(tmp_path):
    video = make_video(tmp_path / "silent.webm", 2.0, codec="libvpx")
    with pytest.raises(DubError, match="no audio track to keep"):
        mux(video, np.zeros((2, 64000), np.float32), tmp_path / "o.webm", keep_audio=True)
    with pytest.raises(DubError, match="no such file"):
        probe(tmp_path / "missing.mkv")
    (tmp_path / "notvideo.mkv").write_text("hello")
    with pytest.raises(DubError, match="ffprobe"):
        probe(tmp_path / "notvideo.mkv")


def test_the_command_line_derives_checks_and_refuses_before_any_server_call(tmp_path, capsys):
    from client.__main__ import main as client_main

    video = make_video(tmp_path / "film.webm", 13.5, codec="libvpx")
    (tmp_path / "sdh.srt").write_text(SRT, encoding="utf-8")
    nobody = ["--url", "127.0.0.1:9"]           # nothing listens there: a call would fail otherwise
    assert client_main(["dub", str(video), "--subtitles", str(tmp_path / "sdh.srt"), "-o", str(tmp_path / "o.webm"),
                        "--dry-run", *nobody]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out[out.index("["):]) == DEFAULT[:3] + [{**DEFAULT[3], "end": 13.52}]   # 13.52 s of video
    assert "dropped cue at line 6: dialogue only" in err and "dropped cue at line 35" in err
    (tmp_path / "late.json").write_text(json.dumps([{"start": 1.0, "end": 14.0, "caption": "rain"}]))
    assert client_main(["dub", str(video), "--script", str(tmp_path / "late.json"), "-o", str(tmp_path / "o.webm"),
                        *nobody]) == 2
    assert "SEGMENTS[0].end is 14.0 s; the story limit is 13.52 s" in capsys.readouterr().err
    (tmp_path / "bad.srt").write_text("1\n00:00:01,000 --> 00:00:03,000\n[<|gen|>]\n", encoding="utf-8")
    assert client_main(["dub", str(video), "--subtitles", str(tmp_path / "bad.srt"), "-o", str(tmp_path / "o.webm"),
                        *nobody]) == 2
    assert "bad.srt: cue at line 2: SEGMENTS[0].caption must not contain" in capsys.readouterr().err
    assert client_main(["dub", str(video), "--subtitles", str(tmp_path / "sdh.srt"), "-o", str(tmp_path / "o.webm"),
                        "--mix", "-6", *nobody]) == 1
    assert "has no audio track to mix under the story" in capsys.readouterr().err
