#!/usr/bin/env bash
# Refreshes the containers' lock files (requirements/*.lock): every package pinned, with its hashes,
# for the containers' Python (3.12) on x86-64 Linux. Needs uv (pip install uv) and the package index.
#
#   bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."

lock() {
  local out=$1
  shift
  uv pip compile pyproject.toml --quiet --generate-hashes --python-version 3.12 \
    --python-platform x86_64-manylinux_2_28 --no-header --output-file "requirements/$out" "$@"
}

lock train.lock
lock train-gpu.lock --extra gpu
lock serve.lock --extra serve
