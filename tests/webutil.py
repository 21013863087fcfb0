"""Driving the web playground in headless Chromium (Debian's chromium + chromedriver, Selenium)."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from audiostory_ensemble.triton_server import free_port

ROOT = Path(__file__).resolve().parent.parent


def chromium_paths() -> tuple[str, str]:
    browser = shutil.which("chromium") or "/usr/bin/chromium"
    driver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if not (Path(browser).exists() and Path(driver).exists()):
        raise RuntimeError("chromium and chromedriver are needed: run `make setup`")
    return browser, driver


class WebPage:
    """``python -m web`` on a free loopback port, pointed at a Triton gRPC address."""

    def __init__(self, triton_url: str, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "web", "--triton-url", triton_url, "--port",
                                      str(self.port)], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = 120.0) -> "WebPage":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the web page exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError("the web page did not come up")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,2400", "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)
