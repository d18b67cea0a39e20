"""ONNX export, onnxruntime parity, generation and serving for adalora-deploy.

- :mod:`export.modules`: export-friendly layers (``LowRankBranch``, ``NBitsLinear`` -> MatMulNBits,
  ``Bnb4Linear`` -> MatMulBnb4, ``Int8EmulationLinear`` -> exact LLM.int8) and ``swap_module``.
- :mod:`export.graph`: ``export_decoder`` writes one KV-cache decoding graph (prompt and next tokens).
- :mod:`export.runtime`: onnxruntime sessions, ``DecoderSession`` greedy generation, the torch reference.
- :mod:`export.parity`: per-output metrics, exact/lossy tiers, one report with every failure.

Submodules are imported explicitly (``from export.graph import export_decoder``) so that importing the
package stays cheap.
"""
