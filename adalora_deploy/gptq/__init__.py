"""GPTQ: the checkpoint format and the quantizers that produce it.

- :mod:`adalora_deploy.gptq.packing`: bit packing, groups and zero points of the format (pure tensor code).
- :mod:`adalora_deploy.gptq.linear`: the layer that computes with GPTQ weights, ``QuantLinear``.
- :mod:`adalora_deploy.gptq.checkpoint`: reading and writing GPTQ model folders.
- :mod:`adalora_deploy.gptq.solver`: quantizing one weight, round-to-nearest or the GPTQ solver.
- :mod:`adalora_deploy.gptq.driver`: quantizing a whole model, decoder layer by decoder layer.

Adapters read ``QuantLinear`` through :mod:`adalora_deploy.backends.gptq`; this package never imports
backends/.
"""

SUPPORTED_BITS = (2, 3, 4, 8)
"""Bit widths of the GPTQ format this package reads, writes and quantizes to (also MatMulNBits: 2, 4, 8)."""
