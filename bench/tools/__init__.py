"""Tools over the benchmarks: the tuners that write the shipped dispatch tables, and the results-table generator."""
