"""deploy/gpu_lock.py's install check catches what would break the image's `docker build`: each
case is a small lock with one planted drift, checked like requirements-gpu.lock (pip dry run with
the image's Python and platform tags, then the dependencies for the image's markers). The real
lock is checked by `make deploy-check` (tests/test_deploy.py)."""
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_PY = ROOT / "build" / "deploy-venv" / "bin" / "python"

# requirements, lock, numpy-2 lock (or None), what the check must say ("" = passes)
CASES = {
    "a pin with no wheel for the image's Python": (
        "numpy", "numpy==1.25.2", None, "pip cannot install"),          # 1.25 has no cp312 wheels
    "a pin that does not exist": (
        "numpy", "numpy==1.99.0", None, "pip cannot install"),
    "numpy 1 under an opencv that needs numpy 2": (
        "opencv-python-headless", "opencv-python-headless==5.0.0.93\nnumpy==1.26.4", None,
        "opencv-python-headless 5.0.0.93 needs numpy>=2"),
    "a requirement the lock no longer meets": (
        "numpy<2", "numpy==2.3.5", None, "req.txt needs numpy<2, the lock pins numpy==2.3.5"),
    "a dependency missing from the lock": (
        "opencv-python-headless", "opencv-python-headless==5.0.0.93", None, "numpy (needed by opencv-python-headless"),
    "a pin nothing needs": (
        "numpy", "numpy==2.3.5\nsix==1.17.0", None, "six==1.17.0 is pinned but nothing needs it"),
    "not an exact pin": (
        "numpy", "numpy>=2", None, "not an exact pin"),
    # blake3 needs typing-extensions only below Python 3.12: the image's markers decide, not the
    # checker's own Python (3.11 here).
    "the image's markers, not the checker's": (
        "blake3", "blake3==1.0.11", None, ""),
    "a pin only the checker's Python would need": (
        "blake3", "blake3==1.0.11\ntyping-extensions==4.16.0", None, "typing-extensions==4.16.0 is pinned but nothing"),
    "a numpy-2 venv that tests another numpy than the image's": (
        "numpy", "numpy==2.3.5", "numpy==2.2.6\npytest==9.2.0", "pins numpy==2.2.6, the image has numpy==2.3.5"),
}


def run_check(tmp_path: Path, requirements: str, lock: str, numpy2: str | None) -> dict:
    assert DEPLOY_PY.exists(), "build/deploy-venv is missing: run `make setup`"
    (tmp_path / "req.txt").write_text(requirements + "\n")
    (tmp_path / "gpu.lock").write_text("# planted\n" + lock + "\n")
    numpy2_arg = "none"
    if numpy2 is not None:
        (tmp_path / "numpy2.lock").write_text(numpy2 + "\n")
        numpy2_arg = str(tmp_path / "numpy2.lock")
    proc = subprocess.run([str(DEPLOY_PY), str(ROOT / "deploy" / "gpu_lock.py"), "check", "--lock",
                           str(tmp_path / "gpu.lock"), "--requirements", str(tmp_path / "req.txt"),
                           "--numpy2-lock", numpy2_arg], capture_output=True, text=True, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == (1 if result["errors"] else 0), proc.stderr[-2000:]
    return result


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_install_check_catches_a_drifted_lock(case, tmp_path):
    requirements, lock, numpy2, expect = CASES[case]
    result = run_check(tmp_path, requirements, lock, numpy2)
    if not expect:
        assert result["errors"] == [], result
    else:
        assert any(expect in e for e in result["errors"]), result
