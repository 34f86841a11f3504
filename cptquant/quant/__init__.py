"""Weight quantization without a graph: the blocked quantizer, GPTQ, and how each format stores the codes.

Both the sensitivity passes (which simulate the exporter's rounding and price plans in bytes) and the
exporter's lowering passes (which write the codes) import from here; nothing here imports either.
"""
