#!/usr/bin/env bash
# Set up and run the whole test suite (CPU, a few minutes). Extra flags go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements-test.txt
.venv/bin/python build_kernel.py --check
.venv/bin/python -m pytest -q tests "$@"
