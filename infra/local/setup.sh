#!/usr/bin/env bash
# Create (or refresh when pyproject.toml or this script changed) the virtualenv at .venv with the
# project, its test extras and the lmms-eval extra installed. Idempotent: a no-op when current.
set -euo pipefail
script="$(realpath "$0")"
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
stamp=".venv/.installed-$(cat pyproject.toml "$script" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "setting up .venv (first run downloads and installs the dependencies; a few minutes)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# DeepSpeed builds no C++ ops at install time; the CPU path compiles none of them either.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e '.[test,lmms]'
rm -f .venv/.installed-*
touch "$stamp"
