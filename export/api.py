"""``adalora-deploy export``: a base (float, bnb NF4/FP4/LLM.int8, GPTQ) plus an AdaLoRA adapter as one ONNX graph.

::

    base folder ──► load_source_model (base loaded as in training: run.json beside the adapter says how)
    adapter folder ──► (compacted to each module's surviving rank)
                         │
                    convert_for_export (export.build.convert): merged or separate, each base kind's twin
                    from its plug-in in export.build.kinds (which also says what the graph computes and its tier)
                         │
    export_decoder (onnx.checker + shape inference) in a temporary folder + config.json, tokenizer
    files, genai_config.json (onnxruntime-genai); then the source model is loaded again and the graph's
    next-token agreement with it measured on held-out text (export.judge.agreement): export.json
    (export.build.manifest) records it, so no lossy graph ships without its numbers; the folder is swapped into
    ``--output`` whole
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import onnx
from torch import nn

from adalora_deploy.artifacts import atomic_dir, copy_tokenizer_files, write_json
from adalora_deploy.data import BUILTIN_SAMPLE, token_blocks
from adalora_deploy.errors import ExportError
from adalora_deploy.models import load_tokenizer, resolve_quantization
from adalora_deploy.peft_format import read_labels

from .build.adapter_file import add_default_adapter_inputs, write_onnx_adapter
from .build.convert import Mode, Requantize, Weights, convert_for_export, validate_options
from .build.fastpath import FastPathUnsupported, build_decoder
from .build.graph import DEFAULT_OPSET, export_classifier, export_decoder
from .build.kinds import keeping_exports, quantized_ops
from .build.manifest import ExportManifest, package_versions, sha256_file
from .build.source import load_source_model
from .contract import ADAPTER_FILE, FUSED_LINEARS, MANIFEST_FILE
from .judge.agreement import measure_source_agreement
from .runtime.genai import write_genai_config

__all__ = ["CALIBRATION_SAMPLES", "CALIBRATION_SEQ_LEN", "EXTERNAL_DATA_MIN_BYTES", "export_model"]

logger = logging.getLogger(__name__)

EXTERNAL_DATA_MIN_BYTES = 32 << 20
"""Above this many weight bytes ``export_model`` stores them in ``model.onnx.data``. Serializing an inline
protobuf costs about 4x the weights in memory (measured: a 243 MB model peaked 1.5 GB above the loaded
model), external data about 1.3x (+325 MB), which keeps the export within twice the model's size."""

_ADAPTER_OPS = ("MatMul", "Gemm")
"""Ops of a branch's two products (the fast path's up-projection is a Gemm adding the base output in fp32)."""
BUILDERS = ("auto", "fast", "dynamo")
CALIBRATION_SAMPLES = 32
"""GPTQ re-quantization: calibration sequences (at most; fewer when the text is short)."""
CALIBRATION_SEQ_LEN = 128
"""GPTQ re-quantization: tokens per calibration sequence. 32 x 128 = 4096 tokens, more than the widest
SmolLM2 input (1536), so every Hessian is full rank before damping."""


def _build(model: nn.Module, folder: Path, *, builder: str, opset: int, external_data: bool):
    """The graph of ``model`` in ``folder`` by the fast path or the dynamo exporter: ``(ExportResult, "fast"|"dynamo")``."""
    if builder in ("auto", "fast"):
        try:
            return build_decoder(model, folder, opset=opset), "fast"
        except FastPathUnsupported as error:
            if builder == "fast":
                raise
            logger.info("fast path unavailable (%s); tracing with torch.onnx.export", error)
    return export_decoder(model, folder, opset=opset, external_data=external_data), "dynamo"




def _adapter_matmuls(model_path: Path, branch_modules: list[str]) -> int:
    """Branch products (:data:`_ADAPTER_OPS`) whose name scope is exactly a branch module (not its ``base``), or that
    read the factors of the one branch the fast path gives fused siblings (``<parent>.qkv_proj.lora_A`` for
    ``<parent>.q_proj``, ...); and 8-bit down products (``adapter.down_weights: int8``), MatMulNBits reading
    ``<branch>.lora_A.qweight`` or the fused siblings' joint one."""
    prefixes = {f"/{name.replace('.', '/')}/" for name in branch_modules}
    joint = set()
    for name in branch_modules:
        parent, _, leaf = name.rpartition(".")
        joint.update(f"{parent}.{fused}.{factor}" for fused, members in FUSED_LINEARS.items() if leaf in members
                     for factor in ("lora_A", "lora_B"))
    graph = onnx.load(str(model_path), load_external_data=False).graph
    count = 0
    for node in graph.node:
        if node.op_type in _ADAPTER_OPS and node.domain in ("", "ai.onnx"):
            scope = node.name.rsplit("/", 1)[0] + "/"
            count += scope in prefixes or any(name in joint for name in node.input)
        elif node.op_type == "MatMulNBits" and len(node.input) > 1:
            weights = node.input[1].removesuffix(".qweight")
            count += weights in joint or weights.removesuffix(".lora_A") in branch_modules
    return count


def _write_config(model: nn.Module, folder: Path) -> None:
    config = model.config.to_dict()
    for key in ("quantization_config", "_pre_quantization_dtype"):
        config.pop(key, None)
    write_json(folder / "config.json", config)


def export_model(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    *,
    output: str | os.PathLike,
    mode: Mode = "separate",
    weights: Weights = "fp32",
    quantization: str = "auto",
    double_quant: bool | None = None,
    adapter_inputs: bool = False,
    serving: bool = False,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
    force: bool = False,
    builder: str = "auto",
    requantize: Requantize = "gptq",
    calibration: str | os.PathLike | None = None,
    calibration_samples: int = CALIBRATION_SAMPLES,
    calibration_seq_len: int = CALIBRATION_SEQ_LEN,
    agreement_text: str | os.PathLike | None = None,
    measure_agreement: bool = True,
) -> ExportManifest:
    """Export ``base`` + ``adapter`` as one KV-cache ONNX decoding graph with its manifest.

    Args:
        base: local Hugging Face model folder (a GPTQ folder for ``gptq``).
        adapter: AdaLoRA adapter folder (ours or PEFT's), trained on this base.
        output: export folder; built under a temporary name and swapped in whole.
        mode: ``merged`` (ΔW folded into the dequantized base) or ``separate`` (quantized base + branch).
        weights: merged only: ``fp32`` (exact), ``fp16``, ``int4``/``int8`` (MatMulNBits, accuracy_level 4).
        quantization: how to load the base; ``auto`` detects GPTQ folders and reads the training run record.
        double_quant: bnb 4-bit double quantization (``None``: from the training run record, else False).
        adapter_inputs: separate only: factors as graph inputs + ``adapter.onnx_adapter``.
        serving: separate only: fast lossy kernels (MatMulNBits accuracy_level 4) instead of exact ones.
        opset: default-domain opset.
        external_data: weights in ``model.onnx.data`` (``None``: above :data:`EXTERNAL_DATA_MIN_BYTES`, which
            bounds the export's peak memory near 1.3x the model).
        force: accept a ``quantization``/``double_quant`` that contradicts the training run record.
        builder: ``fast`` (:mod:`.fastpath`: the graph built node by node with onnxruntime's fused ops: the
            families whose ``fast_path`` is set in :mod:`adalora_deploy.architectures`), ``dynamo`` (``torch.onnx.export``, any architecture transformers can trace), or ``auto``
            (fast when the architecture allows, else dynamo). The manifest records which one built the graph.
        requantize: merged int4/int8: ``gptq`` (error-compensating, on ``calibration``; default) or ``rtn``.
        calibration: text file (.txt/.jsonl) for GPTQ re-quantization (``None``: the packaged sample text;
            use text like the task's).
        calibration_samples, calibration_seq_len: calibration sequences and their length in tokens.
        agreement_text: held-out text for the agreement measured with the source (``None``: the packaged
            held-out passage).
        measure_agreement: measure it (loads the source model once more after the export).

    Returns:
        The manifest written to ``output/export.json``.

    Raises:
        ExportError: a bad option combination or a failed export step.
        ConfigError: a quantization that contradicts the training run record (without ``force``).
        ArtifactError, AdapterMismatchError: unreadable folders or an adapter for another base.
    """
    validate_options(mode, weights, serving, adapter_inputs, requantize)
    if builder not in BUILDERS:
        raise ExportError(f"--builder {builder!r}: choose one of {', '.join(BUILDERS)}")
    base, adapter, output = Path(base), Path(adapter), Path(output)
    quantization, double_quant = resolve_quantization(base, adapter, quantization, double_quant, force=force)
    labels = read_labels(adapter)  # a sequence classifier's adapter records its labels
    if labels is not None:
        if adapter_inputs:
            raise ExportError("--adapter-inputs is not supported for a sequence classifier; bake the adapter in")
        if mode == "merged" and weights in ("int4", "int8") and requantize == "gptq":
            raise ExportError(f"--weights {weights} of a sequence classifier: GPTQ re-quantization walks decoder "
                              "layers; use --requantize rtn")
        if builder == "fast":
            raise ExportError("--builder fast builds decoders; a sequence classifier is traced (--builder dynamo)")
    logger.info("exporting %s base %s + adapter %s (%s, %s)", quantization, base, adapter, mode, weights)
    blocks = None
    if mode == "merged" and weights in ("int4", "int8") and requantize == "gptq":
        blocks = _calibration_blocks(base, calibration, calibration_samples, calibration_seq_len)
    model = load_source_model(base, adapter, quantization=quantization, double_quant=double_quant)
    conversion = convert_for_export(model, quantization=quantization, mode=mode, weights=weights, serving=serving,
                                    adapter_inputs=adapter_inputs, requantize=requantize, calibration=blocks)
    requantization = conversion.requantization
    if requantization is not None and requantization["method"] == "gptq":
        requantization = {**requantization, "calibration": str(calibration or "builtin:sample")}
    if external_data is None:
        size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        external_data = size > EXTERNAL_DATA_MIN_BYTES
    with atomic_dir(output) as temp:
        if labels is not None:
            result, used = export_classifier(model, temp, opset=opset, external_data=external_data), "dynamo"
        else:
            result, used = _build(model, temp, builder=builder, opset=opset, external_data=external_data)
        _write_config(model, temp)
        copy_tokenizer_files(base, temp)
        if labels is None:
            # onnxruntime-genai loads the folder as it loads its own builder's exports; fast-path graphs let it
            # append to one preallocated KV buffer (adapter inputs keep the concatenating layout)
            write_genai_config(temp, share_buffer=used == "fast" and not adapter_inputs)
        if adapter_inputs:
            add_default_adapter_inputs(result.model_path, result.adapter_input_names)
            write_onnx_adapter(temp / ADAPTER_FILE, conversion.factors)
        branches = [n for n, r in conversion.ranks.items() if mode == "separate" and (r > 0 or adapter_inputs)]
        del model
        agreement = None
        if measure_agreement and labels is None:  # a classifier's parity is check's (logits on held-out texts)
            agreement = measure_source_agreement(temp, base, adapter, quantization, double_quant, conversion,
                                           agreement_text, adapter_inputs)
        files = sorted(p.name for p in temp.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
        counted = quantized_ops()  # ops that compute with quantized weights (every kind's, not fused float ops)
        manifest = ExportManifest(
            mode=mode, weights=weights, serving=serving, adapter_inputs=adapter_inputs, quantization=quantization,
            double_quant=double_quant, base_kind=conversion.base_kind, base_path=str(base.resolve()),
            adapter_path=str(adapter.resolve()), arithmetic=conversion.arithmetic.text, tier=conversion.tier,
            source_tier=conversion.source_tier, ranks=dict(conversion.ranks),
            adapter_matmuls=_adapter_matmuls(result.model_path, branches),
            quantized_ops={op: n for op, n in result.op_counts.items() if op in counted},
            op_counts=dict(result.op_counts), adapter_input_names=result.adapter_input_names,
            input_names=result.input_names, output_names=result.output_names, opset=result.opset,
            files={name: sha256_file(temp / name) for name in files},
            sizes={name: (temp / name).stat().st_size for name in files}, versions=package_versions(),
            builder=used,
            requantization=requantization, agreement=agreement,
            task="classification" if labels is not None else "causal-lm", labels=labels,
        )
        write_json(temp / MANIFEST_FILE, manifest.to_dict())
    logger.info("wrote %s: %s, %d adapter products (MatMul, Gemm, 8-bit MatMulNBits), %s", output, conversion.arithmetic.text,
                manifest.adapter_matmuls, manifest.quantized_ops or "no quantized ops")
    if agreement is not None and not agreement["passed"]:
        logger.warning("%s changes what the trained model computes (%s); %s", output, "; ".join(agreement["failures"]),
                       keeping_exports(quantization, mode, weights, serving))
    return dataclasses.replace(manifest, output_dir=str(output))


def _calibration_blocks(base: Path, calibration: str | os.PathLike | None, samples: int, seq_len: int):
    """Token blocks ``(n <= samples, seq_len)`` of the calibration text, with the base's tokenizer."""
    if samples < 1 or seq_len < 2:
        raise ExportError(f"--calibration-samples must be >= 1 and --calibration-seq-len >= 2, got {samples}, {seq_len}")
    blocks = token_blocks(calibration or BUILTIN_SAMPLE, load_tokenizer(str(base)), seq_len)[:samples]
    if len(blocks) < samples:
        # too few Hessian samples wrote graphs that missed their tier (a generation task fell from 0.57 to 0.05)
        raise ExportError(
            f"calibration text {calibration or BUILTIN_SAMPLE} gives {len(blocks)} of the {samples} sequences of "
            f"{seq_len} tokens GPTQ re-quantization needs; pass --calibration FILE with more text like the task's, "
            f"lower --calibration-samples to {len(blocks)} knowingly, or use --requantize rtn")
    return blocks
