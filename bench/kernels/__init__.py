"""Speed benchmarks: each kernel on its own (lowrank_matmul, gram, the CUDA GEMV) and compressed models end to end."""
