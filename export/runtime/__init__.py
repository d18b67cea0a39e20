"""Serving graphs with onnxruntime alone: sessions, tokenizer, generation, the batching engine, the
OpenAI-compatible server and onnxruntime-genai.

May import onnxruntime, numpy, tokenizers, jinja2, fastapi/pydantic/uvicorn, adalora_deploy's light core
(errors, artifacts) and :mod:`..contract`; never torch, transformers, onnx, :mod:`..build` or :mod:`..judge`.
"""
