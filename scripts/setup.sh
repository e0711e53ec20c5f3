#!/usr/bin/env bash
# Create .venv (or reuse it) and install qvlm-bench with its test extras and Ray (the Ray
# executor's tests run on a local Ray instance; Ray is one 79 MB wheel plus four small packages).
# Torch: an existing install is kept; otherwise torch 2.13.0 is preferred (a CPU build is enough
# for the offline suite and the tests), falling back to whatever pip resolves.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q torch
fi
.venv/bin/python -m pip install -q -e ".[test,distributed]"
# The test oracle for AWQ (tests/test_awq.py): AutoAWQ 0.2.9 without its dependencies, whose pins
# (transformers 4.x, triton) would replace ours; the two modules the test imports need only ours.
.venv/bin/python -m pip install -q --no-deps "autoawq==0.2.9"
echo "qvlm-bench installed in $(pwd)/.venv"
