#!/usr/bin/env bash
# Run every benchmark once (`make bench`); extra arguments (e.g. --quick) go to each script.
# The benchmarks share one work directory: bench_shard_size measures bench_pretokenize's shards.
set -euo pipefail
cd "$(dirname "$0")/.."
source infra/local/env.sh
python=${PYTHON:-.venv/bin/python}
work=$(mktemp -d /tmp/tfbench-XXXXXX)
trap 'rm -rf "$work"' EXIT
for bench in pretokenize shard_size train scaling sampling; do
    "$python" -m "benchmarks.bench_$bench" --work-dir "$work" "$@"
    echo
done
