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

.PHONY: help setup test test-all serve clean

help:
	@echo "make setup       install the venv, Triton 2.51 and perf_analyzer (idempotent)"
	@echo "make test        run the test suite (CPU, tiny model, real tritonserver)"
	@echo "make serve       start Triton on build/model_repository (loopback; ADDRESS/..._PORT to change)"
	@echo "make clean       remove build outputs (keeps the venv and the server)"

setup:
	bash scripts/setup.sh

test:
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all:
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

serve:
	$(PY) -m audiostory_ensemble.triton_server --model-repository build/model_repository \
	  --address $(ADDRESS) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

clean:
	rm -rf build/model_repository build/export build/demo build/checkpoints build/tests
