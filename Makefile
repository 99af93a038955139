# The README's two commands are `make demo` and `make test`; each works on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
PKG    := $(VENV)/.pkg-installed
CPP_SOURCES := $(shell find cpp -type f 2>/dev/null)

.PHONY: install demo test test-fast lint clean

install: $(PKG)

# Pinned third-party set. torch==2.13.0 is the local CPU wheel; constraints.txt keeps every later
# resolution from replacing it (a newer torch would pull several GB of CUDA wheels).
$(DEPS): requirements.txt requirements-test.txt requirements-stubs.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -r requirements.txt -r requirements-test.txt -c constraints.txt
	$(BIN)/pip install --no-deps -r requirements-stubs.txt -c constraints.txt
	$(BIN)/python -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else 'torch ' + v + ' is not the pinned 2.13.0')"
	touch $@

# javisrt itself, editable, with the C++ sampler built by CMake (no build isolation: nothing may
# resolve a second torch). Rebuilt when setup.py or anything under cpp/ changes.
$(PKG): $(DEPS) setup.py pyproject.toml $(CPP_SOURCES)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(PKG)
	$(BIN)/javisrt demo

test: $(PKG)
	$(BIN)/python -m pytest

test-fast: $(PKG)
	$(BIN)/python -m pytest -m "not slow"

# One directory per call: the repository root is itself the javisrt package, and mypy given several
# top-level folders at once finds their modules under two names.
lint: $(PKG)
	for d in engine runtime export bench kernels; do $(BIN)/python -m mypy $$d || exit 1; done

clean:
	rm -rf build *.egg-info $(VENV) _sampler*.so
