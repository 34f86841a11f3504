"""`make bench`: size / quality / speed evidence against FP32, FP16, ORT int8-dynamic and ORT int4.

Every figure in docs/benchmarks.md comes from one run of this package on one machine: ratios are
taken between variants measured in the same run (timings interleaved), never against numbers from
elsewhere.
"""
