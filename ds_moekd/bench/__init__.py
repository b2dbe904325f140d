"""Throughput benchmarks (`ds-moekd bench ...`). Importable without DeepSpeed: the lent GPU
machines run them from the source tree with their own torch/triton (benchmarks/run_gpu.sh)."""
