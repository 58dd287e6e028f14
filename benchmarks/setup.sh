#!/usr/bin/env bash
# Create the benchmark-only virtualenvs under benchmarks/_work/ (gitignored). Idempotent.
#
#   benchmarks/setup.sh            # all three
#   benchmarks/setup.sh img2dataset
#
# venv-img2dataset  img2dataset (+ OpenCV) for the URL-mode comparison, kept apart from .venv
# venv-stock        stock Pillow + OpenCV + numpy: the "before" side of the ceiling / resize benchmarks
# venv-simd         Pillow-SIMD (scripts/install-pillow-simd.sh) + OpenCV + numpy
#
# The project's own .venv is not touched here: benchmarks run bin/fetch with it as it is (run
# scripts/install-pillow-simd.sh .venv to measure the fetcher with Pillow-SIMD).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
WORK="$HERE/_work"
PY="${PYTHON:-python3}"
PILLOW_VERSION="${PILLOW_VERSION:-13.0.0}"
mkdir -p "$WORK"
# nginx (the benchmarks' file server) from Debian's packages, when missing and we are root.
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >/dev/null; }
  else
    echo "setup: nginx missing (apt-get install nginx)" >&2
  fi
fi
# The corpus's photographs ship inside scikit-image: the project venv needs it to build the corpus.
MAIN_PY="$ROOT/.venv/bin/python"
if [ -x "$MAIN_PY" ] && ! "$MAIN_PY" -c "import skimage" 2>/dev/null; then
  "$MAIN_PY" -m pip install -q --disable-pip-version-check scikit-image 2>&1 | grep -v "is ignored: it is neither" || true
fi
quiet() { grep -v "is ignored: it is neither" || true; }

targets=("$@")
has() { [ ${#targets[@]} -eq 0 ] && return 0; for t in "${targets[@]}"; do [ "$t" = "$1" ] && return 0; done; return 1; }

if has img2dataset; then
  V="$WORK/venv-img2dataset"
  if ! { [ -x "$V/bin/img2dataset" ] && "$V/bin/python" -c "import img2dataset, cv2" 2>/dev/null; }; then
    "$PY" -m venv "$V"
    "$V/bin/pip" install -q --disable-pip-version-check img2dataset 2>&1 | quiet
  fi
  echo "venv-img2dataset: img2dataset $("$V/bin/python" -c 'import importlib.metadata as m; print(m.version("img2dataset"))'), OpenCV $("$V/bin/python" -c 'import cv2; print(cv2.__version__)')"
fi

for kind in stock simd; do
  has "$kind" || continue
  V="$WORK/venv-$kind"
  if ! "$V/bin/python" -c "import PIL, numpy, cv2" 2>/dev/null; then
    "$PY" -m venv "$V"
    "$V/bin/pip" install -q --disable-pip-version-check "pillow==$PILLOW_VERSION" numpy opencv-python-headless 2>&1 | quiet
  fi
  if [ "$kind" = simd ]; then
    bash "$ROOT/scripts/install-pillow-simd.sh" "$V" | tail -n 1
  else
    echo "venv-stock: $("$V/bin/python" -c 'import PIL; print("Pillow", PIL.__version__)')"
  fi
done
