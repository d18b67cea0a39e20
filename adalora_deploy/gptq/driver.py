"""Quantizing a whole causal LM to GPTQ, one decoder layer at a time.

``quantize_model`` captures the first decoder layer's inputs, quantizes that layer's linears in execution
order (each sees inputs produced by the already-quantized sublayers before it), then feeds the quantized
layer's outputs to the next layer, so peak memory is one layer's Hessians plus the calibration activations.
The per-weight arithmetic is :mod:`adalora_deploy.gptq.solver`.

What one decoder layer costs (true-sequential GPTQ, Llama: groups q/k/v, o, gate/up, down)::

    pass 1   norm ─► [stop at q/k/v]                              H(q/k/v) from one shared input
    pass 2   norm ─► qkv_q ─► attn ─► [stop at o]                 H(o); qkv_q outputs recorded
    pass 3   norm ─► (qkv_q replayed) ─► attn ─► o_q ─► norm ─► [stop at gate/up]
    pass 4   ... (q/k/v/o replayed) ─► gate_q, up_q ─► act ─► down := 0 ─► residual   H(down), h_mid
    outputs  h_mid + down_q(X_down)                               no extra layer forward

Each pass stops as soon as the linears it calibrates have read their input; linears quantized in an
earlier pass replay the outputs they produced then (their inputs cannot have changed); the last
linear's output reaches the layer output through the residual sum, so the next layer's inputs come
from one extra matmul instead of a fifth forward (checked once per layer type against a real
forward). Linears that read the same tensor (q/k/v, gate/up) share one Hessian and are solved as one
stacked weight: GPTQ treats rows independently, so this is the same arithmetic with fewer column
steps. Round-to-nearest needs none of this: without calibration data it runs no forward at all.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from adalora_deploy.architectures import UnsupportedArchitectureError, conv1d_as_linear, decoder_layers
from adalora_deploy.errors import QuantizationError
from adalora_deploy.gptq.linear import QuantLinear
from adalora_deploy.gptq.packing import CHECKPOINT_FORMATS
from adalora_deploy.gptq.tables import quantize_lm_head
from adalora_deploy.gptq.solver import (
    HessianAccumulator,
    QuantizedWeight,
    check_settings,
    gptq_quantize,
    one_intra_op_thread,
    rtn_quantize,
)
from adalora_deploy.metrics import db_from_relative, relative_output_error
from adalora_deploy.quantization import GPTQ_METHODS, GPTQMethod

__all__ = ["LayerQuantization", "Method", "QuantizationReport", "QuantizationTimings", "quantize_model"]

logger = logging.getLogger(__name__)

Method = GPTQMethod


@dataclass(frozen=True)
class LayerQuantization:
    """How well one linear layer was quantized.

    Attributes:
        name: qualified module name.
        shape: ``(out, in)``.
        relative_mse: ``||X (W - Wq)^T||^2 / ||X W^T||^2`` over the calibration tokens; without
            calibration data (round-to-nearest alone) the weight error ``||W - Wq||^2 / ||W||^2``
            (see :attr:`QuantizationReport.error_basis`).
        sqnr_db: ``-10 log10(relative_mse)``, the signal-to-quantization-noise ratio.
        seconds: time spent quantizing it: its rows' share of the solver time of its stacked group,
            plus its packing and error measurement.
    """

    name: str
    shape: tuple[int, int]
    relative_mse: float
    sqnr_db: float
    seconds: float


@dataclass(frozen=True)
class QuantizationTimings:
    """Where the wall time of :func:`quantize_model` went, in seconds.

    Attributes:
        capture: running the model up to the first decoder layer to record its inputs.
        forwards: decoder-layer forwards on the calibration data (Hessian hooks excluded).
        hessians: accumulating ``X^T X``.
        solve: the GPTQ solver or round-to-nearest.
        pack: packing the integers into :class:`QuantLinear` modules.
        error: measuring the per-layer error.
        total: the whole call (the rest is bookkeeping).
    """

    capture: float
    forwards: float
    hessians: float
    solve: float
    pack: float
    error: float
    total: float

    @property
    def other(self) -> float:
        """Time not in any of the parts above."""
        return self.total - (self.capture + self.forwards + self.hessians + self.solve + self.pack + self.error)

    def format(self) -> str:
        """One line: ``forwards 12.3 s, hessians ...``."""
        parts = ("capture", "forwards", "hessians", "solve", "pack", "error")
        text = ", ".join(f"{part} {getattr(self, part):.1f} s" for part in parts)
        return f"{text}, other {self.other:.1f} s; total {self.total:.1f} s"


@dataclass(frozen=True)
class QuantizationReport:
    """Result of :func:`quantize_model`.

    Attributes:
        method: ``"gptq"`` or ``"rtn"``.
        bits, group_size, sym, desc_act: the quantization settings.
        num_samples: calibration sequences used (0: none).
        seq_len: tokens per calibration sequence (0: none).
        layers: one entry per quantized linear, in quantization order.
        seconds: total wall time.
        timings: the split of ``seconds``.
        error_basis: ``"outputs"`` (errors measured on the calibration activations) or ``"weights"``
            (no calibration data: weight-space errors).
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
    timings: QuantizationTimings | None = None
    error_basis: Literal["outputs", "weights"] = "outputs"

    @property
    def worst_sqnr_db(self) -> float:
        """Lowest per-layer SQNR (dB)."""
        return min(layer.sqnr_db for layer in self.layers)

    def format_table(self) -> str:
        """A plain-text table, one row per layer."""
        width = max([len("layer")] + [len(layer.name) for layer in self.layers])
        error = "rel. MSE" if self.error_basis == "outputs" else "weight MSE"
        lines = [f"{'layer':<{width}}  {'shape (out, in)':>16}  {error:>10}  {'SQNR dB':>8}  {'time s':>7}"]
        for layer in self.layers:
            shape = f"{layer.shape[0]}x{layer.shape[1]}"
            lines.append(
                f"{layer.name:<{width}}  {shape:>16}  {layer.relative_mse:>10.3e}  "
                f"{layer.sqnr_db:>8.2f}  {layer.seconds:>7.2f}"
            )
        return "\n".join(lines)


class _StopForward(Exception):
    """Raised by a hook once a calibration pass has recorded everything it needs."""


_ADDITIVE_CHECK_RTOL = 1e-5
"""How close ``residual + last_linear(x)`` must come to a real forward of the quantized layer for the
shortcut of :func:`_quantize_decoder_layer` to be used. Measured on Llama layers: 0.0 (the same single
addition)."""


class _Clock:
    """Accumulates wall time per part of :class:`QuantizationTimings`."""

    PARTS = ("capture", "forwards", "hessians", "solve", "pack", "error")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)

    @contextmanager
    def __call__(self, part: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] += time.perf_counter() - started

    @contextmanager
    def forwards(self):
        """Times layer forwards, leaving out the Hessian time spent in hooks inside them."""
        hessians = self.seconds["hessians"]
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds["forwards"] += time.perf_counter() - started - (self.seconds["hessians"] - hessians)


@dataclass(frozen=True)
class _Settings:
    method: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    percdamp: float
    block_size: int
    checkpoint_format: str
    true_sequential: bool
    act_group_aware: bool


@dataclass(frozen=True)
class _LayerPlan:
    """How a decoder layer's linears are visited, found once per layer structure.

    Attributes:
        groups: linear names in execution order; the members of a group read the same tensor.
        replayable: every linear ran exactly once per forward, so its outputs can be recorded per
            batch and replayed.
    """

    groups: tuple[tuple[str, ...], ...]
    replayable: bool


class _Replay(nn.Module):
    """Stands in for a quantized linear during a calibration pass, returning the output it produced for
    the same batch in an earlier pass: its input has not changed since (everything before it is fixed)."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs = outputs
        self.batch = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.outputs[self.batch]
        if output.shape[:-1] != x.shape[:-1]:
            raise QuantizationError("a replayed linear saw a different batch shape; calibration passes diverged")
        self.batch += 1
        return output


class _Zero(nn.Module):
    """Stands in for the layer's last linear: keeps its input and contributes nothing, so the layer
    returns what the linear's output is added to (the residual stream)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder layer list, where :mod:`adalora_deploy.architectures` says the family keeps it."""
    try:
        path, layers = decoder_layers(model)
    except UnsupportedArchitectureError as error:
        raise QuantizationError(f"quantize_model: {error}") from None
    for index, layer in enumerate(layers):
        if conv1d_as_linear(layer):  # GPT-2: quantized as the equivalent nn.Linear (weight transposed)
            logger.debug("%s.%d: Conv1D projections solved as nn.Linear", path, index)
    return path, layers


def _linear_names(layer: nn.Module) -> tuple[str, ...]:
    return tuple(name for name, module in layer.named_modules() if type(module) is nn.Linear)


def _plan_layer(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> _LayerPlan:
    """Run the layer once on the first batch and record the order in which its ``nn.Linear`` read
    their inputs, grouping linears that read the same tensor (q/k/v, gate/up): they share one Hessian."""
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
    seen: set[str] = set()
    for name, tensor in order:
        if name in seen:
            continue
        seen.add(name)
        if groups and tensor is last_input:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_input = tensor
    replayable = len(order) == len(seen)
    return _LayerPlan(groups=tuple(tuple(group) for group in groups), replayable=replayable)


def _layer_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def quantize_model(
    model: nn.Module,
    calibration: torch.Tensor | None = None,
    *,
    method: Method = "gptq",
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    desc_act: bool = False,
    percdamp: float = 0.01,
    block_size: int = 128,
    batch_size: int = 8,
    true_sequential: bool = True,
    act_group_aware: bool = False,
    calibration_dtype: torch.dtype | None = None,
    checkpoint_format: str | None = None,
    tables: bool = False,
    progress: bool = False,
) -> QuantizationReport:
    """Quantize every ``nn.Linear`` of the decoder layers in place, one decoder layer at a time.

    Each linear becomes a :class:`QuantLinear`. Embeddings and ``lm_head`` stay float unless ``tables``.

    Args:
        model: a transformers causal LM of a family in :mod:`adalora_deploy.architectures` (its decoder
            layer list found there; GPT-2's Conv1D projections become the equivalent ``nn.Linear`` first).
        calibration: int64 token ids ``(n, seq_len)`` (e.g. from :func:`adalora_deploy.data.token_blocks`).
            Required by GPTQ. Round-to-nearest does not need it: with None it runs no forward at all and
            reports weight-space errors; given, it is used only to measure the output errors.
        method: ``"gptq"`` or ``"rtn"`` (round-to-nearest).
        bits: 2, 3, 4 or 8.
        group_size: input channels per group, -1 for one group per row.
        sym: symmetric (True) or asymmetric grid.
        desc_act: act-order (GPTQ only).
        percdamp: GPTQ damping as a fraction of the mean Hessian diagonal.
        block_size: GPTQ lazy-batch block size.
        batch_size: calibration sequences per forward pass.
        true_sequential: each group of linears of a decoder layer is calibrated on inputs computed with
            the groups before it already quantized (the default, as in gptqmodel). False: all Hessians of
            a layer come from one pass of the float layer.
        act_group_aware: GPTQ with group-aware reordering (see :func:`gptq_quantize`); ignored with
            ``desc_act`` or ``group_size == -1``.
        calibration_dtype: run the calibration forwards under autocast to this dtype (e.g.
            ``torch.bfloat16``: several times faster matmuls on CPUs with AMX/AVX512-BF16, as gptqmodel
            does by default on CPU); None keeps the model's dtype. Weights, Hessians and the solver stay
            float32 either way.
        checkpoint_format: in-memory qzeros format; None picks ``"gptq"`` (v1) for sym and ``"gptq_v2"`` for asym.
        tables: quantize the lm_head too, with the same settings, on the last layer's normalized outputs
            (a tied embedding becomes the same dequantized table; see :mod:`adalora_deploy.gptq.tables`).
        progress: show a tqdm bar over decoder layers.

    Returns:
        Per-layer errors and the time split.

    Raises:
        QuantizationError: bad settings, an unsupported model or unusable calibration data.
    """
    started = time.perf_counter()
    check_settings(bits, group_size)
    if method not in GPTQ_METHODS:
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
    if calibration is None:
        if method == "gptq":
            raise QuantizationError("method='gptq' needs calibration token ids (num_samples, seq_len)")
    else:
        if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype != torch.long:
            raise QuantizationError("calibration must be an int64 tensor of token ids (num_samples, seq_len)")
        if calibration.shape[0] == 0 or calibration.shape[1] == 0:
            raise QuantizationError(f"calibration is empty: shape {tuple(calibration.shape)}")
    if batch_size < 1:
        raise QuantizationError(f"batch_size must be >= 1, got {batch_size}")
    path, layers = _decoder_layers(model)
    targets = [(f"{path}.{index}.{name}", module) for index, layer in enumerate(layers)
               for name, module in layer.named_modules() if type(module) is nn.Linear]
    if tables:
        head = model.get_output_embeddings()
        if type(head) is not nn.Linear:
            raise QuantizationError(f"tables: the lm_head is {type(head).__name__}, not nn.Linear")
        targets.append(("tables: lm_head", head))
    for name, module in targets:  # every layout refused before any work
        try:
            QuantLinear(module.in_features, module.out_features, bits, group_size)
        except ValueError as error:
            raise QuantizationError(f"{name}: {error}") from None
    settings = _Settings(
        method=method,
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        percdamp=percdamp,
        block_size=block_size,
        checkpoint_format=checkpoint_format,
        true_sequential=true_sequential,
        act_group_aware=act_group_aware,
    )
    clock = _Clock()
    iterator = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"{method} {bits}-bit", unit="layer")

    results: list[LayerQuantization] = []
    if calibration is None:
        # Only elementwise work on weights: one thread avoids the cross-thread waits of small ops.
        with torch.no_grad(), one_intra_op_thread():
            for index in iterator:
                results.extend(_round_decoder_layer(layers[index], f"{path}.{index}", settings, clock))
            if tables:
                results.append(_quantize_table(model, None, settings, clock))
    else:
        device = next(model.parameters()).device
        was_training = model.training
        use_cache = getattr(model.config, "use_cache", None)
        model.eval()
        if use_cache is not None:
            model.config.use_cache = False
        autocast = (
            torch.autocast(device.type, dtype=calibration_dtype) if calibration_dtype is not None else nullcontext()
        )
        try:
            with torch.no_grad(), autocast:
                with clock("capture"):
                    inputs = _capture_first_layer_inputs(model, layers[0], calibration.to(device), batch_size)
                plans: dict[tuple, _LayerPlan] = {}
                additive: dict[tuple, bool | None] = {}
                for index in iterator:
                    layer = layers[index]
                    key = (type(layer), _linear_names(layer))
                    if key not in plans:
                        with clock.forwards():
                            plans[key] = _plan_layer(layer, inputs)
                        additive[key] = None
                    layer_results, inputs, additive[key] = _quantize_decoder_layer(
                        layer, f"{path}.{index}", inputs, plans[key], settings, clock, additive[key]
                    )
                    results.extend(layer_results)
                if tables:
                    last_hidden = [args[0] if args else kwargs["hidden_states"] for args, kwargs in inputs]
                    results.append(_quantize_table(model, last_hidden, settings, clock))
        finally:
            if use_cache is not None:
                model.config.use_cache = use_cache
            model.train(was_training)
    seconds = time.perf_counter() - started
    report = QuantizationReport(
        method=method,
        bits=bits,
        group_size=group_size,
        sym=sym,
        desc_act=desc_act,
        num_samples=0 if calibration is None else int(calibration.shape[0]),
        seq_len=0 if calibration is None else int(calibration.shape[1]),
        layers=tuple(results),
        seconds=seconds,
        timings=QuantizationTimings(**clock.seconds, total=seconds),
        error_basis="weights" if calibration is None else "outputs",
    )
    logger.info(
        "quantized %d linears (%s, %d-bit) in %.1f s (%s); worst SQNR %.2f dB",
        len(results),
        method,
        bits,
        report.seconds,
        report.timings.format(),
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
        raise QuantizationError("the model's forward never reached its first decoder layer; cannot capture its inputs")
    return captured


def _quantize_table(model: nn.Module, last_hidden: list[torch.Tensor] | None, settings: _Settings,
                    clock: _Clock) -> LayerQuantization:
    """The lm_head (and a tied embedding) through :func:`quantize_lm_head`, with its error like any layer's."""
    started = time.perf_counter()
    weight = model.get_output_embeddings().weight.detach().float().clone()
    with clock("solve"):
        quantized, hessian = quantize_lm_head(
            model, last_hidden, method=settings.method, bits=settings.bits, group_size=settings.group_size,
            sym=settings.sym, desc_act=settings.desc_act, percdamp=settings.percdamp,
            block_size=settings.block_size, checkpoint_format=settings.checkpoint_format,
        )
    with clock("error"):
        if hessian is not None:
            rel = relative_output_error(weight, quantized.dequantize(), hessian)
        else:
            signal = float((weight**2).sum())
            rel = 0.0 if signal <= 0 else float(((weight - quantized.dequantize()) ** 2).sum()) / signal
    return LayerQuantization(name="lm_head", shape=tuple(weight.shape), relative_mse=rel,
                             sqnr_db=db_from_relative(rel), seconds=time.perf_counter() - started)


def _round_decoder_layer(layer: nn.Module, prefix: str, settings: _Settings, clock: _Clock) -> list[LayerQuantization]:
    """Round-to-nearest without calibration data: no forward, weight-space errors."""
    results = []
    for name in _linear_names(layer):
        started = time.perf_counter()
        module = layer.get_submodule(name)
        with clock("solve"):
            quantized = rtn_quantize(
                module.weight, bits=settings.bits, group_size=settings.group_size, sym=settings.sym
            )
        with clock("pack"):
            bias = None if module.bias is None else module.bias.detach()
            qlayer = quantized.to_module(bias=bias, checkpoint_format=settings.checkpoint_format)
        with clock("error"):
            weight = module.weight.detach().float()
            signal = float((weight**2).sum())
            noise = float(((weight - quantized.dequantize()) ** 2).sum())
            rel = 0.0 if signal <= 0 else noise / signal
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
    return results


def _split_rows(quantized: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """Undo the stacking of several weights along ``out``."""
    if len(sizes) == 1:
        return [quantized]
    parts, start = [], 0
    for size in sizes:
        rows = slice(start, start + size)
        parts.append(
            QuantizedWeight(
                q=quantized.q[rows],
                scales=quantized.scales[:, rows],
                zeros=quantized.zeros[:, rows],
                g_idx=quantized.g_idx,
                bits=quantized.bits,
                group_size=quantized.group_size,
                sym=quantized.sym,
                desc_act=quantized.desc_act,
            )
        )
        start += size
    return parts


def _quantize_group(
    layer: nn.Module,
    prefix: str,
    group: tuple[str, ...],
    hessian: torch.Tensor,
    settings: _Settings,
    clock: _Clock,
) -> list[LayerQuantization]:
    """Solve the linears of ``group`` (same input, same Hessian) as one stacked weight and swap in
    their :class:`QuantLinear`."""
    modules = [layer.get_submodule(name) for name in group]
    weights = [module.weight.detach() for module in modules]
    started = time.perf_counter()
    with clock("solve"), torch.autocast(hessian.device.type, enabled=False):
        stacked = torch.cat(weights) if len(weights) > 1 else weights[0]
        if settings.method == "gptq":
            quantized = gptq_quantize(
                stacked,
                hessian,
                bits=settings.bits,
                group_size=settings.group_size,
                sym=settings.sym,
                desc_act=settings.desc_act,
                percdamp=settings.percdamp,
                block_size=settings.block_size,
                act_group_aware=settings.act_group_aware,
            )
        else:
            quantized = rtn_quantize(stacked, bits=settings.bits, group_size=settings.group_size, sym=settings.sym)
    solve_seconds = time.perf_counter() - started
    results = []
    for name, module, part in zip(group, modules, _split_rows(quantized, [w.shape[0] for w in weights])):
        started = time.perf_counter()
        with clock("pack"), one_intra_op_thread():
            bias = None if module.bias is None else module.bias.detach()
            qlayer = part.to_module(bias=bias, checkpoint_format=settings.checkpoint_format)
        with clock("error"), torch.autocast(hessian.device.type, enabled=False):
            rel = relative_output_error(module.weight, part.dequantize(), hessian)
        layer.set_submodule(name, qlayer)
        share = solve_seconds * module.out_features / stacked.shape[0]
        results.append(
            LayerQuantization(
                name=f"{prefix}.{name}",
                shape=(module.out_features, module.in_features),
                relative_mse=rel,
                sqnr_db=db_from_relative(rel),
                seconds=share + time.perf_counter() - started,
            )
        )
        logger.debug("%s.%s: relative output MSE %.3e", prefix, name, rel)
    return results


def _quantize_decoder_layer(
    layer: nn.Module,
    prefix: str,
    inputs: list[tuple[tuple, dict]],
    plan: _LayerPlan,
    settings: _Settings,
    clock: _Clock,
    additive: bool | None,
) -> tuple[list[LayerQuantization], list[tuple[tuple, dict]], bool | None]:
    """Quantize one decoder layer and compute the next layer's inputs (see the module docstring).

    Args:
        inputs: ``(args, kwargs)`` of the layer, one entry per calibration batch.
        additive: whether the layer output is known to be ``residual + last_linear(x)`` for this layer
            structure (None: not checked yet).

    Returns:
        The per-linear results, the next layer's inputs and the updated ``additive``.
    """
    groups = plan.groups
    stages = [[group] for group in groups] if settings.true_sequential else [list(groups)]
    recorded: dict[str, list[torch.Tensor]] = {}
    done: list[str] = []  # linears quantized in earlier stages
    results: list[LayerQuantization] = []
    residual: list[torch.Tensor] | None = None
    zero: _Zero | None = None
    for stage_index, stage in enumerate(stages):
        last_stage = stage_index == len(stages) - 1
        use_zero = (
            last_stage
            and settings.true_sequential
            and plan.replayable
            and additive is not False
            and len(stage[0]) == 1
        )
        accumulators = [
            HessianAccumulator(layer.get_submodule(group[0]).in_features, layer.get_submodule(group[0]).weight.device)
            for group in stage
        ]
        swapped: dict[str, nn.Module] = {}
        handles = []
        try:
            if plan.replayable:
                for name in done:
                    if name in recorded:
                        swapped[name] = layer.get_submodule(name)
                        layer.set_submodule(name, _Replay(recorded[name]))
                    else:
                        store = recorded.setdefault(name, [])
                        handles.append(
                            layer.get_submodule(name).register_forward_hook(
                                lambda _m, _a, output, _store=store: _store.append(output)
                            )
                        )
            for position, (group, accumulator) in enumerate(zip(stage, accumulators)):
                stop = position == len(stage) - 1 and not use_zero

                def hook(_module, args, _acc=accumulator, _stop=stop):
                    with clock("hessians"), torch.autocast(args[0].device.type, enabled=False):
                        _acc.add(args[0])
                    if _stop:
                        raise _StopForward

                if use_zero:
                    swapped[group[0]] = layer.get_submodule(group[0])
                    zero = _Zero(swapped[group[0]].out_features)
                    layer.set_submodule(group[0], zero)
                    handles.append(zero.register_forward_pre_hook(hook))
                else:
                    handles.append(layer.get_submodule(group[0]).register_forward_pre_hook(hook))
            outputs = []
            with clock.forwards():
                for args, kwargs in inputs:
                    try:
                        outputs.append(_layer_output(layer(*args, **kwargs)))
                    except _StopForward:
                        pass
        finally:
            for handle in handles:
                handle.remove()
            for name, module in swapped.items():
                layer.set_submodule(name, module)
        if use_zero:
            residual = outputs
        for group, accumulator in zip(stage, accumulators):
            results.extend(_quantize_group(layer, prefix, group, accumulator.hessian, settings, clock))
            done.extend(group)

    with clock.forwards():
        hidden = None
        if residual is not None and zero is not None:
            last = layer.get_submodule(groups[-1][0])
            hidden = [r + last(x) for r, x in zip(residual, zero.inputs)]
            if additive is None:
                args, kwargs = inputs[0]
                reference = _layer_output(layer(*args, **kwargs))
                scale = float(reference.abs().max()) or 1.0
                additive = float((reference - hidden[0]).abs().max()) <= _ADDITIVE_CHECK_RTOL * scale
                if not additive:
                    logger.info("%s: the last linear does not add to the layer output; using full forwards", prefix)
                    hidden = None
        if hidden is None:
            swapped = {}
            try:
                for name in done:
                    if name in recorded and len(recorded[name]) == len(inputs):
                        swapped[name] = layer.get_submodule(name)
                        layer.set_submodule(name, _Replay(recorded[name]))
                hidden = [_layer_output(layer(*args, **kwargs)) for args, kwargs in inputs]
            finally:
                for name, module in swapped.items():
                    layer.set_submodule(name, module)
    return results, [_with_hidden(args, kwargs, h) for (args, kwargs), h in zip(inputs, hidden)], additive
