#!/usr/bin/env bash
# A separate virtual environment for Flower 1.42 (Ray simulation), used only by
# benchmarks/compare_flower.py: .venv-flower/ next to potluck's .venv/.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv-flower/bin/python ] || "$PY" -m venv .venv-flower
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The pinned CPU build of PyTorch first: an unpinned torch would pull a multi-GB CUDA build.
.venv-flower/bin/python -c "import torch" 2>/dev/null || .venv-flower/bin/pip install -q "torch==2.13.0"
.venv-flower/bin/pip install -q "flwr[simulation]==1.42.*" scikit-learn numpy
.venv-flower/bin/python -c "import flwr, ray, torch; print('flwr', flwr.__version__, 'ray', ray.__version__, 'torch', torch.__version__)"
