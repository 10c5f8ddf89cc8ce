#!/usr/bin/env bash
# Installs the project and its test dependencies into the active Python: make that a virtual
# environment first (README: `python3 -m venv .venv && . .venv/bin/activate`); outside one, a note
# says so and the install goes on (CI installs into its fresh machine's Python).
# Order matters: torch first (the right build for this machine), then deepspeed built against it
# without build isolation, in the version range pyproject.toml pins, then the project itself.
#
#   bash scripts/install.sh [--with-system-tools]
#
# System packages are installed only with --with-system-tools or in CI (CI set): shellcheck, the
# linter tests/test_launch.py runs over the rendered Slurm/torchrun scripts (skipped without it, except
# in CI, where a failed install of it stops this script and its test fails).
# Nothing else the tests use comes from the system: videos are read and written with PyAV, whose
# wheels carry their own FFmpeg libraries. apt-get runs as root, or through sudo when there is one.
set -euo pipefail
cd "$(dirname "$0")/.."

SYSTEM_TOOLS=0
for arg in "$@"; do
  case "$arg" in
    --with-system-tools) SYSTEM_TOOLS=1 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument '$arg' (expected --with-system-tools)" >&2; exit 2 ;;
  esac
done
if [ -n "${CI:-}" ]; then
  SYSTEM_TOOLS=1
fi

if ! python -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null && [ -z "${CI:-}" ]; then
  echo "install.sh: note: installing into $(python -c 'import sys; print(sys.prefix)'), not a virtual" \
       "environment; see the README to make one first" >&2
fi

PIP="python -m pip install --disable-pip-version-check -q"
if ! python -c "import torch" 2>/dev/null; then
  if [ -n "${VGPT_TORCH_SPEC:-}" ]; then
    $PIP "$VGPT_TORCH_SPEC"            # e.g. a CUDA or torch_npu-matched build
  else
    $PIP torch==2.13.0                 # the CPU build on our CI / dev boxes
  fi
fi
# the one DeepSpeed requirement, as pyproject.toml states it (e.g. deepspeed>=0.16,<0.20)
DS_SPEC="$(grep -o '"deepspeed[^"]*"' pyproject.toml | head -n 1 | tr -d '"')"
python -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $PIP --no-build-isolation "$DS_SPEC"
$PIP -e ".[dev]"
# On a CPU-only torch, DeepSpeed's gloo backend loads its shared-memory collective op, which it compiles
# just in time on first use (about a minute on 2 cores, then cached in ~/.cache/torch_extensions): build
# it now, once, instead of inside the first training run (or the first test that starts one).
if python -c 'import sys, torch; sys.exit(torch.version.cuda is not None or torch.cuda.is_available())' 2>/dev/null; then
  if ! DS_ACCELERATOR=cpu python -c "
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder('ShareMemCommBuilder')
builder is None or builder.load(verbose=False)" >/dev/null 2>&1; then
    echo "install.sh: note: DeepSpeed's CPU shared-memory op did not build now; DeepSpeed builds it on first use" >&2
  fi
fi

if [ "$SYSTEM_TOOLS" = 1 ] && ! command -v shellcheck >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="-"; fi
  if [ "$SUDO" = "-" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "install.sh: cannot install shellcheck (needs apt-get and root or sudo); its test will be skipped" >&2
    if [ -n "${CI:-}" ]; then exit 1; fi  # in CI its test fails without it: say so here, first
  else
    echo "install.sh: installing shellcheck with apt-get" >&2
    if ! { $SUDO apt-get update -qq >/dev/null \
           && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq shellcheck >/dev/null; }; then
      if [ -n "${CI:-}" ]; then
        echo "install.sh: ERROR: apt-get could not install shellcheck, which CI's launch tests need" >&2
        exit 1
      fi
      echo "install.sh: WARNING: apt-get could not install shellcheck; its test will be skipped" >&2
    fi
  fi
elif ! command -v shellcheck >/dev/null 2>&1; then
  echo "install.sh: note: shellcheck is not installed, so tests/test_launch.py skips linting the rendered" \
       "scripts; rerun with --with-system-tools to install it with apt-get" >&2
fi
