#!/usr/bin/env bash
# Replace stock Pillow by Pillow-SIMD (a drop-in fork with SSE4/AVX2 resize and colour
# conversion) in a virtualenv, or leave/put back stock Pillow when that cannot be done.
#
#   scripts/install-pillow-simd.sh VENV_DIR          # e.g. scripts/install-pillow-simd.sh .venv
#   scripts/install-pillow-simd.sh --stock VENV_DIR  # go back to stock Pillow
#
# Run it as the LAST install step: Pillow and Pillow-SIMD both own the `PIL` package, so any
# later `pip install` that pulls in Pillow (matplotlib, torchvision, `pip install -r …`)
# silently puts stock Pillow back. Rerun this script afterwards.
#
# Steps: build dependencies (libjpeg-turbo, zlib, libwebp headers; installed with apt-get when
# missing and running as root), CPU flags (AVX2 when /proc/cpuinfo has it, else SSE4; neither →
# stock Pillow), `pip uninstall pillow` then `CC="cc -mavx2" pip install --no-deps pillow-simd`
# built from source, and a check that the result imports, has JPEG, WebP and zlib support and
# round-trips a JPEG and a WebP. Any failure reinstalls the stock Pillow version that was there
# before (or the newest). The last line says which one is active; exit 0 either way unless
# even stock Pillow cannot be restored.
set -uo pipefail

STOCK=0
if [ "${1:-}" = "--stock" ]; then STOCK=1; shift; fi
VENV="${1:-}"
if [ -z "$VENV" ] || [ ! -x "$VENV/bin/python" ]; then
  echo "usage: $0 [--stock] VENV_DIR   (VENV_DIR/bin/python must exist)" >&2
  exit 2
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
log() { echo "install-pillow-simd: $*" >&2; }

dist_version() {  # version of an installed distribution, empty if absent
  "$PY" - "$1" <<'PY' 2>/dev/null
import sys, importlib.metadata as m
try:
    print(m.version(sys.argv[1]))
except m.PackageNotFoundError:
    pass
PY
}

verify() {  # imports, has the codecs the fetcher needs, and round-trips JPEG + WebP
  "$PY" - <<'PY'
import io, sys
from PIL import Image, features
missing = [f for f in ("jpg", "webp", "zlib") if not features.check(f)]
if missing:
    sys.exit(f"missing codecs: {missing}")
im = Image.new("RGB", (640, 480), (200, 30, 60))
for fmt in ("JPEG", "WEBP", "PNG"):
    buf = io.BytesIO()
    im.save(buf, fmt, quality=90) if fmt != "PNG" else im.save(buf, fmt)
    back = Image.open(io.BytesIO(buf.getvalue()))
    back.draft("RGB", (160, 120)) if fmt == "JPEG" else None
    back = back.convert("RGB").resize((320, 240), Image.Resampling.BICUBIC, reducing_gap=None)
    assert back.size == (320, 240), (fmt, back.size)
PY
}

active() {  # which distribution the importable PIL really comes from (both may be registered)
  "$PY" - <<'PY' 2>/dev/null || echo "none (PIL does not import)"
import importlib.metadata as m
import PIL
try:
    simd = m.version("pillow-simd")
except m.PackageNotFoundError:
    simd = None
name = "Pillow-SIMD" if simd is not None and PIL.__version__ == simd else "Pillow (stock)"
print(f"{name} {PIL.__version__}")
PY
}

simd_active() {  # Pillow-SIMD registered, stock Pillow not, and PIL is really Pillow-SIMD's
  [ -n "$(dist_version pillow-simd)" ] && [ -z "$(dist_version pillow)" ] && active | grep -q '^Pillow-SIMD'
}

PREV_PILLOW="$(dist_version pillow)"
restore_stock() {
  log "falling back to stock Pillow ${PREV_PILLOW:-(newest)}"
  "${PIP[@]}" uninstall -y -q pillow-simd pillow >/dev/null 2>&1 || true
  local spec="pillow"
  [ -n "$PREV_PILLOW" ] && spec="pillow==$PREV_PILLOW"
  if ! "${PIP[@]}" install -q --no-deps "$spec"; then
    "${PIP[@]}" install -q --no-deps pillow || { log "could not reinstall Pillow"; echo "active: none"; exit 1; }
  fi
  if ! verify; then log "stock Pillow also fails the codec check"; fi
  echo "active: $(active)"
  exit 0
}

if [ "$STOCK" = 1 ]; then
  [ -z "$(dist_version pillow-simd)" ] && [ -n "$PREV_PILLOW" ] && { echo "active: $(active)"; exit 0; }
  restore_stock
fi

if simd_active && verify >/dev/null 2>&1; then
  log "Pillow-SIMD already installed and working"
  echo "active: $(active)"
  exit 0
fi
if [ -n "$(dist_version pillow-simd)" ]; then
  # Both registered (a later `pip install` put stock Pillow's files over PIL/): start clean.
  log "stock Pillow was installed over Pillow-SIMD: reinstalling Pillow-SIMD"
  "${PIP[@]}" uninstall -y -q pillow pillow-simd >/dev/null 2>&1 || true
  PREV_PILLOW="${PREV_PILLOW:-}"
fi

# -- CPU flags ---------------------------------------------------------------------------------
if grep -q avx2 /proc/cpuinfo 2>/dev/null; then
  CC_FLAGS="-mavx2"
elif grep -q sse4_1 /proc/cpuinfo 2>/dev/null; then
  CC_FLAGS="-msse4"
else
  log "CPU has neither AVX2 nor SSE4 (or not x86): Pillow-SIMD cannot help here"
  [ -n "$PREV_PILLOW" ] && { echo "active: $(active)"; exit 0; }
  restore_stock
fi

# -- build dependencies --------------------------------------------------------------------------
need_pkgs=()
for h in /usr/include/jpeglib.h:libjpeg62-turbo-dev /usr/include/zlib.h:zlib1g-dev /usr/include/webp/decode.h:libwebp-dev; do
  [ -e "${h%%:*}" ] || need_pkgs+=("${h##*:}")
done
command -v cc >/dev/null 2>&1 || need_pkgs+=(gcc)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    log "installing build dependencies: ${need_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${need_pkgs[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${need_pkgs[@]}" >/dev/null 2>&1; } \
      || log "apt-get could not install ${need_pkgs[*]}"
  else
    log "missing build dependencies (${need_pkgs[*]}) and not root: trying anyway"
  fi
fi
PYINC="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
if [ ! -e "$PYINC/Python.h" ]; then
  log "Python headers not found in $PYINC: cannot build Pillow-SIMD"
  [ -n "$PREV_PILLOW" ] && { echo "active: $(active)"; exit 0; }
  restore_stock
fi

# -- build (once per venv and CPU flags; the wheel is kept for reinstalls) and swap ---------------
WHEELS="${PILLOW_SIMD_WHEEL_DIR:-$VENV/.pillow-simd-wheels}/${CC_FLAGS#-m}"
BUILD_LOG="$(mktemp -t pillow-simd-build.XXXXXX.log)"
if ! ls "$WHEELS"/pillow_simd-*.whl >/dev/null 2>&1; then
  log "building Pillow-SIMD with CC=\"cc $CC_FLAGS\" (takes a minute or two)"
  mkdir -p "$WHEELS"
  if ! CC="cc $CC_FLAGS" "${PIP[@]}" wheel --no-cache-dir --no-deps --no-binary pillow-simd -w "$WHEELS" pillow-simd >"$BUILD_LOG" 2>&1; then
    log "build failed (last lines of $BUILD_LOG):"
    tail -n 15 "$BUILD_LOG" >&2
    rm -rf "$WHEELS"
    restore_stock
  fi
fi
"${PIP[@]}" uninstall -y -q pillow >/dev/null 2>&1 || true
if ! "${PIP[@]}" install --no-deps --force-reinstall "$(ls -t "$WHEELS"/pillow_simd-*.whl | head -n 1)" >>"$BUILD_LOG" 2>&1; then
  log "installing the Pillow-SIMD wheel failed (last lines of $BUILD_LOG):"
  tail -n 15 "$BUILD_LOG" >&2
  rm -rf "$WHEELS"
  restore_stock
fi
if ! verify || ! simd_active; then
  log "Pillow-SIMD installed but fails the codec/round-trip check"
  rm -rf "$WHEELS"
  restore_stock
fi
rm -f "$BUILD_LOG"
echo "active: $(active) built with $CC_FLAGS"
