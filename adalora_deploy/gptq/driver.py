"""Quantizing a whole causal LM to GPTQ, one decoder layer at a time.

``quantize_model`` captures the first decoder layer's inputs, quantizes that layer's linears in execution
order (each sees inputs produced by the already-quantized sublayers before it), then feeds the quantized
layer's outputs to the next layer, so peak memory is one layer's Hessians plus the calibration activations.
The per-weight arithmetic is :mod:`adalora_deploy.gptq.solver`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from adalora_deploy.backends.gptq import QuantLinear
from adalora_deploy.errors import QuantizationError
from adalora_deploy.gptq.packing import CHECKPOINT_FORMATS
from adalora_deploy.gptq.solver import (
    HessianAccumulator,
    check_settings,
    gptq_quantize,
    rtn_quantize,
)
from adalora_deploy.metrics import db_from_relative, relative_output_error

__all__ = ["LayerQuantization", "Method", "QuantizationReport", "quantize_model"]

logger = logging.getLogger(__name__)

Method = Literal["gptq", "rtn"]


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
    check_settings(bits, group_size)
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
                    sqnr_db=db_from_relative(rel),
                    seconds=time.perf_counter() - started,
                )
            )
            logger.debug("%s.%s: relative output MSE %.3e", prefix, name, rel)
    return results
