#!/usr/bin/env bash
# Set up, rebuild kernel.py and run it on the generated demo competition (a few minutes on CPU).
# Extra flags go to kernel.py, e.g.: bash scripts/demo.sh --budget 5m
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt
.venv/bin/python build_kernel.py
.venv/bin/python kernel.py --out-dir outputs/demo "$@"
