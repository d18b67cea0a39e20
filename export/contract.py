"""The graph contract: what an export folder and its decoding graph promise, written once and read by every side.

The builders (:mod:`.build`) write to it, the judges (:mod:`.judge`) and the runtime (:mod:`.runtime`) read
by it; this module imports nothing beyond the standard library, so the torch-free server can import it.

::

    export folder:  model.onnx (+ model.onnx.data)   config.json, tokenizer files
                    export.json (manifest)           genai_config.json (onnxruntime-genai)
                    parity.json (written by check)   adapter.onnx_adapter (adapter-inputs graphs)

    graph inputs:   input_ids                 int64 [batch, seq]
                    attention_mask            int64 [batch, total_seq]
                    past_key_values.{i}.key   float [batch, kv_heads, past_seq, head_dim]  (and .value)
                    <module>.lora_A           fp32  [in, rank]   (adapter-inputs graphs only)
                    <module>.lora_B           fp32  [rank, out]
    graph outputs:  logits                    fp32  [batch, seq, vocab]
                    present.{i}.key           float [batch, kv_heads, total_seq, head_dim]  (and .value)
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

__all__ = [
    "ADAPTER_FILE",
    "ADAPTER_SUFFIX",
    "ATTENTION_MASK",
    "BUILDER_METADATA",
    "FUSED_LINEARS",
    "GENAI_CONFIG_FILE",
    "INPUT_IDS",
    "KVGeometry",
    "KV_SHARE_BUFFER_METADATA",
    "LOGITS",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "PARITY_FILE",
    "PAST_PREFIX",
    "PRESENT_PREFIX",
    "adapter_input_name",
    "is_lora_A",
    "kv_names",
    "present_for_past",
]

# --- files of an export folder ---------------------------------------------------------------------------

MODEL_FILE = "model.onnx"
"""The decoding graph; its weights may sit beside it in ``model.onnx.data``."""
MANIFEST_FILE = "export.json"
"""What was exported, how, and the file hashes (:mod:`.build.manifest`)."""
PARITY_FILE = "parity.json"
"""What ``check`` measured (:mod:`.judge.check`)."""
GENAI_CONFIG_FILE = "genai_config.json"
"""onnxruntime-genai's description of the graph (:mod:`.runtime.genai`)."""
ADAPTER_SUFFIX = ".onnx_adapter"
"""onnxruntime adapter files: factors for an adapter-inputs graph; the server serves one model id per file."""
ADAPTER_FILE = f"adapter{ADAPTER_SUFFIX}"
"""The exported adapter's own factors, beside an adapter-inputs graph."""

# --- graph inputs, outputs and metadata ------------------------------------------------------------------

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
_KV = ("key", "value")

KV_SHARE_BUFFER_METADATA = "adalora_deploy.kv_share_buffer"
"""Graph metadata key: ``"1"`` when every present is written in place into its past buffer (fast-path graphs,
GroupQueryAttention), so past and present may share one preallocated buffer."""
BUILDER_METADATA = "adalora_deploy.builder"
"""Graph metadata key: which builder wrote the graph (``fastpath``)."""

FUSED_LINEARS = MappingProxyType({"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")})
"""Name scopes the fast path emits for projections it fuses into one MatMul (and for their one LoRA branch,
``<scope>.lora_A`` / ``<scope>.lora_B``), and the modules each one holds (in output order): whoever reads weights
back from a graph maps the scopes to the modules through this."""


def kv_names(num_layers: int) -> tuple[list[str], list[str]]:
    """``(past, present)`` names in graph order: ``past_key_values.{i}.key``, ``past_key_values.{i}.value``, ..."""
    past = [f"{PAST_PREFIX}{i}.{kv}" for i in range(num_layers) for kv in _KV]
    present = [f"{PRESENT_PREFIX}{i}.{kv}" for i in range(num_layers) for kv in _KV]
    return past, present


def present_for_past(name: str) -> str:
    """The output a past input's updated cache comes out as (``past_key_values.0.key`` -> ``present.0.key``)."""
    return name.replace(PAST_PREFIX, PRESENT_PREFIX, 1)


def adapter_input_name(module: str, factor: str) -> str:
    """``<module>.lora_A`` [in, rank] or ``<module>.lora_B`` [rank, out]."""
    return f"{module}.{factor}"


def is_lora_A(name: str) -> bool:
    """An adapter input whose first axis is the module's width (``lora_A`` [in, rank]), not its rank."""
    return name.endswith(".lora_A")


# --- KV geometry -----------------------------------------------------------------------------------------


_GPT2_NAMES = {"num_attention_heads": "n_head", "num_hidden_layers": "n_layer", "hidden_size": "n_embd"}
"""GPT-2's config.json spells the geometry its own way (transformers maps these through ``attribute_map``)."""


@dataclass(frozen=True)
class KVGeometry:
    """The decoder's shape as the graph's KV cache sees it, read from a transformers config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> KVGeometry:
        """From a transformers config object or its ``config.json`` dict (a multimodal wrapper's text config)."""
        if isinstance(config, Mapping):
            text = config if "num_hidden_layers" in config or "n_layer" in config else config.get("text_config", config)
            get = lambda key: text.get(key, text.get(_GPT2_NAMES.get(key, key)))  # noqa: E731
        else:
            text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
            get = lambda key: getattr(text, key, None)  # noqa: E731
        heads = int(get("num_attention_heads"))
        hidden = int(get("hidden_size"))
        return cls(num_layers=int(get("num_hidden_layers")), num_heads=heads,
                   num_kv_heads=int(get("num_key_value_heads") or heads),
                   head_dim=int(get("head_dim") or hidden // heads), hidden=hidden,
                   vocab=int(get("vocab_size")))
