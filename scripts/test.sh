#!/usr/bin/env bash
# Set up and run the whole test suite (CPU, a few minutes). Extra flags go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
# An old timm beside the pinned one: tests/test_models.py runs kernel.py against it (Kaggle images lag).
[ -d .cache/timm09/timm ] || .venv/bin/python -m pip install --quiet --no-deps --target .cache/timm09 timm==0.9.16
.venv/bin/python build_kernel.py --check
.venv/bin/python -m pytest -q tests "$@"
