"""Tiny randomly initialised models of every supported family (hidden 64, 2 layers), as Hugging Face folders.

Each folder holds the byte tokenizer of :mod:`adalora_deploy.demo` (vocabulary 259: 256 bytes + BOS, EOS,
PAD), so every family trains on the same sample text. Sliding windows are made shorter than the test
sequences, so the masks that differ from full causal attention are exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch

TOKENS = {"vocab_size": 259, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258}
SLIDING_WINDOW = 8
"""Shorter than every sequence the tests feed (32 training, 52 in check), so the window matters."""

_LLAMA_LIKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 512, "tie_word_embeddings": False}

CONFIGS: dict[str, dict] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE | {"sliding_window": SLIDING_WINDOW},
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE | {"head_dim": 16},
    "phi3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE | {"head_dim": 16},
    "gemma2": _LLAMA_LIKE | {"head_dim": 16, "sliding_window": SLIDING_WINDOW},
    "gemma3_text": _LLAMA_LIKE | {"head_dim": 16, "sliding_window": SLIDING_WINDOW},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512, "tie_word_embeddings": False},
    "gpt_neox": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "max_position_embeddings": 512, "tie_word_embeddings": False},
}
"""Config keys per ``model_type`` (the tokens of :data:`TOKENS` are added to each)."""


def tiny_config(model_type: str):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **CONFIGS[model_type], **TOKENS)


def write_tiny_model(folder: str | Path, model_type: str, seed: int = 0) -> Path:
    """Write a tiny ``model_type`` causal LM and the byte tokenizer to ``folder``; returns the folder."""
    from transformers import AutoModelForCausalLM

    from adalora_deploy.demo import byte_tokenizer

    folder = Path(folder)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
