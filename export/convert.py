"""Turning a source model into the torch twin of its ONNX graph (``convert_for_export``).

::

    source model (base with its own kernels + AdaLoRA layers, compacted)
          ┌──────────────┴───────────────────────────┐
        merged                                     separate
    merge_into_dense: W = dequant(W0) + ΔW         each base layer -> its kind's twin (export.kinds);
      fp32       plain MatMul (exact)              rank r > 0: LowRankBranch, A = Λ'Q' [r, in],
      fp16       whole model in fp16 (lossy)       B = P' scale [out, r]; rank 0: no branch, no node
      int4/int8  MatMulNBits, accuracy 4           --adapter-inputs: A/B graph inputs with a symbolic
                 (smallest, fastest on CPU)        rank (rank-0 defaults) + adapter.onnx_adapter

What each base kind's graph computes is written once, in its :mod:`adalora_deploy.export.kinds` file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from adalora_deploy import functional as F
from adalora_deploy.adapters import find_adapters
from adalora_deploy.errors import ExportError

from .kinds import (
    BRANCH,
    SERVING_ACCURACY_LEVEL,
    Arithmetic,
    SourceTier,
    Tier,
    kind_for_quantization,
    twin_of,
)
from .modules import LowRankBranch, NBitsLinear, swap_module

__all__ = [
    "MERGED_NBITS_BLOCK",
    "Conversion",
    "Mode",
    "Weights",
    "adapter_factors",
    "base_kind",
    "convert_for_export",
    "describe",
    "validate_options",
]

Mode = Literal["merged", "separate"]
Weights = Literal["fp32", "fp16", "int4", "int8"]

MERGED_NBITS_BLOCK = 32
"""Block size of ``merged --weights int4/int8`` (onnxruntime's own quantizer default; 1.32 CPU accepts 16..256)."""

MERGED_WEIGHTS: dict[str, Arithmetic] = {
    "fp16": Arithmetic("fp16 graph of dequant(W0) + ΔW (lossy)", "lossy", "lossy"),
    "int4": Arithmetic(f"MatMulNBits int4 round-to-nearest of dequant(W0) + ΔW (block {MERGED_NBITS_BLOCK}), "
                       f"accuracy_level {SERVING_ACCURACY_LEVEL} (lossy; re-quantization error vs the source is "
                       "reported, not judged)", "lossy", "report"),
    "int8": Arithmetic(f"MatMulNBits int8 round-to-nearest of dequant(W0) + ΔW (block {MERGED_NBITS_BLOCK}), "
                       f"accuracy_level {SERVING_ACCURACY_LEVEL} (lossy; re-quantization error vs the source is "
                       "reported, not judged)", "lossy", "report"),
}
"""Merged graphs whose weights are re-encoded, whatever the base kind was."""


@dataclass(frozen=True)
class Conversion:
    """What :func:`convert_for_export` did to a model."""

    ranks: dict[str, int]
    """Surviving rank per adapted module."""
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Module -> ``(A [r, in], B [out, r])`` (scaling folded), every adapted module (rank 0 ones too)."""
    base_kind: str
    """The quantized base kinds as the backends describe them (``dense`` when none)."""
    arithmetic: Arithmetic
    """What the graph computes and how it is judged."""

    @property
    def tier(self) -> Tier:
        return self.arithmetic.tier

    @property
    def source_tier(self) -> SourceTier:
        return self.arithmetic.source_tier


def describe(quantization: str, mode: str, weights: str = "fp32", serving: bool = False) -> Arithmetic:
    """The arithmetic of one export configuration (from the base kind's plug-in or :data:`MERGED_WEIGHTS`)."""
    kind = kind_for_quantization(quantization)
    if mode == "merged":
        return MERGED_WEIGHTS[weights] if weights in MERGED_WEIGHTS else kind.merged()
    base = kind.separate(serving=serving)
    return dataclasses.replace(base, text=base.text + BRANCH)


def base_kind(model: nn.Module) -> str:
    """The quantized base kinds in ``model`` as the backends describe them (``dense`` when none)."""
    from adalora_deploy.backends import backend_for, is_supported

    found: list[str] = []
    for module in model.modules():
        if is_supported(module):
            kind = backend_for(module).describe(module)
            if not kind.startswith("dense") and kind not in found:
                found.append(kind)
    return "+".join(found) if found else "dense"


@torch.no_grad()
def adapter_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module -> ``(A [r, in], B [out, r])`` fp32 of every AdaLoRA layer: ``A = Λ'Q'``, ``B = P' scale`` over the
    surviving triplets (:func:`adalora_deploy.functional.lora_factors`), so ``ΔW = B @ A``; rank-0 modules
    give ``[0, in]`` / ``[out, 0]``."""
    factors = {}
    for name, layer in find_adapters(model).items():
        Q, E, P = layer.live_factors()
        A, B = F.lora_factors(Q.float(), E.float(), P.float(), layer.scale)
        factors[name] = (A.detach().clone(), B.detach().clone())
    return factors


@torch.no_grad()
def convert_for_export(model: nn.Module, *, quantization: str, mode: Mode = "separate", weights: Weights = "fp32",
                       serving: bool = False, adapter_inputs: bool = False) -> Conversion:
    """Turn a source model (from :func:`~adalora_deploy.export.source.load_source_model`) into the torch twin of its ONNX graph, in place.

    No forward pass runs here (bnb 4-bit statistics must be read before any eval forward). Old layers are
    dropped as their replacements go in, so peak memory stays near one model.

    Raises:
        ExportError: an unsupported combination (see :func:`export_model`).
    """
    validate_options(mode, weights, serving, adapter_inputs)
    adapters = find_adapters(model)
    if not adapters:
        raise ExportError("the adapter injected no AdaLoRA layer into the base")
    kinds_found = base_kind(model)
    ranks = {name: layer.live_rank for name, layer in adapters.items()}
    factors = adapter_factors(model)
    arithmetic = describe(quantization, mode, weights, serving)
    if mode == "merged":
        from adalora_deploy.merge import merge_into_dense

        merge_into_dense(model, dtype=torch.float32)
        if weights == "fp16":
            # transformers refuses .to(dtype) on a model loaded through bitsandbytes, even once merged
            nn.Module.to(model, torch.float16)
        elif weights in ("int4", "int8"):
            bits = 4 if weights == "int4" else 8
            for name, module in list(model.named_modules()):
                if type(module) is nn.Linear and name != "lm_head" and not name.endswith(".lm_head"):
                    swap_module(model, name, NBitsLinear.from_float(
                        module.weight, module.bias, bits=bits, block_size=MERGED_NBITS_BLOCK,
                        accuracy_level=SERVING_ACCURACY_LEVEL))
    else:
        for name, layer in adapters.items():
            base = twin_of(layer.base_layer, serving=serving)
            in_features, out_features = layer.in_features, layer.out_features
            if adapter_inputs:
                new = LowRankBranch(base, factors_as_inputs=True, in_features=in_features, out_features=out_features)
            elif ranks[name] > 0:
                A, B = factors[name]
                new = LowRankBranch(base, A, B, in_features=in_features, out_features=out_features)
            else:
                new = base
            swap_module(model, name, new)
        for name, module in list(model.named_modules()):
            twin = twin_of(module, serving=serving) if name else module
            if twin is not module:
                swap_module(model, name, twin)
    model.eval()
    return Conversion(ranks=ranks, factors=factors, base_kind=kinds_found, arithmetic=arithmetic)


def validate_options(mode: str, weights: str, serving: bool, adapter_inputs: bool) -> None:
    if mode not in get_args(Mode):
        raise ExportError(f"--mode {mode!r}: choose merged or separate")
    if weights not in get_args(Weights):
        raise ExportError(f"--weights {weights!r}: choose one of {', '.join(get_args(Weights))}")
    if mode == "separate" and weights != "fp32":
        raise ExportError(f"--weights {weights} applies to --mode merged; in separate mode the base keeps its own "
                          "quantized weights (add --serving for the fast int8-activation kernels)")
    if mode == "merged" and serving:
        raise ExportError("--serving applies to --mode separate; for a fast merged graph use --weights int4 or int8")
    if mode == "merged" and adapter_inputs:
        raise ExportError("--adapter-inputs needs --mode separate (a merged graph has no adapter branch to feed)")
