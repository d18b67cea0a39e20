"""GPTQ checkpoint folders: the ``quantization_config`` and reading/writing whole models.

A folder is what transformers, gptqmodel and auto-gptq read and write: ``config.json`` with
``quantization_config = {"quant_method": "gptq", "bits", "group_size", "desc_act", "sym",
"checkpoint_format"}`` and ``model.safetensors`` (or a sharded index) holding ``<linear>.qweight/qzeros/
scales/g_idx(/bias)`` for each quantized linear and float tensors for the rest (docs/QUANT.md). Tensors are
read with safetensors only; folders are written under a temporary name and swapped into place whole.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adalora_deploy.artifacts import (
    PICKLE_SUFFIXES,
    atomic_dir,
    copy_tokenizer_files,
    save_tensors,
    write_json,
)
from adalora_deploy.architectures import linear_features
from adalora_deploy.gptq.linear import QuantLinear, quant_linears
from adalora_deploy.errors import GPTQFormatError
from adalora_deploy.gptq.packing import (
    CHECKPOINT_FORMATS,
    CheckpointFormat,
    check_bits,
    pack_zeros,
)

__all__ = ["GPTQQuantConfig", "load_gptq_model", "read_quant_config", "save_gptq_model"]

logger = logging.getLogger(__name__)

_WEIGHTS_NAME = "model.safetensors"
_INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class GPTQQuantConfig:
    """``config.json["quantization_config"]`` of a GPTQ checkpoint."""

    bits: int
    """2, 3, 4 or 8."""
    group_size: int
    """Input channels per group; -1 for one group per output row."""
    desc_act: bool
    """Act-order was used (``g_idx`` non-monotone)."""
    sym: bool
    """Symmetric quantization (zero fixed at ``2**(bits-1)``)."""
    checkpoint_format: CheckpointFormat = "gptq"
    """``"gptq"`` (v1, zeros stored minus one; the default when the key is missing) or ``"gptq_v2"``."""
    lm_head: bool = False
    """The lm_head is quantized too (gptqmodel's key; a tied embedding then holds its dequantized table)."""

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group_size != -1 and self.group_size < 1:
            raise GPTQFormatError(f"quantization_config.group_size must be -1 or >= 1, got {self.group_size}")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise GPTQFormatError(
                f"quantization_config.checkpoint_format must be one of {CHECKPOINT_FORMATS}, "
                f"got {self.checkpoint_format!r}"
            )

    @classmethod
    def from_dict(cls, data: dict, where: str = "quantization_config") -> GPTQQuantConfig:
        """Read the dict of a config.json; raises :class:`GPTQFormatError` naming ``where`` on bad entries."""
        if not isinstance(data, dict):
            raise GPTQFormatError(f"{where}: expected an object, got {type(data).__name__}")
        method = data.get("quant_method")
        if method != "gptq":
            raise GPTQFormatError(f"{where}: quant_method must be 'gptq', got {method!r}")
        pack_dtype = str(data.get("pack_dtype", "int32")).removeprefix("torch.")
        if pack_dtype != "int32":
            raise GPTQFormatError(f"{where}: pack_dtype {pack_dtype!r} is not supported (only int32 words)")
        try:
            return cls(
                bits=int(data["bits"]),
                group_size=int(data.get("group_size", -1)),
                desc_act=bool(data.get("desc_act", False)),
                sym=bool(data.get("sym", True)),
                # gptqmodel also spells the key "format"; absent means v1.
                checkpoint_format=data.get("checkpoint_format", data.get("format", "gptq")),
                lm_head=bool(data.get("lm_head", False)),
            )
        except KeyError as error:
            raise GPTQFormatError(f"{where}: missing key {error.args[0]!r}") from None
        except (TypeError, ValueError) as error:  # includes GPTQFormatError from __post_init__
            raise GPTQFormatError(f"{where}: {error}") from None

    def to_dict(self) -> dict:
        """The ``quantization_config`` entry as transformers and gptqmodel read it."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "checkpoint_format": self.checkpoint_format,
            "true_sequential": True,
            "static_groups": False,
            "lm_head": self.lm_head,
        }


def _shared_config(layers: dict[str, QuantLinear], checkpoint_format: CheckpointFormat | None,
                   lm_head: bool = False) -> GPTQQuantConfig:
    first_name, first = next(iter(layers.items()))
    for name, layer in layers.items():
        for attr in ("bits", "group_size", "sym", "desc_act"):
            if getattr(layer, attr) != getattr(first, attr):
                raise GPTQFormatError(
                    f"a GPTQ checkpoint has one {attr} for all layers: {first_name} has {getattr(first, attr)}, "
                    f"{name} has {getattr(layer, attr)}"
                )
    if checkpoint_format is None:
        checkpoint_format = "gptq" if first.sym else "gptq_v2"
    if checkpoint_format == "gptq" and not first.sym:
        raise GPTQFormatError(
            "asymmetric GPTQ checkpoints must be written as 'gptq_v2': v1 ('gptq') cannot store a zero point of 0"
        )
    return GPTQQuantConfig(first.bits, first.group_size, first.desc_act, first.sym, checkpoint_format,
                           lm_head=lm_head)


def save_gptq_model(
    model: nn.Module,
    folder: str | Path,
    *,
    tokenizer_source: str | Path | None = None,
    checkpoint_format: CheckpointFormat | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model holding :class:`QuantLinear` layers as a standard GPTQ Hugging Face folder.

    Writes ``config.json`` (the model config plus ``quantization_config``) and ``model.safetensors``
    (``<name>.qweight/.qzeros/.scales/.g_idx(/.bias)`` for quantized layers, float tensors for the
    rest), and copies tokenizer files from ``tokenizer_source``. Everything is written into a temporary
    folder next to ``folder`` and swapped into place whole (:func:`~adalora_deploy.artifacts.atomic_dir`),
    so no partial folder is left.

    Args:
        model: a transformers model (needs ``.config``) with at least one :class:`QuantLinear`.
        folder: destination.
        tokenizer_source: folder whose tokenizer/generation files are copied, or None.
        checkpoint_format: ``"gptq"`` (v1) or ``"gptq_v2"``; None picks v1 for symmetric and v2 for
            asymmetric quantization. v1 is refused for asymmetric layers.
        overwrite: replace an existing non-empty ``folder``.

    Returns:
        The folder.

    Raises:
        GPTQFormatError: no quantized layers, mixed settings, v1 with asymmetric layers, or an existing folder.
    """
    folder = Path(folder)
    layers = quant_linears(model)
    if not layers:
        raise GPTQFormatError("the model has no QuantLinear layers; quantize it first")
    if not hasattr(model, "config"):
        raise GPTQFormatError("save_gptq_model needs a transformers model (with .config)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    quant_config = _shared_config(layers, checkpoint_format, lm_head=isinstance(head, QuantLinear))
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())) and not overwrite:
        raise GPTQFormatError(f"output folder {folder} exists and is not empty (pass overwrite=True to replace it)")

    tensors: dict[str, torch.Tensor] = {}
    seen_storage: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen_storage:
            continue  # a tied weight (e.g. lm_head = embed_tokens): stored once, re-tied on load
        seen_storage[key] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    for name, layer in layers.items():
        zeros = layer.zero_points()
        tensors[f"{name}.qzeros"] = pack_zeros(zeros, layer.bits, quant_config.checkpoint_format).cpu()

    config_dict = model.config.to_dict()
    config_dict["quantization_config"] = quant_config.to_dict()

    with atomic_dir(folder) as staging:
        save_tensors(staging / _WEIGHTS_NAME, tensors, metadata={"format": "pt"})
        write_json(staging / "config.json", config_dict)
        if tokenizer_source is not None and not copy_tokenizer_files(tokenizer_source, staging):
            logger.warning("no tokenizer files found in %s", tokenizer_source)
    logger.info("wrote %d quantized layers (%s) to %s", len(layers), quant_config, folder)
    return folder


def read_quant_config(folder: str | Path) -> GPTQQuantConfig:
    """The ``quantization_config`` of a GPTQ folder's config.json."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise GPTQFormatError(f"{path}: not found (a GPTQ model folder needs config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GPTQFormatError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or "quantization_config" not in config:
        raise GPTQFormatError(f"{path}: no 'quantization_config' entry; this is not a GPTQ checkpoint")
    return GPTQQuantConfig.from_dict(config["quantization_config"], where=f"{path}: quantization_config")


class _TensorFiles:
    """Lazy access to the tensors of a single or sharded safetensors checkpoint.

    Attributes:
        description: the file to name in errors about the checkpoint as a whole (single file or index).
    """

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._handles = {}
        single, index = folder / _WEIGHTS_NAME, folder / _INDEX_NAME
        self.description = single if single.is_file() else index
        if single.is_file():
            files = {single}
            self._where: dict[str, Path] = {}
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise GPTQFormatError(f"{index}: not a valid safetensors index ({error})") from None
            self._where = {key: folder / shard for key, shard in weight_map.items()}
            files = set(self._where.values())
        else:
            pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise GPTQFormatError(f"{folder} holds {pickles[0]}, a pickle file, and no {_WEIGHTS_NAME}: tensors are "
                                      "read from safetensors only, because unpickling a file can run code; re-save it "
                                      "as safetensors")
            raise GPTQFormatError(f"{single}: not found (nor {_INDEX_NAME})")
        for path in sorted(files):
            if not path.is_file():
                raise GPTQFormatError(f"{path}: not found (listed in {_INDEX_NAME})")
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except Exception as error:  # safetensors raises its own SafetensorError on bad headers
                raise GPTQFormatError(f"{path}: not a readable safetensors file ({error})") from None
            self._handles[path] = handle
            if single.is_file():
                self._where.update({key: path for key in handle.keys()})

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, key: str) -> torch.Tensor:
        path = self._where[key]
        try:
            return self._handles[path].get_tensor(key)
        except Exception as error:
            raise GPTQFormatError(f"{path}: cannot read tensor {key!r} ({error})") from None

    def path(self, key: str) -> Path:
        return self._where[key]


def load_gptq_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Load a GPTQ Hugging Face folder (v1 or v2) into a transformers model with :class:`QuantLinear` layers.

    The model is built from config.json alone (no network); every ``nn.Linear`` whose ``<name>.qweight``
    is in the safetensors becomes a :class:`QuantLinear`; all tensors are read with safetensors (never
    pickle). Quantized buffers are loaded bit-exactly as stored; float tensors are cast to ``dtype``.

    Args:
        folder: the model folder (config.json, model.safetensors or a sharded index).
        dtype: dtype of the float (non-quantized) weights.
        device: where the model is placed.

    Returns:
        The model in eval mode with every parameter frozen.

    Raises:
        GPTQFormatError: a missing/unreadable file, a missing/unexpected key or a tensor of the wrong
            shape or dtype; the message names the file and key.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not folder.is_dir():
        raise GPTQFormatError(f"{folder}: not a folder")
    quant_config = read_quant_config(folder)
    files = _TensorFiles(folder)
    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise GPTQFormatError(f"{folder / 'config.json'}: transformers cannot read it ({error})") from None
    # from_config would otherwise try to route GPTQ through optimum/gptqmodel.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    keys = files.keys()
    for name, module in list(model.named_modules()):
        features = linear_features(module)  # nn.Linear, or GPT-2's Conv1D (weight stored (in, out))
        if features is not None and f"{name}.qweight" in keys:
            layer = QuantLinear(
                *features,
                quant_config.bits,
                quant_config.group_size,
                sym=quant_config.sym,
                desc_act=quant_config.desc_act,
                bias=module.bias is not None,
                checkpoint_format=quant_config.checkpoint_format,
            )
            model.set_submodule(name, layer)
    for key in keys:
        if key.endswith(".qweight") and not isinstance(_get_module(model, key.rsplit(".", 1)[0]), QuantLinear):
            raise GPTQFormatError(f"{files.path(key)}: {key} does not belong to an nn.Linear or Conv1D of this model")

    state = model.state_dict()
    groups: dict[tuple[int, int], list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), []).append(name)
    quant_names = set(quant_linears(model))
    loaded: set[str] = set()
    for names in groups.values():
        present = [n for n in names if n in keys]
        if not present:
            owner, _, leaf = names[0].rpartition(".")
            if owner in quant_names and leaf == "g_idx":
                continue  # absent g_idx means i // group_size, which is the initial value
            raise GPTQFormatError(f"{files.description}: missing tensor {names[0]!r} (the model in config.json has it)")
        for name in present:
            _load_tensor(state[name], files, name, quant_names)
            loaded.add(name)
    unexpected = sorted(keys - set(state))
    if unexpected:
        raise GPTQFormatError(
            f"{files.path(unexpected[0])}: unexpected tensor {unexpected[0]!r}"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
            + " (the checkpoint does not match its config.json)"
        )
    for name in quant_names:
        layer = model.get_submodule(name)
        if f"{name}.g_idx" in loaded:
            _check_g_idx_loaded(layer, files.path(f"{name}.g_idx"), f"{name}.g_idx")
    model.to(device)
    model.requires_grad_(False)
    return model.eval()


def _get_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


_QUANT_DTYPES = {"qweight": torch.int32, "qzeros": torch.int32, "g_idx": torch.int32}


def _load_tensor(target: torch.Tensor, files: _TensorFiles, key: str, quant_names: set[str]) -> None:
    source = files.get(key)
    path = files.path(key)
    if tuple(source.shape) != tuple(target.shape):
        raise GPTQFormatError(
            f"{path}: tensor {key!r} has shape {tuple(source.shape)}, "
            f"the model (from config.json) expects {tuple(target.shape)}"
        )
    owner, _, leaf = key.rpartition(".")
    if owner in quant_names and leaf in _QUANT_DTYPES:
        if source.dtype != torch.int32:
            raise GPTQFormatError(f"{path}: tensor {key!r} must be int32, got {source.dtype}")
    elif not source.dtype.is_floating_point and target.dtype.is_floating_point:
        raise GPTQFormatError(f"{path}: tensor {key!r} must be floating point, got {source.dtype}")
    with torch.no_grad():
        target.copy_(source.to(target.dtype))


def _check_g_idx_loaded(layer: QuantLinear, path: Path, key: str) -> None:
    g_idx = layer.g_idx
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= layer.num_groups):
        raise GPTQFormatError(f"{path}: tensor {key!r} has values outside [0, {layer.num_groups - 1}]")
