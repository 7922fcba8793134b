"""Side-by-side cost benchmarks of clbench against re-implementations of the official approaches.

``pytest benchmarks`` (pytest-benchmark) times each pair and checks that both give the same result; CI runs
it with ``--benchmark-disable`` (each function once, correctness only) at small shapes. ``CLBENCH_BENCH_FULL=1``
switches to ViT-B-16 shapes. ``python -m benchmarks.ratios`` prints the clbench/reference ratios against the
targets of issue 10 (time and tensor peak memory measured in one process).
"""
