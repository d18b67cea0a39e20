"""Parity between a reference model and its ONNX export: per-output metrics, two tiers, every failure collected.

Tiers (see docs/ONNX.md "Parity tiers"):

- ``"exact"``: graphs that compute the reference's arithmetic (fp32 merged, quantized bases through kernels
  that reproduce torch's): every output within :func:`exact_tolerance` of the reference, scaled to that
  output's magnitude and the model's width and depth (:class:`ExactScale`), and identical greedy tokens.
- ``"lossy"``: accuracy_level 4, re-quantized weights, fp16: judged by what changes a user's output, on
  logits only: top-1 agreement >= :data:`LOSSY_MIN_TOP1` and mean KL <= :data:`LOSSY_MAX_KL` (and, with an
  eval file, :func:`compare_evaluations`); never an elementwise tolerance.

Why the exact tolerance has this shape: two fp32 evaluations of one function that differ only in summation
order (torch vs onnxruntime kernels) differ in each length-``K`` dot product by about ``u sqrt(K)`` of its
magnitude (``u = 2**-24``, rounding errors as a random walk: Higham, "Accuracy and Stability of Numerical
Algorithms", 2nd ed., section 3.3), and a decoder adds ``2 L`` such sublayer outputs (attention and MLP of
``L`` layers) into its residual stream, where independent errors add in quadrature: ``sqrt(2 L)``. Measured on
SmolLM2-135M (K = 1536, L = 30, max |logits| 33.9 over 512 positions): torch fp32 vs fp64 1e-4, the exact
GPTQ graph vs torch 1.6e-4; the bound is 6.1e-4; moving one int4 weight by one quantization step moves the
logits by 2.8e-3 to 1.2e-2, so it fails. On the tiny test Llama (K 128, L 2) the bound is ~6e-6 vs 3e-7
measured.

Pad positions (left padding) are excluded through ``valid`` masks: a fully masked query row is undefined
(onnxruntime and torch's SDPA fill it differently) and never read by later tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np
import torch
from torch import nn

from adalora_deploy.errors import ParityError
from adalora_deploy.metrics import RowMetrics, row_metrics

from ..build.graph import DecoderWrapper, adapter_input_names
from ..build.modules import runtime_factors
from ..runtime.session import DecoderSession, adapter_feeds, as_float32

__all__ = [
    "ExactScale",
    "EvalComparison",
    "FP32_UNIT_ROUNDOFF",
    "LOSSY_MAX_ACCURACY_DROP",
    "LOSSY_MAX_KL",
    "LOSSY_MAX_PERPLEXITY_RATIO",
    "LOSSY_MIN_TOP1",
    "OutputParity",
    "ParityError",
    "ParityReport",
    "compare_evaluations",
    "compare_outputs",
    "decoder_parity",
    "decoder_valid_masks",
    "exact_tolerance",
    "torch_greedy",
]

logger = logging.getLogger(__name__)

Tier = Literal["exact", "lossy"]

FP32_UNIT_ROUNDOFF = 2.0**-24
"""Unit roundoff of float32 (half its machine epsilon)."""
LOSSY_MIN_TOP1 = 0.95
"""Fraction of positions whose next token (argmax) the graph must keep. 512 positions give a standard
error of 0.01 at 0.95; exact graphs measure 1.000, the fast int4 GPTQ serving graph on SmolLM2 0.97-0.99,
round-to-nearest int4 merges of a fine-tuned SmolLM2 0.31-0.85 (their task accuracy fell 0.705 -> 0.51)."""
LOSSY_MAX_KL = 0.05
"""Mean KL(reference || graph) of the next-token distribution, nats per position."""
LOSSY_MAX_PERPLEXITY_RATIO = math.exp(LOSSY_MAX_KL)
"""Perplexity may grow by at most ``exp(LOSSY_MAX_KL)`` (1.051): the extra cross-entropy a graph can add
is about its KL from the reference when the reference fits the text."""
LOSSY_MAX_ACCURACY_DROP = 0.01
"""Task accuracy (eval file) may fall by at most one point below the reference's."""


def exact_tolerance(magnitude: float, *, accumulation: int, depth: int) -> float:
    """Largest difference two fp32 evaluations of one model may show: ``u sqrt(K) sqrt(2 L) magnitude``.

    Args:
        magnitude: max |reference| of the compared output (e.g. of the logits).
        accumulation: K, the longest dot product (``max(hidden_size, intermediate_size)`` for a decoder).
        depth: L, decoder layers (each adds an attention and an MLP output to the residual stream).
    """
    return FP32_UNIT_ROUNDOFF * math.sqrt(max(accumulation, 1)) * math.sqrt(2 * max(depth, 1)) * float(magnitude)


@dataclass(frozen=True)
class ExactScale:
    """The width and depth that set :func:`exact_tolerance` for one model."""

    accumulation: int
    depth: int

    @classmethod
    def of(cls, model_or_config: Any) -> ExactScale:
        """From a transformers model or config: K = max(hidden, intermediate), L = decoder layers."""
        config = getattr(model_or_config, "config", model_or_config)
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0) or 1)
        inner = int(getattr(config, "intermediate_size", 0) or getattr(config, "n_inner", 0) or 4 * hidden)
        depth = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0) or 1)
        return cls(accumulation=max(hidden, inner), depth=depth)

    def tolerance(self, reference: Any) -> float:
        """The exact tier's bound for an output whose reference values are ``reference``."""
        values = np.abs(as_float32(reference))
        return exact_tolerance(float(values.max(initial=0.0)), accumulation=self.accumulation, depth=self.depth)


@dataclass(frozen=True)
class OutputParity(RowMetrics):
    """:class:`~adalora_deploy.metrics.RowMetrics` of one named output over its valid positions."""

    name: str = ""
    tolerance: float | None = None
    """The exact tier's bound for this output (``None`` in the lossy tier)."""


@dataclass(frozen=True)
class ParityReport:
    """All metrics and all failures of one comparison."""

    tier: Tier
    outputs: tuple[OutputParity, ...]
    tokens_equal: bool | None
    """Greedy token sequences identical (``None`` when not compared)."""
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def raise_for_failures(self) -> None:
        """Raise :class:`ParityError` listing every failure, if any."""
        if self.failures:
            raise ParityError(f"{len(self.failures)} parity failure(s) ({self.tier} tier):\n  " + "\n  ".join(self.failures))

    def __getitem__(self, name: str) -> OutputParity:
        for output in self.outputs:
            if output.name == name:
                return output
        raise KeyError(name)


def _rows(array: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    if valid is None:
        return array.reshape(-1, array.shape[-1])
    mask = np.broadcast_to(np.asarray(valid, dtype=bool), array.shape[:-1])
    return array[mask]


def _output_metrics(name: str, reference: np.ndarray, candidate: np.ndarray, is_logits: bool) -> OutputParity:
    metrics = row_metrics(reference, candidate, logits=is_logits)
    return OutputParity(**dataclasses.asdict(metrics), name=name)


def compare_outputs(
    reference: Mapping[str, torch.Tensor | np.ndarray],
    candidate: Mapping[str, torch.Tensor | np.ndarray],
    *,
    tier: Tier = "exact",
    scale: ExactScale | None = None,
    valid: Mapping[str, np.ndarray] | None = None,
    logits_name: str = "logits",
    reference_tokens: torch.Tensor | np.ndarray | None = None,
    candidate_tokens: torch.Tensor | np.ndarray | None = None,
) -> ParityReport:
    """Compare named outputs (reference vs onnxruntime candidate) and greedy tokens.

    Args:
        reference, candidate: output name -> tensor; every reference name must be in ``candidate``.
        tier: ``"exact"`` or ``"lossy"`` (thresholds in the module docstring).
        scale: the model's width and depth; required for the exact tier (each output's bound is
            ``scale.tolerance(reference output)``).
        valid: output name -> boolean mask broadcastable to ``output.shape[:-1]`` selecting the rows that
            count (e.g. :func:`decoder_valid_masks`); outputs without a mask count every row.
        logits_name: the output that gets top-1 and KL (the lossy tier judges only this output).
        reference_tokens, candidate_tokens: greedy sequences to require identical (exact tier) or report.

    Returns:
        A :class:`ParityReport`; call ``raise_for_failures()`` to turn failures into one error.
    """
    if tier not in ("exact", "lossy"):
        raise ValueError(f"compare_outputs: tier {tier!r} is not 'exact' or 'lossy'")
    if tier == "exact" and scale is None and reference:
        raise ValueError("compare_outputs: the exact tier needs the model's ExactScale (its width and depth)")
    valid = valid or {}
    failures: list[str] = []
    outputs: list[OutputParity] = []
    for name, ref in reference.items():
        if name not in candidate:
            failures.append(f"{name}: missing from the candidate outputs")
            continue
        ref_arr, cand_arr = as_float32(ref), as_float32(candidate[name])
        if ref_arr.shape != cand_arr.shape:
            failures.append(f"{name}: shape {cand_arr.shape} != reference {ref_arr.shape}")
            continue
        mask = valid.get(name)
        ref_rows, cand_rows = _rows(ref_arr, mask), _rows(cand_arr, mask)
        metrics = _output_metrics(name, ref_rows, cand_rows, name == logits_name)
        if tier == "exact":
            metrics = dataclasses.replace(metrics, tolerance=scale.tolerance(ref_rows))
        outputs.append(metrics)
        if not np.isfinite(metrics.max_abs):
            failures.append(f"{name}: non-finite values")
        elif tier == "exact" and metrics.max_abs > metrics.tolerance:
            failures.append(f"{name}: max abs {metrics.max_abs:.3g} > {metrics.tolerance:.3g} (fp32 reassociation "
                            f"bound for K={scale.accumulation}, L={scale.depth}, max |ref| "
                            f"{float(np.abs(ref_rows).max(initial=0.0)):.3g})")
        if tier == "lossy" and name == logits_name:
            if metrics.top1_agreement is not None and metrics.top1_agreement < LOSSY_MIN_TOP1:
                failures.append(f"{name}: top-1 agreement {metrics.top1_agreement:.3f} < {LOSSY_MIN_TOP1} over "
                                f"{len(ref_rows)} positions")
            if metrics.mean_kl is not None and metrics.mean_kl > LOSSY_MAX_KL:
                failures.append(f"{name}: mean KL {metrics.mean_kl:.4g} > {LOSSY_MAX_KL} nats")
    tokens_equal = None
    if reference_tokens is not None and candidate_tokens is not None:
        ref_tokens = np.asarray(reference_tokens.cpu() if isinstance(reference_tokens, torch.Tensor) else reference_tokens)
        cand_tokens = np.asarray(candidate_tokens.cpu() if isinstance(candidate_tokens, torch.Tensor) else candidate_tokens)
        tokens_equal = ref_tokens.shape == cand_tokens.shape and bool((ref_tokens == cand_tokens).all())
        if tier == "exact" and not tokens_equal:
            failures.append(f"greedy tokens differ: reference {ref_tokens.tolist()} vs candidate {cand_tokens.tolist()}")
    report = ParityReport(tier=tier, outputs=tuple(outputs), tokens_equal=tokens_equal, failures=tuple(failures))
    for output in outputs:
        logger.debug("parity %s: max abs %.3g, min cosine %.6f", output.name, output.max_abs, output.cosine_min)
    return report


@dataclass(frozen=True)
class EvalComparison:
    """A graph's eval-file results beside its reference's (:func:`adalora_deploy.evaluation.evaluate`)."""

    reference: Any
    """:class:`~adalora_deploy.evaluation.EvalResult` of the reference model."""
    candidate: Any
    """:class:`~adalora_deploy.evaluation.EvalResult` of the graph."""
    answer_agreement: float | None
    """Fraction of task lines where both chose the same answer."""
    failures: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.to_dict(), "candidate": self.candidate.to_dict(),
                "answer_agreement": self.answer_agreement, "failures": list(self.failures)}


def compare_evaluations(reference: Any, candidate: Any) -> EvalComparison:
    """Judge a graph's task accuracy and perplexity against its reference's (both tiers).

    Fails when accuracy falls by more than :data:`LOSSY_MAX_ACCURACY_DROP` or perplexity grows by more than
    :data:`LOSSY_MAX_PERPLEXITY_RATIO`.
    """
    failures = []
    agreement = None
    if reference.accuracy is not None and candidate.accuracy is not None:
        agreement = float(np.mean([a == b for a, b in zip(reference.answers, candidate.answers)]))
        if candidate.accuracy < reference.accuracy - LOSSY_MAX_ACCURACY_DROP - 1e-12:
            failures.append(f"task accuracy {candidate.accuracy:.3f} < {reference.accuracy:.3f} - "
                            f"{LOSSY_MAX_ACCURACY_DROP} (answers agree on {agreement:.3f} of "
                            f"{len(reference.answers)} examples)")
    if math.isfinite(reference.perplexity) and candidate.perplexity > reference.perplexity * LOSSY_MAX_PERPLEXITY_RATIO:
        failures.append(f"perplexity {candidate.perplexity:.4g} > {reference.perplexity:.4g} x "
                        f"{LOSSY_MAX_PERPLEXITY_RATIO:.3f}")
    return EvalComparison(reference=reference, candidate=candidate, answer_agreement=agreement,
                          failures=tuple(failures))


def decoder_valid_masks(attention_mask: np.ndarray | torch.Tensor, seq_len: int, num_layers: int) -> dict[str, np.ndarray]:
    """``valid`` masks for one decoding step: logits rows of non-pad query tokens, present rows of non-pad keys.

    Args:
        attention_mask: [batch, total_seq] of the step.
        seq_len: the step's query length (``input_ids.shape[1]``).
        num_layers: number of ``present.{i}`` pairs.
    """
    mask = np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor) else attention_mask).astype(bool)
    masks = {"logits": mask[:, -seq_len:]}
    for i in range(num_layers):
        for kv in ("key", "value"):
            masks[f"present.{i}.{kv}"] = mask[:, None, :]
    return masks


def decoder_parity(
    model: torch.nn.Module,
    decoder: "DecoderSession",
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    tier: Tier = "exact",
    decode_steps: int = 3,
    max_new_tokens: int = 8,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    scale: ExactScale | None = None,
) -> ParityReport:
    """Full parity of an exported decoder against its torch model: the prompt step (empty past),
    ``decode_steps`` incremental steps (each side on its own cache, both fed the reference's greedy token),
    and a greedy generation of ``max_new_tokens`` (transformers ``generate`` vs the graph).

    Args:
        model: the torch model that was exported (same swapped modules).
        decoder: an ``export.runtime.session.DecoderSession`` of its graph.
        input_ids, attention_mask: a left-padded prompt batch [batch, seq].
        tier: parity tier.
        decode_steps: incremental steps compared output by output.
        max_new_tokens: greedy generation length (0 skips generation).
        eos_token_id, pad_token_id: passed to both generations.
        factors: module name -> (A [r, in], B [out, r]) for adapter-input branches (also fed to the graph).
        scale: the exact tier's width and depth (default: from ``model.config``).

    Returns:
        One report; outputs are named ``step{k}/<output>``.
    """
    wrapper = DecoderWrapper(model).eval()
    scale = scale or ExactScale.of(model)
    feeds = adapter_feeds(factors) if factors else None
    lora = tuple(torch.from_numpy(feeds[name]) for name in adapter_input_names(model)) if feeds else ()
    adapter_context = (lambda: runtime_factors(model, factors)) if factors else contextlib.nullcontext
    names = ["logits"] + [f"present.{i}.{kv}" for i in range(wrapper.num_layers) for kv in ("key", "value")]
    batch = input_ids.shape[0]
    past_t: tuple[torch.Tensor, ...] = wrapper.empty_past(batch)
    past_o = None
    ids, mask = input_ids, attention_mask
    outputs: list[OutputParity] = []
    failures: list[str] = []
    for step in range(decode_steps + 1):
        with torch.no_grad():
            ref = wrapper(ids, mask, past_t, lora)
        got = decoder.step(ids.numpy(), mask.numpy(), past_o, feeds)
        report = compare_outputs(
            dict(zip(names, ref)), dict(zip(names, (got.logits, *got.present))), tier=tier, scale=scale,
            valid=decoder_valid_masks(mask, ids.shape[1], wrapper.num_layers),
        )
        outputs += [dataclasses.replace(o, name=f"step{step}/{o.name}") for o in report.outputs]
        failures += [f"step{step}/{f}" for f in report.failures]
        next_tokens = ref[0][:, -1].argmax(-1, keepdim=True)
        ids, mask = next_tokens, torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        past_t, past_o = tuple(ref[1:]), got.present
    tokens_equal = None
    if max_new_tokens:
        with adapter_context():
            ref_tokens = torch_greedy(model, input_ids, attention_mask, max_new_tokens,
                                      eos_token_id=eos_token_id, pad_token_id=pad_token_id)
        got_tokens = decoder.generate_greedy(input_ids.numpy(), attention_mask.numpy(), max_new_tokens,
                                             eos_token_id=eos_token_id, pad_token_id=pad_token_id, adapter=feeds)
        tokens_report = compare_outputs({}, {}, tier=tier, reference_tokens=ref_tokens, candidate_tokens=got_tokens)
        tokens_equal = tokens_report.tokens_equal
        failures += list(tokens_report.failures)
    return ParityReport(tier=tier, outputs=tuple(outputs), tokens_equal=tokens_equal, failures=tuple(failures))


def torch_greedy(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """transformers' greedy ``generate`` (no sampling, one beam): the reference for :meth:`DecoderSession.generate_greedy`.

    Returns:
        int64 [batch, prompt + generated].
    """
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
            num_beams=1, eos_token_id=eos_token_id, pad_token_id=pad_token_id, min_new_tokens=0,
        )
