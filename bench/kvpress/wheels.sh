#!/usr/bin/env bash
# Wheels for running bench/kvpress/run_presses.py on the GPU machine (Python 3.12, torch 2.11 and transformers 5.17
# preinstalled, no network) into .whl-kvpress/ (gitignored; carry it). Installed there with
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/kvsite .whl-kvpress/*.whl
# and put first on PYTHONPATH for that process only, so transformers 4.57.6 shadows 5.17 (bench/kvpress/gpu.sh).
# Carried: kvpress and what it or transformers 4.57 import that the machine lacks or has in a version 4.57 refuses
# (huggingface_hub < 1.0, tokenizers <= 0.23.0). Not carried: datasets (+ pyarrow 55 MB, pandas 12 MB): kvpress
# imports it only for presses that download data; bench/kvpress/offline stands in for it there.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${1:-$ROOT/.whl-kvpress}"
mkdir -p "$DEST"
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for p in kvpress==0.5.5 transformers==4.57.6 huggingface_hub==0.36.2 tokenizers==0.22.2 cachetools==5.5.2 \
         termcolor==3.3.0 requests==2.34.2 urllib3==2.8.0 idna==3.20 certifi==2026.10.19.post1 \
         charset-normalizer==3.5.3; do
  python3 -m pip download -q --no-deps "${PLAT[@]}" -d "$DEST" "$p"
done
# fire 0.6.0 (imported by kvpress's ExpectedAttentionStatsPress module) is published as an sdist only: build its
# pure-Python wheel here.
python3 -m pip wheel -q --no-deps -w "$DEST" fire==0.6.0
du -ch "$DEST"/*.whl | sort -h
