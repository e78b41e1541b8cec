#!/usr/bin/env bash
# The test command: set up .venv if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/../.."
./infra/local/setup.sh
source infra/local/env.sh
exec .venv/bin/python -m pytest -q --durations=15 "$@"
