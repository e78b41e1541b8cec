#!/usr/bin/env bash
# The main job on its embedded default: set up .venv if needed, then tokenize sample images with
# the tiny tokenizer and print the token counts (the full smoke pipeline replaces this).
set -euo pipefail
cd "$(dirname "$0")/../.."
./infra/local/setup.sh
source infra/local/env.sh
exec .venv/bin/tokenflow demo "$@"
