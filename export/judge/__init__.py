"""Judging graphs: onnxruntime outputs compared with torch (parity tiers), the agreement with the trained
model on held-out text, and ``check``.

May import torch, adalora_deploy's core, :mod:`..contract`, :mod:`..build` and :mod:`..runtime`.
"""
