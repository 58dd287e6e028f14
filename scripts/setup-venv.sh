#!/usr/bin/env bash
# Create (or complete) the project's virtualenv: pinned dependencies, then Pillow-SIMD last.
# Usage: scripts/setup-venv.sh [VENV_DIR]   (default .venv). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
# torch/torchvision are pinned to the releases that install here without a multi-GB download
# where a local wheel exists; elsewhere pip fetches them from the registry.
"$VENV/bin/python" -m pip install -q -r requirements.txt
# Pillow-SIMD (faster resize) must come last: any later install of a Pillow dependant
# reinstalls stock Pillow. The script falls back to Pillow where it cannot build.
if [ -f scripts/install-pillow-simd.sh ] && [ "${FASTFETCH_NO_SIMD:-0}" != "1" ]; then
  bash scripts/install-pillow-simd.sh "$VENV" || echo "setup: Pillow-SIMD not installed; using Pillow"
fi
# Byte-compile the package once, as pip does for an installed one (start-up of every run).
"$VENV/bin/python" -m compileall -q fastfetch > /dev/null
"$VENV/bin/python" -c "import PIL, streaming, aiohttp; print('setup: ok, Pillow', PIL.__version__)"
