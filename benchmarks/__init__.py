"""modelvault's benchmark suite: ``python -m benchmarks [--quick] [--only W1,W3] [--runs N]``.

Five workloads (forest, transformer weights, version series, many small models, memory)
measured side by side with the tools people use instead, in one run; see README.md here.
"""
