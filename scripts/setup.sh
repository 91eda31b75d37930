#!/usr/bin/env bash
# Set up potluck on a fresh machine: Fashion-MNIST (Debian package), a virtual environment,
# the pinned CPU build of PyTorch, and potluck itself. Pass --dev for the test tools (and Ray,
# which the Ray engine's tests need, MLflow and TensorBoard, which the export tests need, and
# TenSEAL on Linux and Windows, which the homomorphic aggregation's tests need), --he for
# TenSEAL (transform ckks), --opacus for Opacus 1.6 (the DP-SGD benchmark's peer).
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=0; OPACUS=0; HE=0
for arg in "$@"; do
  case "$arg" in
    --dev) DEV=1 ;;
    --opacus) OPACUS=1 ;;
    --he) HE=1 ;;
    *) echo "usage: scripts/setup.sh [--dev] [--he] [--opacus]" >&2; exit 2 ;;
  esac
done

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ -z "${POTLUCK_DATA:-}" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "warning: Fashion-MNIST not found; install Debian's dataset-fashion-mnist or set POTLUCK_DATA" >&2
  fi
fi

# the dashboard's browser tests drive Debian's chromium (Playwright cannot download its own)
if [ "$DEV" = 1 ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q "torch==2.13.0"
EXTRAS=""
[ "$DEV" = 1 ] && EXTRAS="dev,ray,export,dashboard"
[ "$HE" = 1 ] && EXTRAS="${EXTRAS:+$EXTRAS,}he"
if [ -n "$EXTRAS" ]; then
  .venv/bin/pip install -q -e ".[$EXTRAS]"
else
  .venv/bin/pip install -q -e .
fi
if [ "$OPACUS" = 1 ]; then
  # After torch: with torch present pip keeps it (opacus needs torch>=2.6); installed first,
  # opacus would pull a CUDA build. Checked: the torch build is the same before and after.
  before=$(.venv/bin/python -c "import torch; print(torch.__version__)")
  .venv/bin/pip install -q -e ".[opacus]"
  after=$(.venv/bin/python -c "import torch; print(torch.__version__)")
  if [ "$before" != "$after" ]; then
    echo "error: installing opacus replaced torch $before by $after" >&2; exit 1
  fi
fi
