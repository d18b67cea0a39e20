"""The embedded default: a tiny Llama and a byte-level tokenizer built in code, plus a sample text.

No model hub is reachable from where this runs, so the default job and every test build their model
here, deterministically from a seed. The tokenizer is byte-level BPE with no merges (256 byte tokens
and three specials), so any UTF-8 text round-trips without training anything.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

__all__ = ["SAMPLE_TEXT", "byte_tokenizer", "tiny_llama", "write_tiny_llama"]

SAMPLE_TEXT = Path(str(resources.files("adalora_deploy") / "assets" / "sample.txt"))
"""A 3.5 KB original English text shipped with the package (the default training data)."""


CHAT_TEMPLATE = ("{% for message in messages %}<s>{{ message['role'] }}\n{{ message['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
"""A ChatML-like template over the byte tokenizer's specials: each turn ends with EOS (``</s>``)."""


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` over the 256 bytes plus ``<s>``, ``</s>``, ``<pad>`` (ids 256-258), with
    :data:`CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_llama(
    seed: int = 0,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = False,
    vocab_size: int = 259,
):
    """A randomly initialised ``LlamaForCausalLM`` sized for tests (about 80k parameters at the defaults);
    ``tie_word_embeddings`` shares the embedding with the lm_head, as SmolLM2 and most small models do."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=512,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=tie_word_embeddings,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config).to(dtype)
    finally:
        torch.random.set_rng_state(generator_state)
    return model.eval()


def write_tiny_llama(folder: str | Path, seed: int = 0, **sizes) -> Path:
    """Write a tiny Llama and its tokenizer as a Hugging Face model folder; returns the folder."""
    folder = Path(folder)
    model = tiny_llama(seed=seed, **sizes)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
