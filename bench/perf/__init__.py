"""Micro-benchmarks of the DEQ engine, each holding one goal of issue 18 against a number.

    python -m bench.perf.solvers     # solver overhead per iteration, Broyden history reads, host syncs
    python -m bench.perf.deq_step    # a DEQ training step against its floor (f, VJPs, outer backward)

Every comparison is paired and interleaved in one process on one intra-op thread; ratios are the
median of per-pair ratios, with their interquartile range.
"""
