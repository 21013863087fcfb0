#!/usr/bin/env bash
# Container start: convert the checkpoint, export ONNX, build TensorRT plans for *this* GPU and
# TensorRT (cached by name in $AUDIOSTORY_CACHE, so a restart on the same GPU skips the build),
# fill the model repository, then exec tritonserver on all interfaces (the container's network is
# the boundary; ports are published by compose / Kubernetes).
set -euo pipefail

: "${AUDIOSTORY_CHECKPOINT:?set AUDIOSTORY_CHECKPOINT to the AudioStory release folder}"
CACHE="${AUDIOSTORY_CACHE:-/cache}"
MODEL="${AUDIOSTORY_MODEL:-full}"
SETTINGS="${AUDIOSTORY_SETTINGS:-}"
mkdir -p "$CACHE"
cd "${AUDIOSTORY_HOME:-/opt/audiostory}"

# The server's allocator, by the rule the server helper follows (audiostory_ensemble/serving/
# allocator.py): jemalloc, which the Triton image ships, preloaded into tritonserver;
# AUDIOSTORY_ALLOCATOR=system keeps glibc's malloc; any other value stops here, before the build.
allocator_env="$(python3 -m audiostory_ensemble.serving.allocator)"

ln -sfn "$CACHE" build

python3 export/convert_checkpoint.py --model "$MODEL" --release "$AUDIOSTORY_CHECKPOINT"
python3 export/export_onnx.py --model "$MODEL"
python3 export/build_engines.py --model "$MODEL"
repo_args=(--profile gpu --model "$MODEL" --out "$CACHE/model_repository")
if [[ -n "$SETTINGS" ]]; then
    repo_args+=(--settings "$SETTINGS")
fi
python3 export/make_repo.py "${repo_args[@]}"

# The allocator, chosen above, for the server and every process it starts.
eval "$allocator_env"

# The APIs that take host paths or change the server stay behind an admin header.
TOKEN="${AUDIOSTORY_ADMIN_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(16))')}"
RESTRICTED="shared-memory,model-repository,trace,logging:audiostory-admin-token=$TOKEN"
exec tritonserver --model-repository "$CACHE/model_repository" \
    --grpc-port 8001 --http-port 8000 --metrics-port 8002 \
    --model-control-mode none --exit-on-error true \
    --grpc-restricted-protocol="$RESTRICTED" --http-restricted-api="$RESTRICTED" "$@"
