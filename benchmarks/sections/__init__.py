"""The benchmark suite's sections, one module each, each with ``run(suite)``; run_all.py runs them in this order."""

SECTIONS = ("training", "export", "decode", "shipped", "compaction", "quantize")
