.PHONY: bench bench-gpu

# Pre-tokenize, shard size, training overhead and scaling benchmarks (benchmarks/RESULTS.md).
bench:
	./benchmarks/run_all.sh

# TokenFlow-B encode, pre-tokenize on one GPU, ~1B generator training (ZeRO-2, MFU) and sampling,
# one table (benchmarks/bench_gpu.py): needs a CUDA device, under 8 minutes on one H100.
bench-gpu:
	./benchmarks/gpu.sh
