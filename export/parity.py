"""Parity between a torch model and its ONNX export: per-output metrics, two tiers, every failure collected.

Tiers (see docs/ONNX.md "Parity tiers"):

- ``"exact"``: graphs that reproduce the torch arithmetic (fp32 merged, quantized bases through kernels
  that match torch): max abs difference <= :data:`EXACT_MAX_ABS` on every output and identical greedy tokens.
- ``"lossy"``: accuracy_level 4, re-quantized merges, fp16: on logits, per-token cosine >=
  :data:`LOSSY_MIN_COSINE`, top-1 agreement >= :data:`LOSSY_MIN_TOP1`, mean KL <= :data:`LOSSY_MAX_KL`;
  never an elementwise tolerance.

Pad positions (left padding) are excluded through ``valid`` masks: a fully masked query row is undefined
(onnxruntime and torch's SDPA fill it differently) and never read by later tokens.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Mapping

import numpy as np
import torch
from torch import nn

from adalora_deploy.metrics import RowMetrics, row_metrics

if TYPE_CHECKING:
    from .runtime import DecoderSession

from adalora_deploy.errors import ParityError

from .runtime import as_float32

__all__ = [
    "EXACT_MAX_ABS",
    "LOSSY_MAX_KL",
    "LOSSY_MIN_COSINE",
    "LOSSY_MIN_TOP1",
    "OutputParity",
    "ParityError",
    "ParityReport",
    "compare_outputs",
    "decoder_parity",
    "decoder_valid_masks",
    "torch_greedy",
]

logger = logging.getLogger(__name__)

Tier = Literal["exact", "lossy"]

EXACT_MAX_ABS = 1e-4
"""fp32 reassociation between torch and onnxruntime kernels; measured 1.5e-7 to 3e-7 on tiny Llama logits."""
LOSSY_MIN_COSINE = 0.99
"""Per-token logits cosine floor for lossy graphs (ONNX.md tier)."""
LOSSY_MIN_TOP1 = 0.9
"""Fraction of valid positions whose argmax agrees, lossy tier."""
LOSSY_MAX_KL = 0.05
"""Mean KL(torch || onnx) over valid positions in nats, lossy tier."""


@dataclass(frozen=True)
class OutputParity(RowMetrics):
    """:class:`~adalora_deploy.metrics.RowMetrics` of one named output over its valid positions."""

    name: str = ""


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
    valid: Mapping[str, np.ndarray] | None = None,
    logits_name: str = "logits",
    reference_tokens: torch.Tensor | np.ndarray | None = None,
    candidate_tokens: torch.Tensor | np.ndarray | None = None,
) -> ParityReport:
    """Compare named outputs (torch reference vs onnxruntime candidate) and greedy tokens.

    Args:
        reference, candidate: output name -> tensor; every reference name must be in ``candidate``.
        tier: ``"exact"`` or ``"lossy"`` (thresholds in the module docstring).
        valid: output name -> boolean mask broadcastable to ``output.shape[:-1]`` selecting the rows that
            count (e.g. :func:`decoder_valid_masks`); outputs without a mask count every row.
        logits_name: the output that gets top-1 and KL (the lossy tier judges only this output).
        reference_tokens, candidate_tokens: greedy sequences to require identical (exact tier) or report.

    Returns:
        A :class:`ParityReport`; call ``raise_for_failures()`` to turn failures into one error.
    """
    if tier not in ("exact", "lossy"):
        raise ValueError(f"compare_outputs: tier {tier!r} is not 'exact' or 'lossy'")
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
        metrics = _output_metrics(name, _rows(ref_arr, mask), _rows(cand_arr, mask), name == logits_name)
        outputs.append(metrics)
        if not np.isfinite(metrics.max_abs):
            failures.append(f"{name}: non-finite values")
        elif tier == "exact" and metrics.max_abs > EXACT_MAX_ABS:
            failures.append(f"{name}: max abs {metrics.max_abs:.3g} > {EXACT_MAX_ABS:g}")
        if tier == "lossy" and name == logits_name:
            if metrics.cosine_min < LOSSY_MIN_COSINE:
                failures.append(f"{name}: min per-token cosine {metrics.cosine_min:.4f} < {LOSSY_MIN_COSINE}")
            if metrics.top1_agreement is not None and metrics.top1_agreement < LOSSY_MIN_TOP1:
                failures.append(f"{name}: top-1 agreement {metrics.top1_agreement:.3f} < {LOSSY_MIN_TOP1}")
            if metrics.mean_kl is not None and metrics.mean_kl > LOSSY_MAX_KL:
                failures.append(f"{name}: mean KL {metrics.mean_kl:.4g} > {LOSSY_MAX_KL}")
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
) -> ParityReport:
    """Full parity of an exported decoder against its torch model: the prompt step (empty past),
    ``decode_steps`` incremental steps (each side on its own cache, both fed the reference's greedy token),
    and a greedy generation of ``max_new_tokens`` (transformers ``generate`` vs the graph).

    Args:
        model: the torch model that was exported (same swapped modules).
        decoder: an ``export.runtime.DecoderSession`` of its graph.
        input_ids, attention_mask: a left-padded prompt batch [batch, seq].
        tier: parity tier.
        decode_steps: incremental steps compared output by output.
        max_new_tokens: greedy generation length (0 skips generation).
        eos_token_id, pad_token_id: passed to both generations.
        factors: module name -> (A [r, in], B [out, r]) for adapter-input branches (also fed to the graph).

    Returns:
        One report; outputs are named ``step{k}/<output>``.
    """
    import contextlib

    from .graph import DecoderWrapper, adapter_input_names
    from .modules import runtime_factors
    from .runtime import adapter_feeds

    wrapper = DecoderWrapper(model).eval()
    feeds = adapter_feeds(factors) if factors else None
    lora = tuple(torch.from_numpy(feeds[name]) for name in adapter_input_names(model)) if feeds else ()
    adapter_context = (lambda: runtime_factors(model, factors)) if factors else contextlib.nullcontext
    names = ["logits"] + [f"present.{i}.{kv}" for i in range(wrapper.num_layers) for kv in ("key", "value")]
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    batch = input_ids.shape[0]
    past_t: tuple[torch.Tensor, ...] = tuple(
        torch.zeros(batch, wrapper.num_kv_heads, 0, wrapper.head_dim, dtype=dtype) for _ in range(2 * wrapper.num_layers)
    )
    past_o = None
    ids, mask = input_ids, attention_mask
    outputs: list[OutputParity] = []
    failures: list[str] = []
    for step in range(decode_steps + 1):
        with torch.no_grad():
            ref = wrapper(ids, mask, past_t, lora)
        got = decoder.step(ids.numpy(), mask.numpy(), past_o, feeds)
        report = compare_outputs(
            dict(zip(names, ref)), dict(zip(names, (got.logits, *got.present))), tier=tier,
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
