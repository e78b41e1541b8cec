#!/usr/bin/env bash
# Create (or refresh when pyproject.toml changed) the virtualenv at .venv with the project and
# its test extras installed. Idempotent: a no-op when the install is current.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ -f "$stamp" ]; then
  exit 0
fi
echo "setting up .venv (first run downloads and installs the dependencies; a few minutes)" >&2
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# DeepSpeed builds no C++ ops at install time; the CPU path compiles none of them either.
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e '.[test]'
rm -f .venv/.installed-*
touch "$stamp"
