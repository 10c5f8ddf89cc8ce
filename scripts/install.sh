#!/usr/bin/env bash
# Installs the project and its test dependencies into the current Python.
# Order matters: torch first (the right build for this machine), then deepspeed
# built against it without build isolation, then the project itself.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install --disable-pip-version-check -q"
if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${VGPT_TORCH_SPEC:-}" ]; then
    $PIP "$VGPT_TORCH_SPEC"            # e.g. a CUDA or torch_npu-matched build
  else
    $PIP torch==2.13.0                 # the CPU build on our CI / dev boxes
  fi
fi
python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $PIP --no-build-isolation "deepspeed>=0.16"
$PIP -e ".[dev]"
# The linter for the Slurm/torchrun scripts `vgpt launch` renders (tests/test_launch.py
# skips that check without shellcheck); installed from Debian only when we are root with apt-get.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && ! command -v shellcheck >/dev/null 2>&1; then
  apt-get update -qq >/dev/null 2>&1 || true
  apt-get install -y -qq shellcheck >/dev/null 2>&1 || true
fi
