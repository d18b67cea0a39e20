"""Tiny random-initialised encoders (BERT, RoBERTa, DeBERTa-v2) and a small labelled set, for the
``task: classification`` tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

POSITIVE = ("good", "great")
NEGATIVE = ("bad", "awful")
FILLER = ("the", "film", "was", "a", "plot", "very", "and", "cast", "story", "it")


def write_encoder(folder: Path, model_type: str, seed: int = 0) -> Path:
    """A 2-layer, hidden-64 encoder saved as its base model (no head) with the byte tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModel

    from adalora_deploy.demo import byte_tokenizer

    extra = {"type_vocab_size": 2} if model_type != "deberta-v2" else {
        "relative_attention": True, "position_buckets": 16, "max_relative_positions": 64,
        "pos_att_type": ["p2c", "c2p"], "position_biased_input": False, "type_vocab_size": 0}
    config = AutoConfig.for_model(model_type, vocab_size=259, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128, pad_token_id=258,
                                  # RoBERTa's positions start past the padding id (258)
                                  max_position_embeddings=128 if model_type != "roberta" else 400,
                                  hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **extra)
    torch.manual_seed(seed)
    AutoModel.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def labelled_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short sentences whose label is the sentiment word they open with (a random encoder pools the first
    token, and the byte tokenizer adds no [CLS]: the word first keeps the task learnable in a few steps)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = [rng.choice(POSITIVE if label == "positive" else NEGATIVE)] + [rng.choice(FILLER) for _ in range(3)]
        records.append({"text": " ".join(words), "label": label})
    return records


def write_labelled(path: Path, n: int = 96, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in labelled_records(n, seed)))
    return path


def classification_config(model: Path, data: Path, *, quantization: str = "none", steps: int = 30, **sections) -> dict:
    config = {
        "model": {"path": str(model), "quantization": quantization, "device": "cpu"},
        "task": "classification",
        "data": {"train": str(data), "eval_size": 32},
        "adapter": {"init_r": 6, "target_r": 3, "tinit": 4, "tfinal": 6, "deltaT": 2, "lora_alpha": 16},
        "train": {"steps": steps, "batch_size": 16, "seq_len": 32, "lr": 1.0e-2, "seed": 0, "eval_every": 0},
    }
    for key, value in sections.items():
        current = config.get(key)
        config[key] = {**current, **value} if isinstance(value, dict) and isinstance(current, dict) else value
    return config
