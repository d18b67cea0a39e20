"""``adalora-deploy check``: an exported graph under onnxruntime against the model that was trained.

::

    export.json ──► load_source_model (base as trained + adapter) ──► source model (what the user trained)
                └─► load_source_model + convert_for_export ────────► twin model   (the graph's arithmetic)
        0. refuse a vacuous check: the adapter must change the source model's logits
        1. "source" (the verdict): graph vs source on held-out text (AGREEMENT_POSITIONS token positions of
           real text, from the export's tokenizer) + greedy generation of two held-out prompts (batch 2,
           left padded); tier = manifest.source_tier
        2. "twin" (diagnosis of the graph itself): graph vs twin, prompt + incremental KV-cache steps +
           greedy generation; tier = manifest.tier
        3. "eval" (with --eval FILE): task accuracy and perplexity of the graph beside the source's
        4. "zero-adapter" (adapter-inputs graphs): graph fed rank-0 factors vs the twin without adapter
    ──► parity.json (every metric, every failure) + a short table

Tiers (:mod:`adalora_deploy.export.judge.parity`): exact = every output within the fp32 reassociation bound
``u sqrt(K) sqrt(2L) max|ref|`` and identical greedy tokens; lossy = top-1 agreement and mean KL of the
next-token distribution (and the eval file's accuracy and perplexity). A lossy graph that changes the
trained model's decisions fails, and the report names the exports that keep them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adalora_deploy.artifacts import ArtifactError, write_json
from adalora_deploy.errors import VacuousCheckError
from adalora_deploy.classification import torch_classifier_logits
from adalora_deploy.evaluation import AGREEMENT_POSITIONS, HELDOUT_TEXT, evaluate, graph_logits, read_eval_file, torch_logits
from adalora_deploy.models import resolve_quantization

from ..build.convert import convert_for_export, trained_activations
from ..build.kinds import keeping_exports
from ..build.manifest import read_manifest, verify_files
from ..build.source import adapters_bypassed, load_source_model
from ..contract import LOGITS, MODEL_FILE, PARITY_FILE
from ..runtime.classifier import ClassifierSession
from ..runtime.session import DecoderSession, adapter_feeds, create_session, execution_providers
from .agreement import (export_tokenizer, graph_held_out_logits, held_out_batch, held_out_ids, prompt_logits,
                        source_logits)
from .forced import forced_parity
from .parity import EvalComparison, ExactScale, ParityReport, compare_evaluations, compare_outputs, decoder_parity, torch_greedy

__all__ = [
    "ADAPTER_EFFECT_MIN",
    "CheckReport",
    "Comparison",
    "VacuousCheckError",
    "check_export",
]

logger = logging.getLogger(__name__)

ADAPTER_EFFECT_MIN = 1e-3
"""Smallest max |logits(adapted) - logits(base)| for a check to mean anything. Trained tiny-Llama adapters
move logits by 0.05-0.5; an untrained AdaLoRA adapter (Λ = 0) moves them by exactly 0."""


@dataclass(frozen=True)
class Comparison:
    """One comparison of the graph with a reference."""

    name: str
    """``source`` (the verdict), ``twin`` (diagnosis), ``eval`` or ``zero-adapter``."""
    reference: str
    """The reference, in words."""
    report: ParityReport | None = None
    evaluation: EvalComparison | None = None
    """The eval-file comparison (``eval`` only)."""
    informational: bool = False
    """Shown, not judged (``free-running`` beside a teacher-forced verdict)."""

    @property
    def passed(self) -> bool:
        return (self.report.passed if self.report is not None else True) and \
            (self.evaluation.passed if self.evaluation is not None else True)

    @property
    def failures(self) -> tuple[str, ...]:
        return ((self.report.failures if self.report is not None else ()) +
                (self.evaluation.failures if self.evaluation is not None else ()))


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
    positions: int = 0
    """Held-out token positions of the source comparison."""
    advice: str = ""
    """When the graph fails against the source: the exports that keep the trained model's decisions."""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons if not c.informational)

    @property
    def failures(self) -> tuple[str, ...]:
        return tuple(f"{c.name}: {f}" for c in self.comparisons if not c.informational for f in c.failures)

    def __getitem__(self, name: str) -> Comparison:
        for comparison in self.comparisons:
            if comparison.name == name:
                return comparison
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        comparisons = []
        for c in self.comparisons:
            entry: dict[str, Any] = {"name": c.name, "reference": c.reference, "passed": c.passed,
                                     "informational": c.informational, "failures": list(c.failures)}
            if c.report is not None:
                entry.update(tier=c.report.tier, tokens_equal=c.report.tokens_equal, summary=_summary(c.report),
                             outputs=[dataclasses.asdict(o) for o in c.report.outputs])
            if c.evaluation is not None:
                entry["evaluation"] = c.evaluation.to_dict()
            comparisons.append(entry)
        return {"export_dir": str(self.export_dir), "passed": self.passed, "mode": self.mode,
                "quantization": self.quantization, "weights": self.weights, "adapter_effect": self.adapter_effect,
                "positions": self.positions, "failures": list(self.failures), "advice": self.advice,
                "comparisons": comparisons}

    def format_table(self) -> str:
        """One row per comparison: worst logits metrics, greedy equality, verdict; then the eval row."""
        header = (f"{'comparison':<12} {'tier':<6} {'max abs':>9} {'bound':>9} {'top-1':>6} {'mean KL':>9} "
                  f"{'greedy':>6}  result")
        lines = [f"{self.export_dir}: {self.mode} {self.weights}, base {self.quantization}, adapter effect "
                 f"{self.adapter_effect:.3g}, {self.positions} held-out positions", header]
        for c in self.comparisons:
            if c.report is None:
                continue
            s = _summary(c.report)
            greedy = "-" if c.report.tokens_equal is None else "same" if c.report.tokens_equal else "DIFF"
            bound = f"{s['logits_tolerance']:>9.3g}" if s["logits_tolerance"] is not None else f"{'-':>9}"
            verdict = "(shown)" if c.informational else "PASS" if c.passed else "FAIL"
            lines.append(f"{c.name:<12} {c.report.tier:<6} {s['logits_max_abs']:>9.3g} {bound} "
                         f"{s['logits_top1']:>6.3f} {s['logits_mean_kl']:>9.2g} {greedy:>6}  {verdict}")
        for c in self.comparisons:
            if c.evaluation is not None:
                ref, got = c.evaluation.reference, c.evaluation.candidate
                accuracy = ("" if ref.accuracy is None else
                            f"accuracy {got.accuracy:.3f} (source {ref.accuracy:.3f}, same answer on "
                            f"{c.evaluation.answer_agreement:.3f} of {len(ref.answers)}), ")
                lines.append(f"{'eval':<12} {accuracy}perplexity {got.perplexity:.4g} (source {ref.perplexity:.4g}) "
                             f" {'PASS' if c.passed else 'FAIL'}")
        for failure in self.failures:
            lines.append(f"  {failure}")
        if self.advice:
            lines.append(f"  {self.advice}")
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def _summary(report: ParityReport) -> dict[str, Any]:
    logits = [o for o in report.outputs if o.name.split("/")[-1] == "logits"]
    tolerances = [o.tolerance for o in logits if o.tolerance is not None]
    return {
        "max_abs": max((o.max_abs for o in report.outputs), default=0.0),
        "logits_max_abs": max((o.max_abs for o in logits), default=0.0),
        "logits_tolerance": min(tolerances) if tolerances else None,
        "logits_min_cosine": min((o.cosine_min for o in logits), default=1.0),
        "logits_top1": min((o.top1_agreement for o in logits if o.top1_agreement is not None), default=1.0),
        "logits_mean_kl": max((o.mean_kl for o in logits if o.mean_kl is not None), default=0.0),
    }


CLASSIFIER_TEXTS = 32
"""Held-out sentences a classification export is checked on (logits parity per sentence)."""


def classifier_texts(text: str | os.PathLike | None = None, count: int = CLASSIFIER_TEXTS) -> list[str]:
    """``count`` sentences of held-out text (a ``.txt`` file, one or more sentences a line; ``None``: the packaged
    held-out passage), for a classifier's parity check."""
    path = Path(text) if text is not None else HELDOUT_TEXT
    try:
        body = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ArtifactError(f"{path}: cannot read the held-out text ({error})") from None
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", body) if len(s.strip()) > 1]
    if not sentences:
        raise ArtifactError(f"{path}: no sentence to check a classifier on")
    return sentences[:count]


def _check_classifier(export_dir: Path, manifest, base: Path, adapter: Path, *, text, provider: str) -> CheckReport:
    """A classification export against the trained classifier: logits on held-out sentences (the tier the
    manifest promises), and against its torch twin; refuses an adapter that does not change the logits."""
    graph = ClassifierSession(export_dir, provider=provider)
    ids, mask = graph.encode(classifier_texts(text))
    source = load_source_model(base, adapter, quantization=manifest.quantization, double_quant=manifest.double_quant)
    # the head's two products (pooler, classifier) count as one more layer of the fp32 reassociation bound
    scale = dataclasses.replace(ExactScale.of(source.config), depth=int(source.config.num_hidden_layers) + 1)
    logits = torch_classifier_logits(source)
    reference = logits(ids, mask)
    with adapters_bypassed(source):
        bypassed = logits(ids, mask)
    effect = float(np.abs(reference - bypassed).max())
    if effect < ADAPTER_EFFECT_MIN:
        raise VacuousCheckError(
            f"the adapter {adapter} changes the logits by at most {effect:.3g} (< {ADAPTER_EFFECT_MIN:g}): "
            "it is untrained or zero, so parity would prove nothing; check an export of a trained adapter")
    got = graph.logits(ids, mask)
    comparisons = [Comparison("source", f"the trained classifier: {manifest.quantization} base + adapter + head "
                                        "with its own torch kernels",
                              compare_outputs({LOGITS: reference}, {LOGITS: got}, tier=manifest.source_tier,
                                              scale=scale))]
    del source
    twin = load_source_model(base, adapter, quantization=manifest.quantization, double_quant=manifest.double_quant)
    convert_for_export(twin, quantization=manifest.quantization, mode=manifest.mode, weights=manifest.weights,
                       serving=manifest.serving, requantize=(manifest.requantization or {}).get("method", "rtn"),
                       nbits_from=export_dir / MODEL_FILE if manifest.mode == "merged" and
                       manifest.weights in ("int4", "int8") else None)
    comparisons.append(Comparison("twin", "the torch twin (the graph's own arithmetic in torch)",
                                  compare_outputs({LOGITS: torch_classifier_logits(twin)(ids, mask)}, {LOGITS: got},
                                                  tier=manifest.tier, scale=scale)))
    kept = comparisons[0].passed
    return CheckReport(export_dir=export_dir, mode=manifest.mode, quantization=manifest.quantization,
                       weights=manifest.weights if manifest.mode == "merged" else
                       ("serving" if manifest.serving else "exact"),
                       adapter_effect=effect, comparisons=tuple(comparisons), positions=int(len(ids)),
                       advice="" if kept else keeping_exports(manifest.quantization, manifest.mode,
                                                              manifest.weights, manifest.serving))


def check_export(
    export_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    eval_file: str | os.PathLike | None = None,
    positions: int | None = None,
    decode_steps: int = 3,
    max_new_tokens: int = 12,
    provider: str = "cpu",
    write: bool = True,
) -> CheckReport:
    """Check an export folder's graph against the trained source model and write ``parity.json``.

    Args:
        export_dir: a folder written by :func:`adalora_deploy.export.api.export_model`.
        base, adapter: override the folders recorded in ``export.json`` (the adapter's training run record
            must agree with the graph's base quantization).
        text: held-out text (``.txt``/``.jsonl``, or an eval file) for the agreement; ``None``: the eval file's
            texts when given, else the packaged held-out passage.
        eval_file: an eval file (:mod:`adalora_deploy.evaluation`): task accuracy and perplexity, judged.
        positions: held-out token positions (default :data:`adalora_deploy.evaluation.AGREEMENT_POSITIONS`).
        decode_steps: incremental (KV-cache) steps of the twin comparison.
        max_new_tokens: greedy generation length (batch 2, left padded).
        provider: onnxruntime provider (``cpu``, ``cuda``, ``auto``).
        write: write ``parity.json`` into ``export_dir``.

    Returns:
        The report (``passed`` False when a tier is missed; nothing is raised for that).

    Raises:
        VacuousCheckError: the adapter does not change the source model's output.
        ArtifactError: a missing or malformed export folder.
        ConfigError: an ``adapter`` whose training run record contradicts the graph's base quantization.
        DataError: an unreadable text or eval file.
    """
    execution_providers(provider)  # fail before loading any model
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir)
    verify_files(manifest)
    model_path = export_dir / MODEL_FILE
    if not model_path.is_file():
        raise ArtifactError(f"{model_path} not found")
    overridden = base is not None or adapter is not None
    base = Path(base) if base is not None else Path(manifest.base_path)
    adapter = Path(adapter) if adapter is not None else Path(manifest.adapter_path)
    if overridden:  # the graph was built for one base kind: an adapter trained on another cannot be judged by it
        resolve_quantization(base, adapter, manifest.quantization, manifest.double_quant)
    if manifest.task == "classification":
        if eval_file is not None:
            raise ArtifactError("--eval scores causal LMs; a classifier's accuracy is the job's evaluate-exports stage")
        report = _check_classifier(export_dir, manifest, base, adapter, text=text, provider=provider)
        if write:
            write_json(export_dir / PARITY_FILE, report.to_dict())
        logger.info("check %s: %s", export_dir, "passed" if report.passed else f"{len(report.failures)} failure(s)")
        return report
    eval_set = read_eval_file(eval_file) if eval_file is not None else None
    positions = positions or AGREEMENT_POSITIONS
    text = text if text is not None else eval_file

    source = load_source_model(base, adapter, quantization=manifest.quantization, double_quant=manifest.double_quant)
    config = source.config
    scale = ExactScale.of(config)
    ids, mask = held_out_batch(export_dir, config)
    valid = mask.bool().numpy()
    adapted_logits = prompt_logits(source, ids, mask)
    with adapters_bypassed(source):
        base_logits = prompt_logits(source, ids, mask)
    effect = float((adapted_logits - base_logits).abs().numpy()[valid].max())
    if effect < ADAPTER_EFFECT_MIN:
        raise VacuousCheckError(
            f"the adapter {adapter} changes the logits by at most {effect:.3g} (< {ADAPTER_EFFECT_MIN:g}): "
            "it is untrained or zero, so parity would prove nothing; check an export of a trained adapter"
        )
    eos, pad = config.eos_token_id, config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    text_ids = held_out_ids(export_dir, config, text, positions)
    # int8 activations: free-running comparisons only show how far int8 rounding carries ulp differences; the
    # verdict feeds both sides the same codes at every quantized op (export.judge.forced)
    forced = manifest.source_tier == "exact" and trained_activations(source) == "int8"
    reference = source_logits(source, text_ids)
    with torch.no_grad():
        ref_tokens = torch_greedy(source, ids, mask, max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    tokenizer = export_tokenizer(export_dir) if eval_set is not None else None
    if eval_set is not None and tokenizer is None:
        raise ArtifactError(f"--eval needs the tokenizer files in {export_dir}")
    source_eval = evaluate(torch_logits(source), tokenizer, eval_set) if eval_set is not None else None
    if not forced:
        del source

    twin = load_source_model(base, adapter, quantization=manifest.quantization, double_quant=manifest.double_quant)
    merged_nbits = manifest.mode == "merged" and manifest.weights in ("int4", "int8")
    conversion = convert_for_export(twin, quantization=manifest.quantization, mode=manifest.mode,
                                    weights=manifest.weights, serving=manifest.serving,
                                    adapter_inputs=manifest.adapter_inputs,
                                    requantize=(manifest.requantization or {}).get("method", "rtn"),
                                    nbits_from=model_path if merged_nbits else None)
    if conversion.ranks != manifest.ranks:
        logger.warning("the adapter's ranks %s differ from the exported ones %s", conversion.ranks, manifest.ranks)
    factors = conversion.factors if manifest.adapter_inputs else None
    feeds = adapter_feeds(factors) if factors else None
    decoder = DecoderSession(create_session(model_path, provider=provider))

    got = graph_held_out_logits(decoder, text_ids, feeds)
    free_tier = "lossy" if forced else manifest.source_tier
    source_report = compare_outputs({LOGITS: reference}, {LOGITS: got}, tier=free_tier, scale=scale)
    del reference, got
    got_tokens = decoder.generate_greedy(ids.numpy(), mask.numpy(), max_new_tokens, eos_token_id=eos,
                                         pad_token_id=pad, adapter=feeds)
    tokens = compare_outputs({}, {}, tier=free_tier, reference_tokens=ref_tokens, candidate_tokens=got_tokens)
    source_report = dataclasses.replace(source_report, tokens_equal=tokens.tokens_equal,
                                        failures=source_report.failures + tokens.failures)
    trained = f"the trained model: {manifest.quantization} base + adapter with its own torch kernels"
    if forced:
        comparisons = [
            Comparison("source", f"{trained}, teacher-forced at every int8 activation quantization",
                       forced_parity(source, model_path, text_ids, ids, mask, decode_steps=max_new_tokens,
                                     scale=scale, factors=factors, provider=provider)),
            Comparison("free-running", f"{trained}, each side on its own activations (int8 rounding carries "
                                       "ulp differences through the layers: shown, not judged)", source_report,
                       informational=True)]
        del source
    else:
        comparisons = [Comparison("source", trained, source_report)]

    if forced:
        twin_report = forced_parity(twin, model_path, text_ids[:1], ids, mask, decode_steps=decode_steps,
                                    scale=scale, factors=factors, provider=provider)
        twin_reference = "the torch twin (the graph's own arithmetic in torch), teacher-forced"
    else:
        twin_report = decoder_parity(twin, decoder, ids, mask, tier=manifest.tier, decode_steps=decode_steps,
                                     max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad,
                                     factors=factors, scale=scale)
        twin_reference = "the torch twin (the graph's own arithmetic in torch)"
    comparisons.append(Comparison("twin", twin_reference, twin_report))

    if source_eval is not None:
        graph_eval = evaluate(graph_logits(decoder, feeds), tokenizer, eval_set)
        comparisons.append(Comparison("eval", f"the trained model on {eval_file}",
                                      evaluation=compare_evaluations(source_eval, graph_eval)))

    if factors:
        zeros = {name: (A[:0], B[:, :0]) for name, (A, B) in factors.items()}
        zero = decoder_parity(twin, decoder, ids, mask, tier=manifest.tier, decode_steps=0, max_new_tokens=0,
                              factors=zeros, scale=scale)
        comparisons.append(Comparison("zero-adapter", "the torch twin with rank-0 factors (the base)", zero))
    del twin

    kept = all(c.passed for c in comparisons if c.name in ("source", "eval"))
    report = CheckReport(export_dir=export_dir, mode=manifest.mode, quantization=manifest.quantization,
                         weights=manifest.weights if manifest.mode == "merged" else
                         ("serving" if manifest.serving else "exact"),
                         adapter_effect=effect, comparisons=tuple(comparisons), positions=int(text_ids.size),
                         advice="" if kept else keeping_exports(manifest.quantization, manifest.mode,
                                                                manifest.weights, manifest.serving))
    if write:
        write_json(export_dir / PARITY_FILE, report.to_dict())
    logger.info("check %s: %s", export_dir, "passed" if report.passed else f"{len(report.failures)} failure(s)")
    return report
