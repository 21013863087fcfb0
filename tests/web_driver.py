"""Drive the web playground in headless Chromium (run with the web venv's python).

    python tests/web_driver.py --triton-url HOST:PORT --instruction "..." --total 20 --steps 4 \
        [--segments JSON] [--audio FILE] --screenshot build/tests/web_playground.png
    python tests/web_driver.py --triton-url HOST:PORT --dub-video V.webm --dub-subtitles S.srt --steps 2 \
        --screenshot build/tests/web_dub.png

Starts `python -m web` on a free loopback port, submits the form, waits for the story, and prints
one JSON line: status text, the captions shown in the clip players, the story player's length
label, the downloaded WAV's length in samples, and when the live player (the ordered story as it
streams) started playing and what the status said then. With ``--dub-video`` it opens the Dubbing tab
instead, uploads the video and subtitles, and prints the status, the cue and plan tables' rows, and
the dubbed video element's duration and whether it plays.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from audiostory_ensemble.serving.triton_server import free_port


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,2400", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


# The live player (the ordered story, streamed): when it first plays, and what the status said then
# (which clips had landed). It is muted: headless Chromium has no sound card to wait for.
LIVE_PROBE = """
    const live = window.__live = {playing: null, status_at_play: null, seconds_played: 0, errors: []};
    const status = () => (document.querySelector('#status') || {}).textContent || '';
    const t0 = performance.now();
    const timer = setInterval(() => {
        const a = document.querySelector('#live audio');
        if (!a) return;
        a.muted = true;
        if (a.error) live.errors.push(String(a.error.code));
        if (a.currentTime > 0 && !a.paused && live.playing === null) {
            live.playing = (performance.now() - t0) / 1000;
            live.status_at_play = status().trim();
        }
        live.seconds_played = Math.max(live.seconds_played, a.currentTime);
    }, 50);
"""


def table_rows(d, css) -> list[list[str]]:
    """A gradio dataframe's body rows as text (it draws them as ARIA grid rows, in a virtual list)."""
    return d.execute_script("""
        const rows = [...document.querySelectorAll(arguments[0] + ' [role=row][data-index]')];
        rows.sort((a, b) => Number(a.dataset.index) - Number(b.dataset.index));
        return rows.map(r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.textContent.trim()));
    """, css)


def dub(d, element, args) -> dict:
    """The Dubbing tab: upload, dub, then play the dubbed video (muted: headless autoplay rules)."""
    from selenium.webdriver.common.by import By

    tab = next(b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text.strip() == "Dubbing")
    tab.click()
    element("#dub-video input[type=file]").send_keys(str(Path(args.dub_video).resolve()))
    element("#dub-subtitles input[type=file]").send_keys(str(Path(args.dub_subtitles).resolve()))
    box = element("#dub-steps input")
    box.clear()
    box.send_keys(str(args.steps))
    time.sleep(1.0)          # let both uploads land before the click
    element("#dub").click()
    deadline = time.monotonic() + args.timeout
    status = ""
    while time.monotonic() < deadline:
        status = d.find_element(By.CSS_SELECTOR, "#dub-status").text
        if status.startswith("done") or d.find_elements(By.CSS_SELECTOR, ".toast-body"):
            break
        time.sleep(0.5)
    errors = [t.text for t in d.find_elements(By.CSS_SELECTOR, ".toast-body")]
    video = {}
    end = time.monotonic() + 60
    while status.startswith("done") and time.monotonic() < end:
        video = d.execute_async_script("""
            const done = arguments[arguments.length - 1];
            const v = document.querySelector('#dubbed video');
            if (!v || !(v.duration > 0)) { done({}); return; }
            v.muted = true;
            v.play().then(() => setTimeout(() => done({duration: v.duration, time: v.currentTime,
                                                      paused: v.paused, error: v.error && v.error.code}), 1500),
                          (e) => done({duration: v.duration, error: String(e)}));
        """)
        if video:
            break
        time.sleep(0.5)
    Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
    d.save_screenshot(args.screenshot)
    return {"status": status, "errors": errors, "cues": table_rows(d, "#dub-cues"),
            "plan": table_rows(d, "#dub-plan"), "video": video}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--triton-url", required=True)
    ap.add_argument("--instruction", default="")
    ap.add_argument("--segments", default="", help="script mode: SEGMENTS JSON typed into the script box")
    ap.add_argument("--audio", default="", help="continuation: an audio file uploaded to the page")
    ap.add_argument("--total", type=float, default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--screenshot", required=True)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--dub-video", default="", help="the Dubbing tab: this video ...")
    ap.add_argument("--dub-subtitles", default="", help="... with these subtitles")
    args = ap.parse_args()
    from selenium.webdriver.common.by import By

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    page = subprocess.Popen([sys.executable, "-m", "web", "--triton-url", args.triton_url, "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = None
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or page.poll() is not None:
                    raise RuntimeError("the web page did not come up")
                time.sleep(0.3)
        d = browser()
        d.get(url)
        deadline = time.monotonic() + 60
        while not d.find_elements(By.CSS_SELECTOR, "#instruction textarea"):
            if time.monotonic() > deadline:
                raise RuntimeError("the form did not render")
            time.sleep(0.2)
        def element(css, timeout=60):
            """The element once the page has rendered it (gradio mounts some inputs late)."""
            end = time.monotonic() + timeout
            while not d.find_elements(By.CSS_SELECTOR, css):
                if time.monotonic() > end:
                    raise RuntimeError(f"{css} did not render within {timeout} s")
                time.sleep(0.2)
            return d.find_element(By.CSS_SELECTOR, css)

        if args.dub_video:
            print(json.dumps(dub(d, element, args)))
            return 0
        if args.instruction:
            d.find_element(By.CSS_SELECTOR, "#instruction textarea").send_keys(args.instruction)
        if args.segments:
            element("#segments textarea").send_keys(args.segments)
        if args.audio:
            element("#input-audio input[type=file]").send_keys(str(Path(args.audio).resolve()))
            deadline = time.monotonic() + 60
            while not d.find_elements(By.CSS_SELECTOR, "#input-audio audio, #input-audio time"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the uploaded audio did not show up")
                time.sleep(0.3)
        for eid, value in (("total", args.total), ("steps", args.steps)):
            if value is None:
                continue
            box = d.find_element(By.CSS_SELECTOR, f"#{eid} input")
            box.clear()
            box.send_keys(str(value))
        d.execute_script(LIVE_PROBE)
        d.find_element(By.CSS_SELECTOR, "#generate").click()
        deadline = time.monotonic() + args.timeout
        status = ""
        while time.monotonic() < deadline:
            status = d.find_element(By.CSS_SELECTOR, "#status").text
            if status.startswith("done") or "rror" in status or d.find_elements(By.CSS_SELECTOR, ".toast-body"):
                break
            time.sleep(0.5)
        time.sleep(1.0)   # let the players render their lengths
        captions = [el.text for el in d.find_elements(By.CSS_SELECTOR, "[id^=clip-] label")
                    if el.is_displayed() and el.text.startswith("clip ")]
        times = [el.text for el in d.find_elements(By.CSS_SELECTOR, "#story time")]
        audio_elements = len(d.find_elements(By.CSS_SELECTOR, "#story audio"))
        link = d.find_elements(By.CSS_SELECTOR, "#download a")
        wav_samples = None
        if link:
            import io

            import soundfile as sf
            data = urllib.request.urlopen(link[0].get_attribute("href"), timeout=30).read()
            wav_samples = sf.info(io.BytesIO(data)).frames
        live = d.execute_script("return window.__live;")
        Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(args.screenshot)
        print(json.dumps({"status": status, "captions": captions, "story_times": times,
                          "story_audio_elements": audio_elements, "wav_samples": wav_samples, "live": live}))
        return 0
    finally:
        if d is not None:
            d.quit()
        page.terminate()
        try:
            page.wait(20)
        except subprocess.TimeoutExpired:
            page.kill()


if __name__ == "__main__":
    sys.exit(main())
