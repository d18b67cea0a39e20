"""ONNX export, onnxruntime parity, generation and serving for adalora-deploy.

- :mod:`export.modules`: export-friendly layers (``LowRankBranch``, ``NBitsLinear`` -> MatMulNBits,
  ``Bnb4Linear`` -> MatMulBnb4, ``Int8EmulationLinear`` -> exact LLM.int8) and ``swap_module``.
- :mod:`export.graph`: ``export_decoder`` writes one KV-cache decoding graph (prompt and next tokens).
- :mod:`export.runtime`: onnxruntime sessions, ``DecoderSession`` greedy generation, the torch reference.
- :mod:`export.parity`: per-output metrics, exact/lossy tiers, one report with every failure.

Submodules are imported explicitly (``from .graph import export_decoder``) so that importing the
package stays cheap.

- :mod:`export.api`: ``export_model`` (the ``export`` command: merged/separate, every base kind, manifest).
- :mod:`export.check`: ``check_export`` (the ``check`` command: parity under onnxruntime, ``parity.json``).

``ExportError`` and ``ParityError`` are re-exported lazily (``export.ExportError``) so that the CLI can catch
them without importing onnx or torch up front.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ExportError", "ParityError", "VacuousCheckError"]

_LAZY = {"ExportError": "export.graph", "ParityError": "export.parity", "VacuousCheckError": "export.check"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")
