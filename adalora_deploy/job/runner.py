"""The stages of ``adalora-deploy run`` and the record (``job.json``) that makes a rerun resume."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from adalora_deploy.artifacts import atomic_file, read_json, write_json
from adalora_deploy.config import RunConfig
from adalora_deploy.errors import ConfigError
from adalora_deploy.evaluation import choice_tokens, evaluate_examples, graph_logits, torch_logits
from adalora_deploy.export.contract import ADAPTER_FILE
from adalora_deploy.export.runtime.classifier import ClassifierSession
from adalora_deploy.export.runtime.session import DecoderSession, create_session
from adalora_deploy.job.lm_eval_stage import lm_eval_scores
from adalora_deploy.job.stages import STAGES
from adalora_deploy.model_sources import cache_dir, materialize
from adalora_deploy.quantization import is_gptq_folder

__all__ = ["JOB_FILE", "STAGES", "JobResult", "run_job"]

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
HELD_OUT_FILE = "data/heldout.jsonl"


@dataclass(frozen=True)
class JobResult:
    """What a run produced: the stages' results (as in ``job.json``) and the report folder."""

    output_dir: Path
    stages: dict[str, dict[str, Any]]
    ran: tuple[str, ...]
    """Stages this call ran (the others were already done)."""

    @property
    def report_dir(self) -> Path:
        return self.output_dir / "report"


class _Job:
    """One run's context: config, folders, and what earlier stages produced (loaded lazily)."""

    def __init__(self, run: RunConfig, output: Path, stages: dict[str, dict[str, Any]], progress: bool | None):
        self.run = run
        self.output = output
        self.stages = stages
        self.progress = progress
        self._tokenizer = None
        self._data = None

    # --- shared inputs ------------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return self.stages["prepare"]["base_folder"]

    @property
    def quantization(self) -> str:
        return self.run.model.quantization

    def tokenizer(self):
        if self._tokenizer is None:
            # lazy: imports torch; the CLI loads this module for --help
            from adalora_deploy.models import load_tokenizer

            self._tokenizer = load_tokenizer(self.base)
        return self._tokenizer

    @property
    def classification(self) -> bool:
        return self.run.task.kind == "classification"

    def labelled(self):
        """``task: classification``: the labelled records (:class:`adalora_deploy.classification.LabelledData`)."""
        if self._data is None:
            # lazy: the CLI loads this module for --help
            from adalora_deploy.classification import build_labelled_data

            self._data = build_labelled_data(self.run.data, self.run.task.label, self.run.train.seed)
        return self._data

    def classify(self, logits) -> dict[str, Any]:
        """Held-out accuracy and cross-entropy of a classifier logits function."""
        # lazy: the CLI loads this module for --help
        from adalora_deploy.classification import classifier_accuracy

        started = time.perf_counter()
        data = self.labelled()
        limit = self.run.task.max_examples or len(data.eval_texts)
        result = classifier_accuracy(logits, self.tokenizer(), data.eval_texts[:limit], data.eval_labels[:limit],
                                     max_length=self.run.train.seq_len, batch_size=self.run.train.batch_size)
        return result | {"perplexity": None, "seconds": time.perf_counter() - started}

    def data(self):
        if self._data is None:
            # lazy: imports torch; the CLI loads this module for --help
            from adalora_deploy.data import build_training_data

            t = self.run.train
            self._data = build_training_data(self.run.data, self.tokenizer(), seq_len=t.seq_len, seed=t.seed)
        return self._data

    @property
    def pad_id(self) -> int:
        tokenizer = self.tokenizer()
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def choices(self) -> tuple[int, ...] | None:
        if self.run.task.choices is None:
            return None
        return choice_tokens(self.data().eval_records, self.run.task.choices, self.tokenizer())

    def training_texts(self, limit: int | None = None) -> list[str]:
        """The training examples decoded back to text, as the model sees them (GPTQ calibration text)."""
        tokenizer = self.tokenizer()
        return [tokenizer.decode(example.input_ids) for example in self.data().train[:limit]]

    def held_out(self):
        examples = self.data().eval
        return examples[: self.run.task.max_examples] if self.run.task.max_examples else examples

    def evaluate(self, logits) -> dict[str, Any]:
        started = time.perf_counter()
        result = evaluate_examples(logits, self.held_out(), choices=self.choices(), pad_id=self.pad_id,
                                   batch_size=self.run.train.batch_size)
        return result.to_dict() | {"seconds": time.perf_counter() - started}

    def adapter(self) -> Path:
        return Path(self.stages["train"]["adapter"])


# --- stages ---------------------------------------------------------------------------------------------


def _prepare(job: _Job) -> dict[str, Any]:
    # lazy: imports torch; the CLI loads this module for --help
    from adalora_deploy.architectures import check_model_folder

    model_folder = materialize(job.run.model.path)
    check_model_folder(model_folder, job.run.task.kind)  # refused before a base is quantized or anything is written
    result: dict[str, Any] = {"model_folder": model_folder, "base_folder": model_folder}
    job.stages["prepare"] = result  # the tokenizer and data are read from here (the same for a GPTQ base)
    if job.classification:
        labelled = job.labelled()
        held_out = job.output / HELD_OUT_FILE
        with atomic_file(held_out) as temp:
            temp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in labelled.eval_records()),
                            encoding="utf-8")
        return result | {"format": "classification", "labels": list(labelled.labels),
                         "train_examples": len(labelled.train_texts), "eval_examples": len(labelled.eval_texts),
                         "dropped": 0, "held_out_file": str(held_out)}
    if job.quantization == "gptq" and not is_gptq_folder(model_folder):
        result.update(_quantized_base(job, model_folder))
    data = job.data()
    held_out = job.output / HELD_OUT_FILE
    with atomic_file(held_out) as temp:
        temp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in data.eval_records), encoding="utf-8")
    return result | {"format": data.format, "train_examples": len(data.train), "eval_examples": len(data.eval),
                     "dropped": data.dropped, "held_out_file": str(held_out)}


def _quantized_base(job: _Job, model_folder: str) -> dict[str, Any]:
    """The GPTQ base of ``model_folder`` with the config's quantize settings, from the cache or made now."""
    q = job.run.quantize
    settings = dataclasses.asdict(q) | {"source": str(Path(model_folder).resolve()), "data": dataclasses.asdict(job.run.data)}
    source_files = sorted(p.name + str(p.stat().st_size) for p in Path(model_folder).glob("*.safetensors"))
    key = hashlib.sha256(json.dumps([settings, source_files], sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / "bases" / f"{Path(model_folder).name}-{q.method}{q.bits}-g{q.group_size}-{key}"
    report_path = folder / "quantization.json"
    if report_path.is_file():
        logger.info("reusing the quantized base %s", folder)
        return {"base_folder": str(folder), "quantized": read_json(report_path) | {"cached": True}}
    summary = _quantize(job, model_folder, folder)
    return {"base_folder": str(folder), "quantized": summary | {"cached": False}}


def _quantize(job: _Job, model_folder: str, folder: Path) -> dict[str, Any]:
    # lazy: these import torch; the CLI loads this module for --help
    from adalora_deploy.data import calibration_blocks
    from adalora_deploy.gptq.folder import quantize_folder
    from adalora_deploy.models import load_tokenizer

    q = job.run.quantize
    # the calibration text, else the training data itself, as the model will see it
    source = q.calibration if q.calibration is not None else job.training_texts()
    blocks = calibration_blocks(source, load_tokenizer(model_folder), q.seq_len, q.samples)
    report = quantize_folder(model_folder, folder, blocks, overwrite=True, method=q.method, bits=q.bits,
                             group_size=q.group_size, sym=q.sym, desc_act=q.desc_act, percdamp=q.percdamp,
                             tables=q.tables, progress=sys.stderr.isatty()).report
    summary = {"method": q.method, "bits": q.bits, "group_size": q.group_size, "tables": q.tables,
               "samples": int(blocks.shape[0]),
               "seq_len": q.seq_len, "seconds": report.seconds, "worst_sqnr_db": report.worst_sqnr_db,
               "timings": dataclasses.asdict(report.timings)}
    write_json(folder / "quantization.json", summary)
    return summary


def _evaluate_base(job: _Job) -> dict[str, Any]:
    from adalora_deploy.models import load_base_model  # lazy: imports torch; the CLI loads this module for --help

    if job.classification:
        # lazy: imports torch; the CLI loads this module for --help
        from adalora_deploy.classification import torch_classifier_logits
        from adalora_deploy.training import seed_everything

        seed_everything(job.run.train.seed)  # the untrained head as training initialises it
        model = load_base_model(dataclasses.replace(job.run.model, path=job.base), labels=job.labelled().labels)
        return job.classify(torch_classifier_logits(model))
    return job.evaluate(torch_logits(load_base_model(dataclasses.replace(job.run.model, path=job.base))))


def _train(job: _Job) -> dict[str, Any]:
    from adalora_deploy.training import train  # lazy: imports torch and transformers

    run = dataclasses.replace(job.run, model=dataclasses.replace(job.run.model, path=job.base))
    folder = job.output / "train"
    resume = (folder / "checkpoint" / "state.json").is_file()
    if not resume and (folder / "checkpoint").exists():
        shutil.rmtree(folder / "checkpoint")
    result = train(run, folder, resume=resume, progress=job.progress)
    return {"adapter": str(result.adapter_dir), "metrics": str(folder / "metrics.jsonl"), "steps": result.steps,
            "first_loss": result.first_loss, "final_loss": result.final_loss, "live_ranks": result.live_ranks,
            "resumed_from": result.resumed_from}


def _evaluate_trained(job: _Job) -> dict[str, Any]:
    # lazy: imports torch; the CLI loads this module for --help
    from adalora_deploy.models import load_trained_model, resolve_quantization

    quantization, double_quant = resolve_quantization(job.base, job.adapter())
    if job.classification:
        # lazy: imports torch; the CLI loads this module for --help
        from adalora_deploy.classification import torch_classifier_logits

        return job.classify(torch_classifier_logits(load_trained_model(
            job.base, job.adapter(), quantization=quantization, double_quant=double_quant)))
    return job.evaluate(torch_logits(load_trained_model(job.base, job.adapter(), quantization=quantization,
                                                        double_quant=double_quant)))


def _compact(job: _Job) -> dict[str, Any]:
    from adalora_deploy.compaction import compact_adapter  # lazy: imports torch; the CLI loads this module for --help

    result = {}
    for format in ("adalora", "lora"):
        report = compact_adapter(job.adapter(), job.output / f"adapter-{format}", format=format)
        result[format] = {"folder": str(report.output_dir), "params_before": report.params_before,
                          "params_after": report.params_after, "bytes_after": report.bytes_after,
                          "removed": list(report.removed)}
    return result


def _export(job: _Job) -> dict[str, Any]:
    from adalora_deploy.export.api import export_model  # lazy: imports torch and onnx

    result = {}
    for spec in job.run.exports:
        started = time.perf_counter()
        manifest = export_model(job.base, job.adapter(), output=job.output / "exports" / spec.name, mode=spec.mode,
                                weights=spec.weights, serving=spec.serving, adapter_inputs=spec.adapter_inputs,
                                calibration=_calibration_file(job) if spec.weights in ("int4", "int8") else None,
                                measure_agreement=False)  # the check stage measures it
        result[spec.name] = {"folder": manifest.output_dir, "mode": manifest.mode, "weights": manifest.weights,
                             "serving": manifest.serving, "graph_bytes": manifest.graph_bytes,
                             "arithmetic": manifest.arithmetic, "tier": manifest.tier,
                             "source_tier": manifest.source_tier, "quantized_ops": manifest.quantized_ops,
                             "adapter_matmuls": manifest.adapter_matmuls,
                             "nodes": sum(manifest.op_counts.values()), "seconds": time.perf_counter() - started}
    return {"exports": result}


def _calibration_file(job: _Job) -> str | None:
    """GPTQ re-quantization of a merged int4/int8 export calibrates on the quantize section's text, else on
    the training records (written once as text), as the base's quantization does."""
    if job.run.quantize.calibration is not None:
        return job.run.quantize.calibration
    path = job.output / "calibration.jsonl"
    if not path.is_file():
        with atomic_file(path) as temp:
            temp.write_text("".join(json.dumps({"text": text}, ensure_ascii=False) + "\n"
                                    for text in job.training_texts(4 * job.run.quantize.samples)), encoding="utf-8")
    return str(path)


def _check(job: _Job) -> dict[str, Any]:
    from adalora_deploy.export.judge.check import check_export  # lazy: imports torch and onnx

    result = {}
    for name, export in job.stages["export"]["exports"].items():
        report = check_export(export["folder"])
        source = report["source"].report
        if job.classification:
            logits = source.outputs[0] if source.outputs else None
            result[name] = {"passed": report.passed, "failures": list(report.failures),
                            "source_top1": logits.top1_agreement if logits is not None else None,
                            "source_max_abs": logits.max_abs if logits is not None else None,
                            "source_tokens_equal": None, "adapter_effect": report.adapter_effect}
            continue
        logits = [o for o in source.outputs if o.name.endswith("logits")]
        result[name] = {"passed": report.passed, "failures": list(report.failures),
                        "source_top1": min((o.top1_agreement for o in logits if o.top1_agreement is not None),
                                           default=None),
                        "source_max_abs": max((o.max_abs for o in logits), default=None),
                        "source_tokens_equal": source.tokens_equal}
        free = [c.report for c in report.comparisons if c.name == "free-running"]
        if free:  # int8 activations: the verdict is teacher-forced; free-running agreement is shown beside it
            logits = free[0].outputs[0]
            result[name].update(verdict="teacher-forced", free_running_top1=logits.top1_agreement,
                                free_running_mean_kl=logits.mean_kl)
    return {"checks": result}


def _evaluate_exports(job: _Job) -> dict[str, Any]:
    result = {}
    for name, export in job.stages["export"]["exports"].items():
        folder = Path(export["folder"])
        if job.classification:
            result[name] = job.classify(ClassifierSession(folder).logits)
            continue
        decoder = DecoderSession(create_session(folder / "model.onnx"))
        result[name] = job.evaluate(graph_logits(decoder, _adapter_feeds(folder)))
        if job.run.task.lm_eval:
            result[name]["lm_eval"] = lm_eval_scores(folder, job.run.task.lm_eval, batch_size=job.run.train.batch_size)
    return {"scores": result}


def _adapter_feeds(folder: Path) -> dict | None:
    """The feeds of an adapter-inputs export's own ``adapter.onnx_adapter`` (None for baked-in adapters)."""
    path = folder / ADAPTER_FILE
    if not path.is_file():
        return None
    import onnxruntime as ort

    return {name: value.numpy() for name, value in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}


def _report(job: _Job) -> dict[str, Any]:
    from adalora_deploy.job.report import write_report  # lazy: imports torch (and matplotlib)

    return write_report(job.run, job.output, job.stages)


_RUNNERS: dict[str, Callable[[_Job], dict[str, Any]]] = {
    "prepare": _prepare, "evaluate-base": _evaluate_base, "train": _train, "evaluate-trained": _evaluate_trained,
    "compact": _compact, "export": _export, "check": _check, "evaluate-exports": _evaluate_exports,
    "report": _report,
}


# --- the job ------------------------------------------------------------------------------------------


def run_job(run: RunConfig, output: str | Path, *, from_stage: str | None = None, until: str | None = None,
            progress: bool | None = None, on_stage: Callable[[str, dict[str, Any]], None] | None = None) -> JobResult:
    """Run the stages not yet finished in ``output`` (all of them, the first time).

    Args:
        run: the validated run config.
        output: the run folder (``job.json``, ``train/``, ``exports/``, ``report/`` ...).
        from_stage: redo this stage and every later one.
        until: stop after this stage (a later call continues from there).
        progress: progress bars (None: only when stderr is a terminal).
        on_stage: called with each finished stage's name and result.

    Raises:
        ConfigError: an unknown stage, or ``output`` holding a job of another config without ``from_stage``.
    """
    for option, stage in (("--from", from_stage), ("--until", until)):
        if stage is not None and stage not in STAGES:
            raise ConfigError(f"{option} {stage!r}: choose one of {', '.join(STAGES)}")
    output = Path(output)
    config = run.to_dict()
    path = output / JOB_FILE
    recorded = read_json(path) if path.is_file() else {"config": config, "stages": {}}
    if recorded.get("config") != config and from_stage is None:
        raise ConfigError(f"{output} holds a job of another config; rerun with --from STAGE to redo from a stage with "
                          f"this config, or choose another --output")
    stages: dict[str, dict[str, Any]] = dict(recorded.get("stages", {}))
    if from_stage is not None:
        for name in STAGES[STAGES.index(from_stage):]:
            stages.pop(name, None)
    job = _Job(run, output, stages, progress)
    ran = []
    for name in STAGES:
        if name in stages:
            continue
        logger.info("stage %s", name)
        started = time.perf_counter()
        result = _RUNNERS[name](job) | {"stage_seconds": 0.0}
        result["stage_seconds"] = time.perf_counter() - started
        stages[name] = result
        write_json(path, {"config": config, "stages": stages})
        ran.append(name)
        if on_stage is not None:
            on_stage(name, result)
        if name == until:
            break
    return JobResult(output_dir=output, stages=stages, ran=tuple(ran))
