"""Shared fixtures: tiny deterministic models and runs built in code (no network, no downloads)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from adalora_deploy.demo import write_tiny_llama

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Converted and built models go to a cache folder of this test session, not the user's."""
    import os

    previous = os.environ.get("ADALORA_DEPLOY_CACHE")
    os.environ["ADALORA_DEPLOY_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("ADALORA_DEPLOY_CACHE", None)
    else:
        os.environ["ADALORA_DEPLOY_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (hidden 64, 2 layers) with a byte tokenizer, as a Hugging Face folder."""
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def sample_text(tmp_path) -> Path:
    """A small training text with repeated structure (so a few steps lower the loss)."""
    from adalora_deploy.demo import SAMPLE_TEXT

    path = tmp_path / "train.txt"
    path.write_text(SAMPLE_TEXT.read_text(encoding="utf-8"), encoding="utf-8")
    return path


def run_config(model_dir: Path | str, data: Path | str, **sections) -> dict:
    """A raw run-config mapping for a short run on the tiny model; ``sections`` override keys per section."""
    config = {
        "model": {"path": str(model_dir)},
        "adapter": {"target_modules": ["q_proj", "v_proj"], "init_r": 12, "target_r": 4, "tinit": 2, "tfinal": 2,
                    "deltaT": 1, "lora_alpha": 8},
        "train": {"data": str(data), "steps": 20, "batch_size": 4, "seq_len": 32, "lr": 5.0e-3, "seed": 0},
    }
    for section, values in sections.items():
        config[section].update(values)
    return config


def random_tokens(batch: int = 2, length: int = 24, seed: int = 1) -> torch.Tensor:
    """Token ids in the byte range, from a fixed seed."""
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))
