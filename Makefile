.PHONY: bench

# Pre-tokenize, shard size, training overhead and scaling benchmarks (benchmarks/RESULTS.md).
bench:
	./benchmarks/run_all.sh
