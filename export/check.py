"""``adalora-deploy check``: an exported graph under onnxruntime against the torch model it came from.

::

    export.json ──► load_source_model (base as exported + adapter) ──► source model  (the base's own kernels)
                └─► load_source_model + convert_for_export ─────────► twin model    (the graph's arithmetic)
    held-out prompts (batch 2, left padded)
        0. refuse a vacuous check: the adapter must change the source model's logits
        1. "graph":  graph vs twin, prompt + incremental steps + greedy generation, tier = manifest.tier
        2. "source": graph vs source, prompt logits + greedy tokens, tier = manifest.source_tier (only
           reported, not judged, when the export re-quantizes weights: merged int4/int8, bnb 4-bit serving)
        3. "zero-adapter" (adapter-inputs graphs): graph fed rank-0 factors vs the twin without adapter
    ──► parity.json (every metric, every failure) + a short table

Tiers (``export.parity``): exact = max abs <= 1e-4 on every output and identical greedy tokens; lossy =
per-token cosine, top-1 agreement and mean KL on logits.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adalora_deploy.errors import VacuousCheckError

from .parity import ParityReport

__all__ = ["ADAPTER_EFFECT_MIN", "CheckReport", "Comparison", "PARITY_FILE", "VacuousCheckError", "check_export"]

logger = logging.getLogger(__name__)

PARITY_FILE = "parity.json"
ADAPTER_EFFECT_MIN = 1e-3
"""Smallest max |logits(adapted) - logits(base)| for a check to mean anything. Trained tiny-Llama adapters
move logits by 0.05-0.5; an untrained AdaLoRA adapter (Λ = 0) moves them by exactly 0."""
HELD_OUT_PROMPTS = (
    "Winter light fell across the harbour while the ferry",
    "A quiet index of",
)
"""Held-out prompts (not in the packaged training text); the second is shorter, so the batch is left padded."""


@dataclass(frozen=True)
class Comparison:
    """One comparison of the graph with a torch model."""

    name: str
    """``graph`` (vs the twin), ``source`` (vs the source model) or ``zero-adapter``."""
    reference: str
    """The torch model, in words."""
    report: ParityReport
    judged: bool = True
    """False for comparisons that are only reported (re-quantization error against the source)."""

    @property
    def passed(self) -> bool:
        return self.report.passed or not self.judged


@dataclass(frozen=True)
class CheckReport:
    """Everything ``check`` measured; :attr:`passed` is the verdict."""

    export_dir: Path
    mode: str
    quantization: str
    weights: str
    adapter_effect: float
    """max |logits(adapted) - logits(base)| of the source model on the held-out prompts."""
    comparisons: tuple[Comparison, ...]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    @property
    def failures(self) -> tuple[str, ...]:
        return tuple(f"{c.name}: {f}" for c in self.comparisons if c.judged for f in c.report.failures)

    def __getitem__(self, name: str) -> Comparison:
        for comparison in self.comparisons:
            if comparison.name == name:
                return comparison
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "export_dir": str(self.export_dir), "passed": self.passed, "mode": self.mode,
            "quantization": self.quantization, "weights": self.weights, "adapter_effect": self.adapter_effect,
            "failures": list(self.failures),
            "comparisons": [
                {"name": c.name, "reference": c.reference, "tier": c.report.tier if c.judged else "report",
                 "judged": c.judged, "passed": c.passed,
                 "tokens_equal": c.report.tokens_equal, "failures": list(c.report.failures),
                 "summary": _summary(c.report),
                 "outputs": [dataclasses.asdict(o) for o in c.report.outputs]}
                for c in self.comparisons
            ],
        }

    def format_table(self) -> str:
        """One row per comparison: worst logits metrics over all steps, greedy equality, verdict."""
        header = (f"{'comparison':<13} {'tier':<6} {'max abs':>9} {'min cos':>9} {'top-1':>6} {'mean KL':>9} "
                  f"{'greedy':>6}  result")
        lines = [f"{self.export_dir}: {self.mode} {self.weights}, base {self.quantization}, adapter effect "
                 f"{self.adapter_effect:.3g}", header]
        for c in self.comparisons:
            s = _summary(c.report)
            greedy = "-" if c.report.tokens_equal is None else "same" if c.report.tokens_equal else "DIFF"
            tier = c.report.tier if c.judged else "report"
            lines.append(f"{c.name:<13} {tier:<6} {s['logits_max_abs']:>9.3g} {s['logits_min_cosine']:>9.6f} "
                         f"{s['logits_top1']:>6.3f} {s['logits_mean_kl']:>9.2g} {greedy:>6}  "
                         f"{'INFO' if not c.judged else 'PASS' if c.passed else 'FAIL'}")
        for failure in self.failures:
            lines.append(f"  {failure}")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _summary(report: ParityReport) -> dict[str, float]:
    logits = [o for o in report.outputs if o.name.split("/")[-1] == "logits"]
    return {
        "max_abs": max((o.max_abs for o in report.outputs), default=0.0),
        "logits_max_abs": max((o.max_abs for o in logits), default=0.0),
        "logits_min_cosine": min((o.cosine_min for o in logits), default=1.0),
        "logits_top1": min((o.top1_agreement for o in logits if o.top1_agreement is not None), default=1.0),
        "logits_mean_kl": max((o.mean_kl for o in logits if o.mean_kl is not None), default=0.0),
    }


def held_out_batch(export_dir: Path, config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out prompts tokenized with the export's tokenizer, batch 2, left padded.

    Falls back to fixed random ids when the folder has no tokenizer.
    """
    pad = config.pad_token_id if config.pad_token_id is not None else (config.eos_token_id or 0)
    from adalora_deploy.artifacts import ArtifactError
    from adalora_deploy.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(str(export_dir))
        rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in HELD_OUT_PROMPTS]
    except ArtifactError as error:  # no or unreadable tokenizer: the check still runs on fixed ids
        logger.info("no usable tokenizer in %s (%s); checking on fixed random ids", export_dir, error)
        generator = torch.Generator().manual_seed(0)
        rows = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in (20, 9)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), int(pad), dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row, dtype=torch.int64)
        mask[i, length - len(row):] = 1
    return ids, mask


def _prompt_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from .graph import DecoderWrapper

    wrapper = DecoderWrapper(model).eval()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    past = tuple(torch.zeros(ids.shape[0], wrapper.num_kv_heads, 0, wrapper.head_dim, dtype=dtype)
                 for _ in range(2 * wrapper.num_layers))
    with torch.no_grad():
        return wrapper(ids, mask, past)[0].float()


def check_export(
    export_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    decode_steps: int = 3,
    max_new_tokens: int = 12,
    provider: str = "cpu",
    write: bool = True,
) -> CheckReport:
    """Check an export folder's graph against the torch model it came from and write ``parity.json``.

    Args:
        export_dir: a folder written by :func:`export.api.export_model`.
        base, adapter: override the folders recorded in ``export.json``.
        decode_steps: incremental (KV-cache) steps compared output by output after the prompt.
        max_new_tokens: greedy generation length (batch 2, left padded).
        provider: onnxruntime provider (``cpu``, ``cuda``, ``auto``).
        write: write ``parity.json`` into ``export_dir``.

    Returns:
        The report (``passed`` False when a tier is missed; nothing is raised for that).

    Raises:
        VacuousCheckError: the adapter does not change the source model's output.
        ArtifactError: a missing or malformed export folder.
    """
    from adalora_deploy.artifacts import write_json

    from .convert import convert_for_export
    from .manifest import read_manifest, verify_files
    from .parity import compare_outputs, decoder_parity, torch_greedy
    from .runtime import DecoderSession, create_session, execution_providers
    from .source import adapters_bypassed, load_source_model

    execution_providers(provider)  # fail before loading any model
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    verify_files(manifest)
    model_path = export_dir / "model.onnx"
    base = Path(base) if base is not None else Path(manifest.base_path)
    adapter = Path(adapter) if adapter is not None else Path(manifest.adapter_path)

    source = load_source_model(base, adapter, quantization=manifest.quantization, double_quant=manifest.double_quant)
    config = source.config
    ids, mask = held_out_batch(export_dir, config)
    valid = mask.bool().numpy()
    adapted_logits = _prompt_logits(source, ids, mask)
    with adapters_bypassed(source):
        base_logits = _prompt_logits(source, ids, mask)
    effect = float((adapted_logits - base_logits).abs().numpy()[valid].max())
    if effect < ADAPTER_EFFECT_MIN:
        raise VacuousCheckError(
            f"the adapter {adapter} changes the logits by at most {effect:.3g} (< {ADAPTER_EFFECT_MIN:g}): "
            "it is untrained or zero, so parity would prove nothing; check an export of a trained adapter"
        )
    eos, pad = config.eos_token_id, config.pad_token_id if config.pad_token_id is not None else config.eos_token_id

    twin = load_source_model(base, adapter, quantization=manifest.quantization, double_quant=manifest.double_quant)
    conversion = convert_for_export(twin, quantization=manifest.quantization, mode=manifest.mode,
                                    weights=manifest.weights, serving=manifest.serving,
                                    adapter_inputs=manifest.adapter_inputs)
    if conversion.ranks != manifest.ranks:
        logger.warning("the adapter's ranks %s differ from the exported ones %s", conversion.ranks, manifest.ranks)
    factors = conversion.factors if manifest.adapter_inputs else None
    decoder = DecoderSession(create_session(model_path, provider=provider))
    comparisons = []
    graph = decoder_parity(twin, decoder, ids, mask, tier=manifest.tier, decode_steps=decode_steps,
                           max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad, factors=factors)
    comparisons.append(Comparison("graph", "the torch twin (same conversion as the export)", graph))

    from .runtime import adapter_feeds

    feeds = adapter_feeds(factors) if factors else None
    got = decoder.step(ids.numpy(), mask.numpy(), None, feeds)
    judged = manifest.source_tier != "report"
    source_tier = manifest.source_tier if judged else "lossy"
    source_report = compare_outputs({"logits": adapted_logits}, {"logits": got.logits}, tier=source_tier,
                                    valid={"logits": valid})
    with torch.no_grad():
        ref_tokens = torch_greedy(source, ids, mask, max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    got_tokens = decoder.generate_greedy(ids.numpy(), mask.numpy(), max_new_tokens, eos_token_id=eos,
                                         pad_token_id=pad, adapter=feeds)
    tokens = compare_outputs({}, {}, tier=source_tier, reference_tokens=ref_tokens, candidate_tokens=got_tokens)
    source_report = dataclasses.replace(source_report, tokens_equal=tokens.tokens_equal,
                                        failures=source_report.failures + tokens.failures)
    comparisons.append(Comparison("source", f"{manifest.quantization} base + adapter with its own torch kernels",
                                  source_report, judged=judged))

    if factors:
        zeros = {name: (A[:0], B[:, :0]) for name, (A, B) in factors.items()}
        zero = decoder_parity(twin, decoder, ids, mask, tier=manifest.tier, decode_steps=0, max_new_tokens=0,
                              factors=zeros)
        comparisons.append(Comparison("zero-adapter", "the torch twin with rank-0 factors (the base)", zero))
    del source, twin

    report = CheckReport(export_dir=export_dir, mode=manifest.mode, quantization=manifest.quantization,
                         weights=manifest.weights if manifest.mode == "merged" else
                         ("serving" if manifest.serving else "exact"),
                         adapter_effect=effect, comparisons=tuple(comparisons))
    if write:
        write_json(export_dir / PARITY_FILE, report.to_dict())
    logger.info("check %s: %s", export_dir, "passed" if report.passed else f"{len(report.failures)} failure(s)")
    return report
