"""Shared fixtures. Servers and engines are started once per session and shared."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TEST_BUILD = ROOT / "build" / "tests"


@pytest.fixture(scope="session")
def test_build_dir() -> Path:
    TEST_BUILD.mkdir(parents=True, exist_ok=True)
    return TEST_BUILD
