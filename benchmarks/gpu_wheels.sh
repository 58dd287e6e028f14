#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_encode.py installs on the GPU machine (issue 19).
#
#   bash benchmarks/gpu_wheels.sh            # into benchmarks/gpu_wheels/ (git-ignored), lists them
#
# The GPU machine has Python 3.12 with torch 2.11, torchvision, transformers 5, huggingface_hub 1.x,
# numpy, Pillow, xxhash, tqdm, timm, regex, safetensors, httpx, matplotlib (see the device
# notes), and no network. What the encoder needs beyond that: diffusers (the VAE), open_clip (the
# text encoder), mosaicml-streaming (MDS), and the modules those import that the machine lacks:
#   streaming  -> brotli, snappy (python-snappy -> cramjam), zstd, catalogue (imported on
#                 `import streaming`; boto3, oci, azure, google-cloud, paramiko are imported only
#                 for remote storage, which the benchmark does not use)
#   open_clip  -> ftfy -> wcwidth
# Each is pinned to the version this project's .venv runs (requirements.txt) and downloaded
# without its dependencies (`--no-deps`), because pip on the GPU machine installs them with
# `--no-index --no-deps --target`: streaming's metadata pins numpy<2.2 and transformers<5, which
# the machine's newer numpy and transformers would otherwise refuse (its code runs with them).
# torch is never carried: the machine's own CUDA build is the one to measure.
#
# Writes benchmarks/gpu_wheels.txt (name, bytes, sha256); the folder travels to the machine as
# the `carry` path `benchmarks/gpu_wheels` (the device tool carries at most 64 MiB in all).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
DEST="${1:-$HERE/gpu_wheels}"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

WHEELS=(
  diffusers==0.39.0
  open_clip_torch==3.3.0
  mosaicml-streaming==0.13.0
  Brotli==1.2.1
  python-snappy==0.7.3
  cramjam==2.14.0
  zstd==1.5.7.2
  catalogue==2.0.10
  ftfy==6.3.1
  wcwidth==0.9.4
)

mkdir -p "$DEST"
# Python 3.12, CPython, x86-64 Linux: pure wheels and manylinux builds (pip matches each
# manylinux_2_N tag exactly, so the usual ones are listed; zstd is manylinux_2_14).
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 \
  --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_14_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$DEST" "${WHEELS[@]}"

# One version of each package only: two would stop the install there.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
[ -z "$dupes" ] || { echo "gpu_wheels: more than one wheel of: $dupes (empty $DEST and rerun)" >&2; exit 1; }

LIST="$HERE/gpu_wheels.txt"
{
  echo "# Wheels carried to the GPU machine for benchmarks/gpu_encode.py: made by benchmarks/gpu_wheels.sh"
  echo "# (Python 3.12, x86-64 Linux); installed there with pip --no-index --no-deps --target."
  echo "# bytes  sha256  wheel"
  total=0
  for w in "$DEST"/*.whl; do
    size=$(stat -c %s "$w")
    total=$((total + size))
    echo "$size  $(sha256sum "$w" | cut -d' ' -f1)  $(basename "$w")"
  done
  echo "# total: $total bytes ($(awk -v b="$total" 'BEGIN{printf "%.1f", b/1048576}') MiB)"
} >"$LIST"
cat "$LIST"
