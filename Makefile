# The commands a user types. Everything generated goes under build/ (and the venv under .venv/).
SHELL := /bin/bash
PY := .venv/bin/python
MODEL ?= tiny
PROFILE ?= cpu
ADDRESS ?= 127.0.0.1
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
PYTEST_ARGS ?=

.PHONY: help setup lint test test-all tiny full-random full-size convert export engines repo serve demo web bench bench-orchestration soak perf deploy-check gpu-lock clean

help:
	@echo "make setup       install the venv, Triton 2.51 and perf_analyzer (idempotent)"
	@echo "make demo        tiny model end to end: checkpoint, convert, export, serve, client -> build/demo/story.wav"
	@echo "make test        lint, then the test suite (CPU, tiny model, real tritonserver)"
	@echo "make lint        ruff (pinned in requirements.lock; settings in pyproject.toml)"
	@echo "make tiny        build the tiny checkpoint (official layout) under build/checkpoints/tiny/release"
	@echo "make full-random a full-size release with seeded random weights (17 GiB) in build/checkpoints/full/release"
	@echo "make full-size   the full size end to end here: release, convert, export, repo, three stories served (build/full-size/)"
	@echo "make convert     MODEL=tiny|full: release -> served parts (build/checkpoints/MODEL/converted)"
	@echo "make export      MODEL=tiny|full: dit_step.onnx + vae_decoder.onnx (build/export/MODEL)"
	@echo "make engines     MODEL=full: TensorRT plans from the ONNX graphs (GPU host with TensorRT)"
	@echo "make repo        PROFILE=cpu|gpu MODEL=...: fill the model repository (build/model_repository)"
	@echo "make serve       start Triton on build/model_repository (loopback; ADDRESS/..._PORT to change)"
	@echo "make bench       baseline + concurrency sweep + plot (starts its own server; build/bench/)"
	@echo "make bench-orchestration  what our loop costs per DiT step: null-cost engines, this tree vs a baseline commit"
	@echo "make deploy-check  checks of deploy/: chart renders and validates, Dockerfile lint, compose schema, GPU lock installs"
	@echo "make gpu-lock    resolve requirements-gpu.txt for the GPU image into requirements-gpu.lock (PYTHON312=...)"
	@echo "make web         the web playground on 127.0.0.1:7860 for a running server (URL=host:grpc-port)"
	@echo "make soak        2 x 1,000 short requests, every mode through both front doors: lost/duplicated clips, errors, memory by process"
	@echo "make perf        perf_analyzer sweep against a running server (URL=host:port)"
	@echo "make clean       remove build outputs (keeps the venv and the server)"

setup:
	bash scripts/setup.sh

lint:
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all:
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

tiny:
	$(PY) export/make_tiny_checkpoint.py

# The release folder of MODEL=full is yours to place at build/checkpoints/full/release; `make full-random`
# puts a random-weight one there (never over a release it did not write).
full-random:
	$(PY) export/make_full_random_release.py

full-size:
	$(PY) -m benchmarks.full_size $(FULL_SIZE_ARGS)

convert: $(if $(filter tiny,$(MODEL)),tiny)
	$(PY) export/convert_checkpoint.py --model $(MODEL)

export: convert
	$(PY) export/export_onnx.py --model $(MODEL)

engines:
	$(PY) export/build_engines.py --model $(MODEL)

repo: export
	$(PY) export/make_repo.py --profile $(PROFILE) --model $(MODEL) $(if $(SETTINGS),--settings $(SETTINGS)) $(if $(ENGINES),--engines $(ENGINES))

demo: repo
	$(PY) scripts/demo.py --model $(MODEL)

bench: repo
	$(PY) -m benchmarks.bench_dit_step --model $(MODEL)
	$(PY) -m benchmarks.loadgen --model $(MODEL) --plot $(BENCH_ARGS)

URL ?= 127.0.0.1:8001
web:
	build/web-venv/bin/python -m web --triton-url $(or $(URL),127.0.0.1:8001) --host $(or $(WEB_ADDRESS),127.0.0.1) --port $(or $(WEB_PORT),7860)

bench-orchestration: export
	$(PY) -m benchmarks.orchestration $(BENCH_ARGS)

soak: repo
	$(PY) -m benchmarks.soak $(SOAK_ARGS)

perf:
	$(PY) -m benchmarks.perf_sweep --url $(URL) $(PERF_ARGS)

serve:
	$(PY) -m audiostory_ensemble.serving.triton_server --model-repository build/model_repository \
	  --address $(ADDRESS) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

clean:
	rm -rf build/model_repository build/export build/demo build/checkpoints build/tests

deploy-check:
	build/deploy-venv/bin/python deploy/check.py

# The GPU image's lock (CPython 3.12: pip evaluates markers for the interpreter it runs on), then the
# numpy-2 test venv's lock (this host's python3, from build/deploy-venv) with the image's versions.
PYTHON312 ?= python3.12
LOCK_VENV := build/lock-venv312
gpu-lock:
	@command -v $(PYTHON312) >/dev/null || { echo "make gpu-lock: no $(PYTHON312); give a CPython 3.12: make gpu-lock PYTHON312=/path/to/python3.12" >&2; exit 2; }
	[ -x $(LOCK_VENV)/bin/python ] || $(PYTHON312) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q pip==26.3 packaging==26.4
	$(LOCK_VENV)/bin/python deploy/gpu_lock.py resolve-gpu
	build/deploy-venv/bin/python deploy/gpu_lock.py resolve-numpy2
