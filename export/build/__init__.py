"""Building graphs: an adapted model converted to its twin (each base kind's ONNX arithmetic in torch) and
written as ONNX by the fast path or torch's dynamo exporter, with the manifest and adapter files.

May import torch, onnx, onnxscript, transformers, adalora_deploy's core, :mod:`..contract` and the
runtime's light helpers; never :mod:`..judge` or the server.
"""
