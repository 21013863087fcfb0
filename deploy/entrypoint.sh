#!/usr/bin/env bash
# Container start: convert the checkpoint, export ONNX, build TensorRT plans for *this* GPU and
# TensorRT (cached by name in $AUDIOSTORY_CACHE, so a restart on the same GPU skips the build),
# fill the model repository, then exec the server helper (`make serve`'s command), which runs the
# image's tritonserver on all interfaces (the container's network is the boundary; ports are
# published by compose / Kubernetes) under its supervisor: a stage whose process dies is reloaded,
# and the helper exits non-zero when the server dies or a stage crash-loops, for the orchestrator
# to restart the container.
set -euo pipefail

: "${AUDIOSTORY_CHECKPOINT:?set AUDIOSTORY_CHECKPOINT to the AudioStory release folder}"
CACHE="${AUDIOSTORY_CACHE:-/cache}"
MODEL="${AUDIOSTORY_MODEL:-full}"
SETTINGS="${AUDIOSTORY_SETTINGS:-}"
mkdir -p "$CACHE"
cd "${AUDIOSTORY_HOME:-/opt/audiostory}"

# The server's allocator (audiostory_ensemble/serving/allocator.py; the server helper applies it):
# jemalloc, which the Triton image ships, preloaded into tritonserver; AUDIOSTORY_ALLOCATOR=system
# keeps glibc's malloc; any other value stops here, before the build.
python3 -m audiostory_ensemble.serving.allocator >/dev/null

ln -sfn "$CACHE" build

python3 export/convert_checkpoint.py --model "$MODEL" --release "$AUDIOSTORY_CHECKPOINT"
python3 export/export_onnx.py --model "$MODEL"
python3 export/build_engines.py --model "$MODEL"
repo_args=(--profile gpu --model "$MODEL" --out "$CACHE/model_repository")
if [[ -n "$SETTINGS" ]]; then
    repo_args+=(--settings "$SETTINGS")
fi
python3 export/make_repo.py "${repo_args[@]}"

# The helper keeps the APIs that take host paths or change the server (the repository API its
# supervisor reloads stages with, among them) behind the admin header (AUDIOSTORY_ADMIN_TOKEN, or a
# random token per start); extra arguments go to tritonserver.
exec python3 -m audiostory_ensemble.serving.triton_server --model-repository "$CACHE/model_repository" \
    --triton-home /opt/tritonserver --address 0.0.0.0 --log - \
    --grpc-port 8001 --http-port 8000 --metrics-port 8002 -- "$@"
