"""Quantizing a float base model to GPTQ: round-to-nearest and the GPTQ solver, layer by layer.

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323, Algorithm 1) quantizes the columns of ``W (out, in)`` left to right
and spreads each column's rounding error over the columns not yet quantized, weighted by the inverse
Hessian of the layer's squared output error::

    H = 2 X^T X / N           X (N tokens, in): the layer's calibration inputs
    H += percdamp * mean(diag H) * I
    U = chol(H^-1)^T          upper triangular
    for column j:  q_j = quant(w_j);  e = (w_j - q_j) / U[j, j];  w_{j+1:} -= e U[j, j+1:]

Errors inside a block of ``block_size`` columns are applied immediately; the block's accumulated error
reaches the remaining columns with one matmul (the "lazy batch" update of Section 4).

``quantize_model`` runs this one decoder layer at a time: it captures the first decoder layer's inputs,
quantizes that layer's linears in execution order (each sees inputs produced by the already-quantized
sublayers before it), then feeds the quantized layer's outputs to the next layer, so peak memory is
one layer's Hessians plus the calibration activations.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from adalora_deploy.backends.gptq import (
    CHECKPOINT_FORMATS,
    SUPPORTED_BITS,
    GPTQFormatError,
    QuantLinear,
    default_g_idx,
    save_gptq_model,
)

from adalora_deploy.errors import QuantizationError

__all__ = [
    "LayerQuantization",
    "QuantizationError",
    "QuantizationReport",
    "QuantizedWeight",
    "HessianAccumulator",
    "add_parser",
    "gptq_quantize",
    "quantize_model",
    "relative_output_error",
    "rtn_quantize",
    "run",
]

logger = logging.getLogger(__name__)

Method = Literal["gptq", "rtn"]

_MIN_SCALE = torch.finfo(torch.float16).tiny
"""Smallest normal fp16 (6.1e-5): scales are stored in fp16, and a scale that underflows to 0 would
turn every value of its group into inf/nan; a group this flat dequantizes to zeros instead."""
_MAX_SCALE = torch.finfo(torch.float16).max
"""Largest fp16 (65504): a larger scale cannot be stored in the checkpoint."""


@dataclass(frozen=True)
class QuantizedWeight:
    """Quantized integers and their grid for one weight ``(out, in)``, ready to pack.

    Attributes:
        q: int32 ``(out, in)`` values in ``[0, 2**bits)``, columns in the original order.
        scales: float32 ``(G, out)``, already rounded to fp16.
        zeros: int32 ``(G, out)`` zero points.
        g_idx: int32 ``(in,)`` group of each input channel.
        bits, group_size, sym, desc_act: the settings that produced them.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    desc_act: bool

    def to_module(self, bias: torch.Tensor | None = None, checkpoint_format: str = "gptq_v2") -> QuantLinear:
        """Pack into a :class:`QuantLinear`."""
        return QuantLinear.from_quantized(
            self.q,
            self.scales,
            self.zeros,
            self.g_idx,
            bits=self.bits,
            group_size=self.group_size,
            sym=self.sym,
            desc_act=self.desc_act,
            bias=bias,
            checkpoint_format=checkpoint_format,
        )

    def dequantize(self) -> torch.Tensor:
        """float32 ``(out, in)``, the exact product :class:`QuantLinear` computes with."""
        g = self.g_idx.long()
        return self.scales.float().t()[:, g] * (self.q - self.zeros.t()[:, g]).float()


@dataclass(frozen=True)
class LayerQuantization:
    """How well one linear layer was quantized, measured on its calibration inputs.

    Attributes:
        name: qualified module name.
        shape: ``(out, in)``.
        relative_mse: ``||X (W - Wq)^T||^2 / ||X W^T||^2`` over the calibration tokens.
        sqnr_db: ``-10 log10(relative_mse)``, the signal-to-quantization-noise ratio of the output.
        seconds: time spent quantizing (solver + packing).
    """

    name: str
    shape: tuple[int, int]
    relative_mse: float
    sqnr_db: float
    seconds: float


@dataclass(frozen=True)
class QuantizationReport:
    """Result of :func:`quantize_model`.

    Attributes:
        method: ``"gptq"`` or ``"rtn"``.
        bits, group_size, sym, desc_act: the quantization settings.
        num_samples: calibration sequences used.
        seq_len: tokens per calibration sequence.
        layers: one entry per quantized linear, in quantization order.
        seconds: total wall time.
    """

    method: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    num_samples: int
    seq_len: int
    layers: tuple[LayerQuantization, ...]
    seconds: float

    @property
    def worst_sqnr_db(self) -> float:
        """Lowest per-layer SQNR (dB)."""
        return min(layer.sqnr_db for layer in self.layers)

    def format_table(self) -> str:
        """A plain-text table, one row per layer."""
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        lines = [f"{'layer':<{width}}  {'shape (out, in)':>16}  {'rel. MSE':>10}  {'SQNR dB':>8}  {'time s':>7}"]
        for layer in self.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            lines.append(
                f"{layer.name:<{width}}  {shape:>16}  {layer.relative_mse:>10.3e}  "
                f"{layer.sqnr_db:>8.2f}  {layer.seconds:>7.2f}"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Quantization grid
# ---------------------------------------------------------------------------------------------------


def _check_settings(bits: int, group_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if group_size != -1 and group_size < 1:
        raise QuantizationError(f"group_size must be -1 (one group) or >= 1, got {group_size}")


def _grid(x: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero of ``x (out, k)`` (GPTQ's ``Quantizer.find_params``; the range includes 0).

    sym: ``scale = 2 max|x| / maxq``, ``zero = 2**(bits-1)``. asym: ``scale = (max - min) / maxq``,
    ``zero = round(-min / scale)``. Scales are rounded to fp16, the precision they are stored in.
    """
    maxq = 2**bits - 1
    xmin = torch.clamp(x.min(dim=1).values, max=0)
    xmax = torch.clamp(x.max(dim=1).values, min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -torch.ones_like(xmin), xmin)
    xmax = torch.where(flat, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / maxq
    if bool((scale > _MAX_SCALE).any()):
        raise QuantizationError(f"a weight group spans {float((xmax - xmin).max()):.3g}, too large for an fp16 scale")
    scale = scale.clamp(min=_MIN_SCALE).to(torch.float16).float()
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def _quantize_column(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes and dequantized values of ``w (out,)`` (dequantized as QuantLinear does: the exact
    float32 product of the fp16 scale and the integer)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    dq = scale * (q - zero)
    return q, dq


def rtn_quantize(weight: torch.Tensor, *, bits: int, group_size: int = 128, sym: bool = True) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight (out, in)`` per group of ``group_size`` input channels.

    The baseline GPTQ is compared against: each group gets the min/max grid of :func:`_grid` and every
    value is rounded independently.
    """
    _check_settings(bits, group_size)
    w = weight.detach().float()
    out_features, in_features = w.shape
    size = in_features if group_size == -1 else group_size
    maxq = 2**bits - 1
    scales, zeros, codes = [], [], []
    for start in range(0, in_features, size):
        block = w[:, start : start + size]
        scale, zero = _grid(block, bits, sym)
        codes.append(torch.clamp(torch.round(block / scale[:, None]) + zero[:, None], 0, maxq))
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(
        q=torch.cat(codes, dim=1).to(torch.int32),
        scales=torch.stack(scales),
        zeros=torch.stack(zeros).to(torch.int32),
        g_idx=default_g_idx(in_features, group_size, w.device),
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=False,
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
) -> QuantizedWeight:
    """GPTQ (arXiv:2210.17323, Algorithm 1) for one weight.

    Args:
        weight: ``(out, in)`` float weight.
        hessian: ``(in, in)``, ``2 X^T X / N`` of the layer inputs (see :class:`HessianAccumulator`).
        bits: 2, 3, 4 or 8.
        group_size: input channels per scale/zero group (-1: one group per row). With ``desc_act``,
            groups are formed in the permuted (act) order; ``g_idx`` records them.
        sym: symmetric grid (zero ``2**(bits-1)``) or asymmetric.
        desc_act: visit columns by decreasing ``diag(H)`` (act-order).
        percdamp: damping ``percdamp * mean(diag(H))`` added to the diagonal.
        block_size: columns per lazy-batch block.

    Returns:
        The quantized weight; ``q`` columns in the original order.

    Raises:
        QuantizationError: bad settings, shape mismatch, or a Hessian that stays singular after damping.
    """
    _check_settings(bits, group_size)
    if block_size < 1:
        raise QuantizationError(f"block_size must be >= 1, got {block_size}")
    if percdamp < 0:
        raise QuantizationError(f"percdamp must be >= 0, got {percdamp}")
    W = weight.detach().float().clone()
    out_features, columns = W.shape
    if tuple(hessian.shape) != (columns, columns):
        raise QuantizationError(
            f"hessian must be ({columns}, {columns}) for a weight {tuple(W.shape)}, got {tuple(hessian.shape)}"
        )
    H = hessian.detach().float().clone()
    maxq = 2**bits - 1

    # Inputs that are always zero: their weights cannot matter, and H needs a nonzero pivot.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    if group_size == -1:
        scale, zero = _grid(W, bits, sym)
        scales, zeros = [scale], [zero]
    else:
        scales, zeros = [], []

    if desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    else:
        perm = torch.arange(columns, device=W.device)

    damp = percdamp * torch.mean(torch.diag(H))
    H[range(columns), range(columns)] += damp
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) == 0:
        Hinv = torch.cholesky_inverse(L)
        Hinv, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0:
        raise QuantizationError(
            f"the Hessian of a {out_features}x{columns} layer is not positive definite after damping "
            f"(percdamp={percdamp}); raise percdamp or use more calibration samples"
        )

    # Blocks never split a group mid-way unless the group started the block: a group's grid is then
    # always computed from fully error-updated weights.
    if group_size != -1:
        if group_size <= block_size:
            block_size -= block_size % group_size
        elif group_size % block_size:
            block_size = group_size

    Q = torch.zeros_like(W)
    codes = torch.zeros_like(W)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        C1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(count):
            if group_size != -1 and (i1 + i) % group_size == 0:
                group = W[:, i1 : i1 + group_size] if i == 0 else W1[:, i : i + group_size]
                scale, zero = _grid(group, bits, sym)
                scales.append(scale)
                zeros.append(zero)
            w = W1[:, i]
            d = Hinv1[i, i]
            C1[:, i], Q1[:, i] = _quantize_column(w, scale, zero, maxq)
            err = (w - Q1[:, i]) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        codes[:, i1:i2] = C1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    invperm = torch.argsort(perm)
    codes = codes[:, invperm]
    if group_size == -1:
        g_idx = torch.zeros(columns, dtype=torch.int32, device=W.device)
    else:
        # Channel c was visited at position invperm[c]; groups are consecutive in visiting order.
        g_idx = torch.div(invperm, group_size, rounding_mode="floor").to(torch.int32)
    return QuantizedWeight(
        q=codes.to(torch.int32),
        scales=torch.stack(scales),
        zeros=torch.stack(zeros).to(torch.int32),
        g_idx=g_idx,
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
    )


class HessianAccumulator:
    """Running ``H = 2 X^T X / N`` over batches of layer inputs (float32, ``(in, in)``)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.num_tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add inputs ``(..., in)``; the running mean keeps the entries O(1) whatever ``N`` becomes."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        n = x.shape[0]
        if n == 0:
            return
        total = self.num_tokens + n
        self.hessian *= self.num_tokens / total
        x = x * math.sqrt(2 / total)
        self.hessian += x.t() @ x
        self.num_tokens = total


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``||X (W - Wq)^T||^2 / ||X W^T||^2`` computed from ``H ∝ X^T X`` as ``tr(D H D^T) / tr(W H W^T)``."""
    w = weight.detach().float()
    diff = w - quantized.float()
    h = hessian.float()
    signal = float(((w @ h) * w).sum())
    noise = float(((diff @ h) * diff).sum())
    if signal <= 0:
        return 0.0 if noise <= 0 else math.inf
    return max(noise, 0.0) / signal


def _sqnr_db(relative_mse: float) -> float:
    if relative_mse <= 0:
        return math.inf
    return -10 * math.log10(relative_mse)


# ---------------------------------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the capture hook once the first decoder layer's inputs are recorded."""


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise QuantizationError(
            f"quantize_model supports transformers decoder models with model.model.layers (Llama family); "
            f"{type(model).__name__} has none"
        )
    return layers


def _linears_in_order(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[list[str]]:
    """Names of the layer's ``nn.Linear`` in execution order, grouped when they read the same tensor.

    Linears in one group (q/k/v, gate/up) see identical inputs, so they share one calibration pass.
    """
    order: list[tuple[str, torch.Tensor]] = []
    hooks = []
    for name, module in layer.named_modules():
        if type(module) is nn.Linear:

            def hook(_module, args, _name=name):
                # Holding the tensor (not its id) keeps ids from being recycled between linears.
                order.append((_name, args[0]))

            hooks.append(module.register_forward_pre_hook(hook))
    try:
        args, kwargs = inputs[0]
        layer(*args, **kwargs)
    finally:
        for handle in hooks:
            handle.remove()
    groups: list[list[str]] = []
    last_input = None
    seen = set()
    for name, tensor in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and tensor is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = tensor
    return groups


def _layer_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def quantize_model(
    model: nn.Module,
    calibration: torch.Tensor,
    *,
    method: Method = "gptq",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    batch_size: int = 8,
    checkpoint_format: str | None = None,
    progress: bool = False,
) -> QuantizationReport:
    """Quantize every ``nn.Linear`` inside ``model.model.layers`` in place, one decoder layer at a time.

    Embeddings and ``lm_head`` stay float. Each linear becomes a :class:`QuantLinear`.

    Args:
        model: a transformers causal LM with ``model.model.layers`` (Llama family).
        calibration: int64 token ids ``(n, seq_len)`` (e.g. from :func:`adalora_deploy.data.token_blocks`).
        method: ``"gptq"`` (needs the calibration Hessians) or ``"rtn"`` (round-to-nearest; calibration
            is then only used to measure the error).
        bits: 2, 3, 4 or 8.
        group_size: input channels per group, -1 for one group per row.
        sym: symmetric (True) or asymmetric grid.
        desc_act: act-order (GPTQ only).
        percdamp: GPTQ damping as a fraction of the mean Hessian diagonal.
        block_size: GPTQ lazy-batch block size.
        batch_size: calibration sequences per forward pass.
        checkpoint_format: in-memory qzeros format; None picks ``"gptq"`` (v1) for sym and ``"gptq_v2"`` for asym.
        progress: show a tqdm bar over decoder layers.

    Returns:
        Per-layer reconstruction error on the calibration activations.

    Raises:
        QuantizationError: bad settings, an unsupported model or unusable calibration data.
    """
    started = time.perf_counter()
    _check_settings(bits, group_size)
    if method not in ("gptq", "rtn"):
        raise QuantizationError(f"method must be 'gptq' or 'rtn', got {method!r}")
    if desc_act and method == "rtn":
        raise QuantizationError("desc_act (act-order) only applies to method='gptq'")
    if checkpoint_format is None:
        checkpoint_format = "gptq" if sym else "gptq_v2"
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise QuantizationError(f"checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    if checkpoint_format == "gptq" and not sym:
        raise QuantizationError(
            "asymmetric quantization needs checkpoint_format='gptq_v2' (v1 cannot store a zero of 0)"
        )
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
        raise QuantizationError("calibration must be an int64 tensor of token ids (num_samples, seq_len)")
    if calibration.shape[0] == 0 or calibration.shape[1] == 0:
        raise QuantizationError(f"calibration is empty: shape {tuple(calibration.shape)}")
    if batch_size < 1:
        raise QuantizationError(f"batch_size must be >= 1, got {batch_size}")
    layers = _decoder_layers(model)
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if type(module) is nn.Linear:
                try:
                    QuantLinear(module.in_features, module.out_features, bits, group_size)
                except ValueError as error:
                    raise QuantizationError(f"model.layers.{index}.{name}: {error}") from None

    device = next(model.parameters()).device
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        model.config.use_cache = False
    results: list[LayerQuantization] = []
    try:
        with torch.no_grad():
            inputs = _capture_first_layer_inputs(model, layers[0], calibration.to(device), batch_size)
            iterator = range(len(layers))
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(iterator, desc=f"{method} {bits}-bit", unit="layer")
            for index in iterator:
                layer = layers[index]
                results.extend(
                    _quantize_decoder_layer(
                        layer,
                        f"model.layers.{index}",
                        inputs,
                        method=method,
                        bits=bits,
                        group_size=group_size,
                        sym=sym,
                        desc_act=desc_act,
                        percdamp=percdamp,
                        block_size=block_size,
                        checkpoint_format=checkpoint_format,
                    )
                )
                inputs = [
                    (_with_hidden(args, kwargs, _layer_output(layer(*args, **kwargs)))) for args, kwargs in inputs
                ]
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)
    report = QuantizationReport(
        method=method,
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        num_samples=int(calibration.shape[0]),
        seq_len=int(calibration.shape[1]),
        layers=tuple(results),
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "quantized %d linears (%s, %d-bit) in %.1f s; worst SQNR %.2f dB",
        len(results),
        method,
        bits,
        report.seconds,
        report.worst_sqnr_db,
    )
    return report


def _capture_first_layer_inputs(
    model: nn.Module, first: nn.Module, calibration: torch.Tensor, batch_size: int
) -> list[tuple[tuple, dict]]:
    """The ``(args, kwargs)`` the first decoder layer receives, one entry per calibration batch."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        captured.append((tuple(args), dict(kwargs)))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calibration.shape[0], batch_size):
            try:
                model(input_ids=calibration[start : start + batch_size], use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not captured:
        raise QuantizationError("the model's forward never reached model.model.layers[0]; cannot capture its inputs")
    return captured


def _quantize_decoder_layer(
    layer: nn.Module,
    prefix: str,
    inputs: list[tuple[tuple, dict]],
    *,
    method: str,
    bits: int,
    group_size: int,
    sym: bool,
    desc_act: bool,
    percdamp: float,
    block_size: int,
    checkpoint_format: str,
) -> list[LayerQuantization]:
    """Quantize one decoder layer's linears group by group, re-running the layer so that each group's
    Hessian comes from inputs computed with the groups before it already quantized."""
    results = []
    for group in _linears_in_order(layer, inputs):
        modules = {name: layer.get_submodule(name) for name in group}
        accumulators = {name: HessianAccumulator(m.in_features, m.weight.device) for name, m in modules.items()}
        hooks = [
            m.register_forward_pre_hook(lambda _m, args, _acc=accumulators[name]: _acc.add(args[0]))
            for name, m in modules.items()
        ]
        try:
            for args, kwargs in inputs:
                layer(*args, **kwargs)
        finally:
            for handle in hooks:
                handle.remove()
        for name, module in modules.items():
            started = time.perf_counter()
            hessian = accumulators[name].hessian
            if method == "gptq":
                quantized = gptq_quantize(
                    module.weight,
                    hessian,
                    bits=bits,
                    group_size=group_size,
                    sym=sym,
                    desc_act=desc_act,
                    percdamp=percdamp,
                    block_size=block_size,
                )
            else:
                quantized = rtn_quantize(module.weight, bits=bits, group_size=group_size, sym=sym)
            bias = None if module.bias is None else module.bias.detach()
            qlayer = quantized.to_module(bias=bias, checkpoint_format=checkpoint_format)
            rel = relative_output_error(module.weight, qlayer.dequantize_weight(), hessian)
            layer.set_submodule(name, qlayer)
            results.append(
                LayerQuantization(
                    name=f"{prefix}.{name}",
                    shape=(module.out_features, module.in_features),
                    relative_mse=rel,
                    sqnr_db=_sqnr_db(rel),
                    seconds=time.perf_counter() - started,
                )
            )
            logger.debug("%s.%s: relative output MSE %.3e", prefix, name, rel)
    return results


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``quantize`` subcommand; its handler is :func:`run`."""
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a float model folder to a GPTQ checkpoint (GPTQ or round-to-nearest)",
        description="Quantize the linears of a local Hugging Face causal-LM folder and write a GPTQ checkpoint.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face model folder (float weights)")
    parser.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="solver (default: gptq)")
    parser.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4, help="bits per weight (default: 4)")
    parser.add_argument(
        "--group-size", type=int, default=128, help="input channels per group, -1 for one (default: 128)"
    )
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (written as gptq_v2)")
    parser.add_argument(
        "--desc-act", action="store_true", help="act-order: quantize columns by decreasing Hessian diagonal"
    )
    parser.add_argument("--calibration", required=True, metavar="FILE", help="calibration text (.txt or .jsonl)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample (default: 128)")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples, at most (default: 128)")
    parser.add_argument(
        "--percdamp", type=float, default=0.01, help="GPTQ damping, fraction of mean diag(H) (default: 0.01)"
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="output GPTQ model folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Quantize ``args.model_dir`` and write ``args.output``; prints the per-layer error table.

    Raises:
        QuantizationError: bad options or an unreadable model folder (the caller maps it to exit 2).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adalora_deploy.artifacts import check_output_dir
    from adalora_deploy.data import token_blocks

    model_dir = Path(args.model_dir)
    output = Path(args.output)
    if not (model_dir / "config.json").is_file():
        raise QuantizationError(f"MODEL_DIR {model_dir}: no config.json (expected a local Hugging Face model folder)")
    if args.samples < 1:
        raise QuantizationError(f"--samples must be >= 1, got {args.samples}")
    if args.group_size != -1 and args.group_size < 1:
        raise QuantizationError(f"--group-size must be -1 or >= 1, got {args.group_size}")
    if args.desc_act and args.method == "rtn":
        raise QuantizationError("--desc-act only applies to --method gptq")
    check_output_dir(output, args.overwrite)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as error:
        raise QuantizationError(f"MODEL_DIR {model_dir}: cannot load model/tokenizer ({error})") from None
    blocks = token_blocks(args.calibration, tokenizer, args.seq_len)
    if blocks.shape[0] < args.samples:
        logger.warning(
            "%s gives %d samples of %d tokens, fewer than --samples %d; using all",
            args.calibration,
            blocks.shape[0],
            args.seq_len,
            args.samples,
        )
    blocks = blocks[: args.samples]
    report = quantize_model(
        model,
        blocks,
        method=args.method,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        desc_act=args.desc_act,
        percdamp=args.percdamp,
        progress=sys.stderr.isatty(),
    )
    try:
        save_gptq_model(model, output, tokenizer_source=model_dir, overwrite=args.overwrite)
    except GPTQFormatError as error:
        raise QuantizationError(str(error)) from None
    group = "all" if args.group_size == -1 else args.group_size
    print(
        f"{args.method} {args.bits}-bit, group {group}, {'sym' if args.sym else 'asym'}"
        f"{', act-order' if args.desc_act else ''}; {report.num_samples} samples x {report.seq_len} tokens; "
        f"{report.seconds:.1f} s"
    )
    print(report.format_table())
    print(f"worst SQNR {report.worst_sqnr_db:.2f} dB; wrote {output}")
    return 0
