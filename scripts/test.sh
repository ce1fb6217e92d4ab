#!/usr/bin/env bash
# Set up everything (see scripts/setup.sh --dev) and run the test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider --durations=15 "$@"
