"""ONNX export, onnxruntime parity, generation and serving (installed as ``adalora_deploy.export``).

Submodules are imported explicitly (``from adalora_deploy.export.api import export_model``), so importing
this package costs nothing; the onnxruntime-only side (:mod:`.runtime`) never imports torch.
"""

from __future__ import annotations

from adalora_deploy.errors import ExportError, ParityError, VacuousCheckError

__all__ = ["ExportError", "ParityError", "VacuousCheckError"]
