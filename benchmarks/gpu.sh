#!/usr/bin/env bash
# The GPU benchmark (benchmarks/bench_gpu.py), one table: TokenFlow-B encode (fp32, bf16),
# pre-tokenize through Ray Data on one GPU, ~1B generator training with ZeRO-2 (tokens/s, MFU)
# and sampling. Needs a CUDA device (refuses otherwise); about 3-4 minutes on one H100 (budget
# 8). `--quick` runs tiny sizes on any device, the CPU included. Extra arguments go to the
# script, e.g. `benchmarks/gpu.sh --out gpu.json` or `--peak-tflops 989` for a GPU not in its table.
set -euo pipefail
cd "$(dirname "$0")/.."
source infra/local/env.sh  # Ray settings; the script sets DS_ACCELERATOR to the device it measures
exec "${PYTHON:-.venv/bin/python}" -m benchmarks.bench_gpu "$@"
