"""Configuration: the AdaLoRA hyper-parameters (PEFT's names and defaults) and the YAML run config.

Every config is a frozen dataclass validated in ``__post_init__``; a violation raises :class:`ConfigError`
naming the field, the value, the rule and the fix. Unknown keys are rejected with the nearest valid name.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from adalora_deploy.errors import ConfigError
from adalora_deploy.gptq import SUPPORTED_BITS
from adalora_deploy.quantization import (
    ACTIVATIONS,
    GPTQ_METHODS,
    QUANTIZATIONS,
    Activations,
    GPTQMethod,
    QuantizationKind,
    family,
)

__all__ = [
    "AdaLoraConfig",
    "ConfigError",
    "DataConfig",
    "ExportConfig",
    "QuantizeConfig",
    "SECTIONS",
    "TASK_KINDS",
    "TaskConfig",
    "QUANTIZATIONS",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "from_mapping",
    "load_run_config",
]

DtypeName = Literal["float32", "bfloat16", "float16"]

PEFT_COMMON_FIELDS: dict[str, Any] = {
    "bias": "none",
    "init_lora_weights": True,
    "inference_mode": True,
    "modules_to_save": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "revision": None,
}
"""Fields every PEFT adapter_config.json we write carries with PEFT's own defaults (AdaLoRA and LoRA)."""


def _fail(section: str, name: str, value: Any, rule: str, fix: str) -> None:
    raise ConfigError(f"{section}.{name} = {value!r}: {rule}; {fix}")


def _check_choice(section: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(section, name, value, f"must be one of {', '.join(map(repr, choices))}", "pick one of those")


@dataclass(frozen=True, kw_only=True)
class AdaLoraConfig:
    """AdaLoRA hyper-parameters, named and defaulted as in PEFT's ``AdaLoraConfig``."""

    total_step: int
    """Number of optimizer steps of the whole run (T); required, the budget schedule depends on it."""
    init_r: int = 12
    """Initial rank of every adapted layer."""
    target_r: int = 8
    """Average rank per layer at the end: the final budget is n_layers * target_r."""
    tinit: int = 0
    """Warm-up steps at the full budget, before any masking."""
    tfinal: int = 0
    """Steps at the end with the rank pattern frozen at the target budget."""
    deltaT: int = 1
    """Mask every deltaT steps during the budgeting phase."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity (Eq. 10)."""
    beta2: float = 0.85
    """EMA coefficient of the uncertainty (Eq. 11)."""
    orth_reg_weight: float = 0.5
    """γ, weight of the orthogonal regularizer added to every training loss."""
    lora_alpha: float = 8
    """Numerator of the fixed scale lora_alpha / (init_r + 1e-5)."""
    lora_dropout: float = 0.0
    """Dropout on the adapter's input."""
    target_modules: list[str] | str | None = None
    """Module names (matched as name suffixes) or one regex (full match); None = the model family's default."""
    task_type: str = "CAUSAL_LM"
    """PEFT task type written to adapter_config.json."""
    regularizer: Literal["peft", "paper"] = "peft"
    """'peft': mean of unsquared Frobenius norms; 'paper': sum of squared norms (Eq. 4)."""
    schedule: Literal["cubic", "linear"] = "cubic"
    """Budget schedule; AdaLoRA is cubic, linear exists only as an option."""
    compact_in_training: bool = False
    """At the final step, slice the adapters to their surviving ranks and re-point the optimizer."""
    down_weights: Literal["fp32", "int8"] = "fp32"
    """How the adapter's down-projection ``Λ Q`` multiplies: ``fp32``, or ``int8``: each of its rows quantized to
    8-bit blocks in the forward (straight-through gradients) and multiplied on the base layer's int8 activation
    codes, which is what an 8-bit MatMulNBits at accuracy_level 4 computes, so the graph stores it in a quarter of
    the bytes and reads no padded fp32 panels (needs ``model.activations: int8``)."""

    def __post_init__(self) -> None:
        section = "adapter"
        for name in ("total_step", "init_r", "target_r", "tinit", "tfinal", "deltaT"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                _fail(section, name, value, "must be an integer", "write a whole number")
        if self.total_step <= 0:
            _fail(section, "total_step", self.total_step, "must be > 0", "set it to the number of optimizer steps")
        if self.tinit < 0 or self.tfinal < 0:
            _fail(section, "tinit" if self.tinit < 0 else "tfinal", min(self.tinit, self.tfinal), "must be >= 0",
                  "use 0 for no warm-up / final phase")
        if self.tinit >= self.total_step - self.tfinal:
            _fail(section, "tinit", self.tinit,
                  f"tinit must be < total_step - tfinal = {self.total_step - self.tfinal} so a budgeting phase exists",
                  "lower tinit or tfinal, or raise total_step")
        if self.deltaT < 1:
            _fail(section, "deltaT", self.deltaT, "must be >= 1", "mask every deltaT >= 1 steps")
        if self.init_r < 1:
            _fail(section, "init_r", self.init_r, "must be >= 1", "start from a positive rank")
        if not 0 < self.target_r < self.init_r:
            _fail(section, "target_r", self.target_r, f"must satisfy 0 < target_r < init_r = {self.init_r}",
                  "pick a target rank below the initial rank (PEFT crashes in kthvalue otherwise)")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value < 1:
                _fail(section, name, value, "must be in [0, 1)", "use e.g. 0.85 (the default)")
        for name in ("orth_reg_weight", "lora_alpha"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0:
                _fail(section, name, value, "must be >= 0", "use a non-negative weight")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            _fail(section, "lora_dropout", self.lora_dropout, "must be in [0, 1)", "use 0 for no dropout")
        if self.target_modules is not None:
            names = [self.target_modules] if isinstance(self.target_modules, str) else self.target_modules
            if not names or not all(isinstance(n, str) and n for n in names):
                _fail(section, "target_modules", self.target_modules, "must be a non-empty list of names or a regex",
                      "e.g. [q_proj, v_proj]")
            if isinstance(self.target_modules, str):
                try:
                    re.compile(self.target_modules)
                except re.error as error:
                    _fail(section, "target_modules", self.target_modules, f"is not a valid regex ({error})",
                          "fix the pattern or give a list of names")
            else:
                object.__setattr__(self, "target_modules", list(self.target_modules))
        _check_choice(section, "regularizer", self.regularizer, ("peft", "paper"))
        _check_choice(section, "schedule", self.schedule, ("cubic", "linear"))
        _check_choice(section, "down_weights", self.down_weights, ("fp32", "int8"))

    def to_peft_dict(self, rank_pattern: Mapping[str, list[bool]] | None) -> dict[str, Any]:
        """The ``adapter_config.json`` PEFT writes for an AdaLoRA adapter."""
        target = self.target_modules
        return {
            "peft_type": "ADALORA",
            "task_type": self.task_type,
            "init_r": self.init_r,
            "target_r": self.target_r,
            "r": 8,
            "tinit": self.tinit,
            "tfinal": self.tfinal,
            "deltaT": self.deltaT,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight,
            "total_step": self.total_step,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": sorted(target) if isinstance(target, list) else target,
            "rank_pattern": dict(rank_pattern) if rank_pattern is not None else None,
            "fan_in_fan_out": False,
            **PEFT_COMMON_FIELDS,
        }

    @classmethod
    def from_peft_dict(cls, data: Mapping[str, Any]) -> tuple[AdaLoraConfig, dict[str, list[bool]] | None]:
        """Read PEFT's ``adapter_config.json`` (AdaLoRA); returns the config and its rank_pattern."""
        if data.get("peft_type") != "ADALORA":
            raise ConfigError(f"adapter_config.json has peft_type {data.get('peft_type')!r}, expected 'ADALORA'")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        if "total_step" not in kwargs or kwargs["total_step"] is None:
            raise ConfigError("adapter_config.json has no total_step; AdaLoRA adapters always record it")
        return cls(**kwargs), data.get("rank_pattern")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which base model to adapt and how to load it."""

    path: str
    """A local Hugging Face model folder (or a GPTQ folder when quantization is 'gptq')."""
    quantization: QuantizationKind = "none"
    """Base kind: none (float), bnb-nf4, bnb-fp4, bnb-int8 (LLM.int8) or gptq."""
    dtype: DtypeName = "float32"
    """Dtype of float weights and of the bnb compute."""
    double_quant: bool = False
    """bnb 4-bit: quantize the absmax statistics too (bnb_4bit_use_double_quant)."""
    int8_threshold: float = 6.0
    """bnb LLM.int8: outlier threshold (llm_int8_threshold)."""
    device: str = "auto"
    """'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'."""
    activations: Activations = "fp32"
    """How the GPTQ linears (and a quantized lm_head) multiply in training: fp32 (the dequantized weight times
    fp32 activations = MatMulNBits accuracy_level 0) or int8 (activations quantized per block as onnxruntime's
    fast CPU kernels do at accuracy_level 4, straight-through gradients): the exported graph then runs those
    kernels and still computes exactly what was trained."""

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            _fail("model", "path", self.path, "must be a folder path", "point it at a local Hugging Face model folder")
        _check_choice("model", "quantization", self.quantization, QUANTIZATIONS)
        _check_choice("model", "dtype", self.dtype, get_args(DtypeName))
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device)):
            _fail("model", "device", self.device, "must be auto, cpu, cuda or cuda:N", "use 'auto'")
        _check_choice("model", "activations", self.activations, ACTIVATIONS)
        if self.activations == "int8" and family(self.quantization) != "gptq":
            _fail("model", "activations", self.activations, "int8 activations emulate MatMulNBits on GPTQ weights",
                  "use quantization: gptq, or activations: fp32")
        if not isinstance(self.int8_threshold, (int, float)) or self.int8_threshold < 0:
            _fail("model", "int8_threshold", self.int8_threshold, "must be >= 0", "use 6.0 (transformers' default)")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The training run."""

    steps: int
    """Optimizer steps; this is AdaLoRA's total_step."""
    batch_size: int = 4
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    seq_len: int = 32
    """Tokens per sequence."""
    lr: float = 5e-3
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float | None = None
    """Clip the adapters' gradient norm to this (None = no clipping)."""
    seed: int = 0
    """Seed of the adapter init, dropout and batch order."""
    checkpoint_every: int = 10
    """Write a resumable checkpoint every this many optimizer steps (0 = only at the end)."""
    eval_every: int = 0
    """Held-out loss every this many optimizer steps (0 = only after the last step); needs held-out data."""
    eval_examples: int = 64
    """Held-out examples that loss is measured on during training (the run's evaluation stages use all)."""
    data: str | None = None
    """Shorthand for ``data.train`` (a text or data file); use the ``data`` section for anything more."""

    def __post_init__(self) -> None:
        if not isinstance(self.eval_every, int) or isinstance(self.eval_every, bool) or self.eval_every < 0:
            _fail("train", "eval_every", self.eval_every, "must be an integer >= 0", "use 0 to evaluate only at the end")
        if not isinstance(self.eval_examples, int) or isinstance(self.eval_examples, bool) or self.eval_examples < 1:
            _fail("train", "eval_examples", self.eval_examples, "must be an integer >= 1", "e.g. 64")
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail("train", name, value, "must be an integer >= 1", "use a positive whole number")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            _fail("train", "lr", self.lr, "must be > 0", "use e.g. 5.0e-3")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            _fail("train", "checkpoint_every", self.checkpoint_every, "must be an integer >= 0", "use 0 to save only at the end")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            _fail("train", "max_grad_norm", self.max_grad_norm, "must be > 0 or null", "remove it to disable clipping")


DataFormat = Literal["auto", "text", "prompt_completion", "messages"]


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """What to train on and what to hold out (see :mod:`adalora_deploy.data`)."""

    train: str
    """Training data: a .txt/.jsonl/.csv/.parquet file, ``builtin:sample`` or ``package:DIST/PATH``."""
    eval: str | None = None
    """Held-out data in the same form; None: ``eval_size`` records drawn from ``train``."""
    eval_size: int = 0
    """Records (text: blocks) held out of ``train`` when ``eval`` is None; 0 holds none out."""
    format: DataFormat = "auto"
    """text (loss on all tokens), prompt_completion (loss on the completion), messages (loss on assistant
    turns); auto: by the templates given, else by the records' fields."""
    where: dict[str, Any] = field(default_factory=dict)
    """Keep only records whose fields equal these values (e.g. ``{source: rotten_tomatoes}``)."""
    map: dict[str, dict[Any, Any]] = field(default_factory=dict)
    """Replace field values before templating (e.g. ``{label: {0: negative, 1: positive}}``)."""
    text: str | None = None
    """Template of the text (Python format string over the record's fields)."""
    prompt: str | None = None
    """Template of the prompt."""
    completion: str | None = None
    """Template of the completion."""
    chat: bool = False
    """Render prompt/completion as a user/assistant exchange with the tokenizer's chat template."""
    system: str | None = None
    """System message when ``chat`` (None: the chat template's default)."""
    limit: int | None = None
    """Train on at most this many records (drawn with the run's seed); None: all."""
    packing: bool | None = None
    """Join examples into seq_len blocks (True) or pad one per row (False); None: text packed, else padded."""

    def __post_init__(self) -> None:
        section = "data"
        if not isinstance(self.train, str) or not self.train:
            _fail(section, "train", self.train, "must name a data file", "e.g. train.jsonl or builtin:sample")
        _check_choice(section, "format", self.format, get_args(DataFormat))
        if not isinstance(self.eval_size, int) or isinstance(self.eval_size, bool) or self.eval_size < 0:
            _fail(section, "eval_size", self.eval_size, "must be an integer >= 0", "e.g. 200 held-out records")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            _fail(section, "limit", self.limit, "must be an integer >= 1 or null", "remove it to use every record")
        for name in ("where", "map"):
            if not isinstance(getattr(self, name), dict):
                _fail(section, name, getattr(self, name), "must be a mapping", "e.g. {source: rotten_tomatoes}")
        if not all(isinstance(v, dict) for v in self.map.values()):
            _fail(section, "map", self.map, "must map field names to {old: new} mappings",
                  "e.g. {label: {0: negative, 1: positive}}")
        for name in ("text", "prompt", "completion", "system"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                _fail(section, name, value, "must be a string or null", "quote the template in YAML")
        if self.text is not None and (self.prompt is not None or self.completion is not None):
            _fail(section, "text", self.text, "cannot be combined with prompt/completion templates",
                  "use text for raw text, or prompt + completion for instructions")
        if (self.prompt is None) != (self.completion is None):
            _fail(section, "prompt" if self.prompt is None else "completion", None,
                  "prompt and completion templates go together", "give both")


@dataclass(frozen=True, kw_only=True)
class QuantizeConfig:
    """How ``adalora-deploy run`` quantizes a float base when ``model.quantization`` is ``gptq``."""

    method: GPTQMethod = "gptq"
    """gptq (error-compensating, needs calibration text) or rtn (round-to-nearest)."""
    bits: int = 4
    """Bits per weight: 2, 3, 4 or 8 (2, 4, 8 have onnxruntime kernels)."""
    group_size: int = 128
    """Input channels per scale/zero group; -1 for one group per row."""
    sym: bool = True
    """Symmetric grid (zero point fixed at 2^(bits-1))."""
    desc_act: bool = False
    """Act-order: quantize columns by decreasing Hessian diagonal."""
    samples: int = 64
    """Calibration sequences."""
    seq_len: int = 256
    """Tokens per calibration sequence."""
    calibration: str | None = None
    """Calibration text (a data reference); None: the training data's texts."""
    percdamp: float = 0.01
    """GPTQ damping as a fraction of the mean Hessian diagonal."""
    tables: bool = False
    """Quantize the lm_head too (and a tied embedding with it, one table), so training sees the int4 table
    the exported graph holds (GatherBlockQuantized + MatMulNBits) instead of a 4x larger fp32 one."""

    def __post_init__(self) -> None:
        _check_choice("quantize", "method", self.method, GPTQ_METHODS)
        _check_choice("quantize", "bits", self.bits, SUPPORTED_BITS)
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            _fail("quantize", "group_size", self.group_size, "must be -1 or >= 1", "use 128")
        for name in ("samples", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail("quantize", name, value, "must be an integer >= 1", "use a positive whole number")
        if self.desc_act and self.method == "rtn":
            _fail("quantize", "desc_act", True, "applies to method gptq only", "remove it or use method: gptq")


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """One graph ``adalora-deploy run`` exports, checks and evaluates (the options of ``adalora-deploy export``)."""

    name: str
    """Folder name under the run's ``exports/`` and the label in the report."""
    mode: Literal["merged", "separate"] = "separate"
    weights: Literal["fp32", "fp16", "int4", "int8"] = "fp32"
    serving: bool = False
    adapter_inputs: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            _fail("export", "name", self.name, "must be a folder name (letters, digits, . _ -)", "e.g. int4-serving")
        _check_choice("export", "mode", self.mode, ("merged", "separate"))
        _check_choice("export", "weights", self.weights, ("fp32", "fp16", "int4", "int8"))


TaskKind = Literal["causal-lm", "classification"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)


@dataclass(frozen=True, kw_only=True)
class TaskConfig:
    """What is trained (a causal LM, or an encoder as a sequence classifier) and how ``run`` scores it.

    ``task: classification`` in YAML is short for ``task: {kind: classification}``.
    """

    kind: TaskKind = "causal-lm"
    """causal-lm (next-token loss; decoders) or classification (cross-entropy on the label; BERT, RoBERTa and
    DeBERTa-v2 encoders loaded with a sequence-classification head, trained in full as PEFT's modules_to_save)."""
    label: str = "label"
    """classification: the record field holding the label (after data.map); the labels are its values in the
    training records, sorted. The text is data.text (a template; default the record's ``text`` field)."""
    choices: list[str] | None = None
    """Completions the model chooses between (classification): accuracy counts the held-out prompts whose
    highest next-token logit among the choices' first tokens is the true completion's. None: loss only."""
    max_examples: int | None = None
    """Score at most this many held-out records (None: all)."""
    lm_eval: list[str] | None = None
    """lm-evaluation-harness task YAML files (local data only; paths relative to the config) scored on every
    export in process by ``evaluate-exports``; needs the ``lmeval`` extra. None: off."""

    def __post_init__(self) -> None:
        _check_choice("task", "kind", self.kind, TASK_KINDS)
        if not isinstance(self.label, str) or not self.label:
            _fail("task", "label", self.label, "must name a record field", "e.g. label")
        if self.kind == "classification" and (self.choices is not None or self.lm_eval is not None):
            name = "choices" if self.choices is not None else "lm_eval"
            _fail("task", name, getattr(self, name), "applies to causal-lm tasks",
                  "remove it (a classifier is scored by its accuracy on the held-out labels)")
        if self.lm_eval is not None and (not isinstance(self.lm_eval, list) or not self.lm_eval or not all(
                isinstance(f, str) and f.endswith((".yaml", ".yml")) for f in self.lm_eval)):
            _fail("task", "lm_eval", self.lm_eval, "must list lm-eval task YAML files", "e.g. [tasks/sentiment.yaml]")
        if self.choices is not None and (not isinstance(self.choices, list) or len(self.choices) < 2
                                         or not all(isinstance(c, str) and c for c in self.choices)):
            _fail("task", "choices", self.choices, "must list at least two non-empty completions",
                  "e.g. [negative, positive]")
        if self.max_examples is not None and (not isinstance(self.max_examples, int) or self.max_examples < 1):
            _fail("task", "max_examples", self.max_examples, "must be an integer >= 1 or null", "remove it to use all")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole ``adalora-deploy train`` run: model, adapter and training sections."""

    model: ModelConfig
    adapter: AdaLoraConfig
    train: TrainConfig
    data: DataConfig
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    """Used by ``run`` to make a GPTQ base from a float one."""
    exports: tuple[ExportConfig, ...] = ()
    """Graphs ``run`` exports, checks and evaluates."""
    task: TaskConfig = field(default_factory=TaskConfig)
    """How ``run`` scores models on the held-out data."""
    source: str | None = field(default=None, compare=False)
    """The file this config was read from (relative paths in it resolve against its folder)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML/JSON (the adapter section without total_step, which is train.steps)."""
        adapter = dataclasses.asdict(self.adapter)
        adapter.pop("total_step")
        train = dataclasses.asdict(self.train)
        train.pop("data")  # it lives in data.train
        return {"model": dataclasses.asdict(self.model), "adapter": adapter, "train": train,
                "data": dataclasses.asdict(self.data), "quantize": dataclasses.asdict(self.quantize),
                "export": [dataclasses.asdict(e) for e in self.exports], "task": dataclasses.asdict(self.task)}

    def training_record(self) -> dict[str, Any]:
        """The sections that decide what training computes (a resumed run must match them exactly)."""
        record = self.to_dict()
        return {key: record[key] for key in ("model", "adapter", "train", "data")}


def from_mapping(cls: type, data: Any, section: str, **extra: Any) -> Any:
    """Build the dataclass ``cls`` from a mapping, rejecting unknown keys with the nearest valid one."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section}: expected a mapping of keys to values, got {type(data).__name__}")
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "source"]
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"did you mean {section}.{close[0]}?" if close else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"{section}.{key}: unknown key; {hint}")
    values = dict(data)
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for key, value in values.items():
        # YAML 1.1 reads "1e-3" as a string; accept it for float fields instead of failing on a number.
        if "float" in types.get(key, "") and isinstance(value, str):
            try:
                values[key] = float(value)
            except ValueError:
                raise ConfigError(f"{section}.{key} = {value!r}: must be a number; write e.g. 1.0e-3") from None
    try:
        return cls(**values, **extra)
    except TypeError as error:
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   and f.name not in data and f.name not in extra]
        if missing:
            raise ConfigError(f"{section}.{missing[0]}: required key is missing") from None
        raise ConfigError(f"{section}: {error}") from None


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else ""


SECTIONS = ("model", "adapter", "train", "data", "quantize", "export", "task")
"""Sections of a run config; model, adapter and train are required (data may be given as train.data)."""
_MAPPING_SECTIONS = ("model", "adapter", "train", "data", "quantize", "task")


def _unknown_section(name: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(str(name), SECTIONS, n=1)
    hint = f"did you mean {close[0]}?" if close else f"sections are {', '.join(SECTIONS)}"
    return ConfigError(f"{where}unknown section {name!r}; {hint}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config mapping."""
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    if isinstance(data.get("task"), str):  # task: classification
        data["task"] = {"kind": data["task"]}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.steps=50")
        dotted, value = item.split("=", 1)
        section, key = dotted.split(".", 1)
        if section not in _MAPPING_SECTIONS:
            raise _unknown_section(section, f"--set {item!r}: ")
        data.setdefault(section, {})[key] = _parse_value(value)
    return data


def parse_run_config(data: Any, source: str | None = None) -> RunConfig:
    """Validate a raw mapping (as read from YAML) into a :class:`RunConfig`."""
    if not isinstance(data, Mapping):
        raise ConfigError("the config file must be a YAML mapping with sections model, adapter, train")
    for key in data:
        if key not in SECTIONS:
            raise _unknown_section(key, "")
    for key in ("model", "adapter", "train"):
        if key not in data:
            raise ConfigError(f"{key}: required section is missing")
    base = Path(source).parent if source else Path.cwd()
    sections = {key: dict(value) if isinstance(value, Mapping) else value for key, value in data.items()}
    for section, key in (("model", "path"), ("train", "data"), ("data", "train"), ("data", "eval"),
                         ("quantize", "calibration")):
        values = sections.get(section)
        if isinstance(values, dict) and isinstance(values.get(key), str):
            values[key] = _resolve(values[key], base)
    task_section = sections.get("task")
    if isinstance(task_section, dict) and isinstance(task_section.get("lm_eval"), list):
        task_section["lm_eval"] = [_resolve(f, base) if isinstance(f, str) else f for f in task_section["lm_eval"]]
    model = from_mapping(ModelConfig, sections["model"], "model")
    train = from_mapping(TrainConfig, sections["train"], "train")
    if "data" in sections:
        if train.data is not None:
            raise ConfigError("train.data and the data section both name training data; keep data.train only")
        data_config = from_mapping(DataConfig, sections["data"], "data")
    elif train.data is not None:
        data_config = DataConfig(train=train.data)
    else:
        raise ConfigError("data: required section is missing (or give train.data: FILE for plain text)")
    adapter_data = sections["adapter"]
    if isinstance(adapter_data, Mapping) and "total_step" in adapter_data:
        if adapter_data["total_step"] != train.steps:
            raise ConfigError(f"adapter.total_step = {adapter_data['total_step']!r} differs from train.steps = "
                              f"{train.steps}; remove adapter.total_step (it is train.steps)")
        adapter_data = {k: v for k, v in adapter_data.items() if k != "total_step"}
    adapter = from_mapping(AdaLoraConfig, adapter_data, "adapter", total_step=train.steps)
    exports = sections.get("export", [])
    if not isinstance(exports, list):
        raise ConfigError("export: must be a list of exports, e.g. [{name: int4, mode: separate, serving: true}]")
    export_configs = tuple(from_mapping(ExportConfig, item, f"export[{i}]") for i, item in enumerate(exports))
    names = [e.name for e in export_configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"export: names must be unique, got {names}")
    quantize = from_mapping(QuantizeConfig, sections.get("quantize", {}), "quantize")
    if adapter.down_weights == "int8" and model.activations != "int8":
        _fail("adapter", "down_weights", "int8", "multiplies on the base's int8 activation codes",
              "set model.activations: int8 (a GPTQ base), or down_weights: fp32")
    task_data = sections.get("task", {})
    task = from_mapping(TaskConfig, {"kind": task_data} if isinstance(task_data, str) else task_data, "task")
    if task.kind == "classification":
        for name in ("prompt", "completion", "system"):
            if getattr(data_config, name) is not None:
                _fail("data", name, getattr(data_config, name), "task: classification reads a text and a label",
                      "use data.text (template of the text) and task.label (the label field)")
        if model.quantization == "gptq":
            _fail("model", "quantization", "gptq", "is not supported for task: classification yet",
                  "use none, bnb-nf4, bnb-fp4 or bnb-int8")
        if data_config.chat:
            _fail("data", "chat", True, "task: classification reads a text and a label", "remove it")
        if adapter.task_type == "CAUSAL_LM":  # PEFT's name for a sequence classifier
            adapter = dataclasses.replace(adapter, task_type="SEQ_CLS")
    return RunConfig(model=model, adapter=adapter, train=train, data=data_config,
                     quantize=quantize, exports=export_configs, task=task, source=source)


def _resolve(value: str, base: Path) -> str:
    """Paths in a config are relative to the config file; ``builtin:`` and ``package:`` names are kept."""
    if value.startswith(("builtin:", "package:")) or os.path.isabs(value):
        return value
    return str((base / value).resolve())


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read, override and validate a YAML run config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a YAML mapping with sections model, adapter, train")
    return parse_run_config(apply_overrides(data, overrides or []), source=str(path))
