"""The architecture table: every family's layers and default targets exist in a tiny model of it, GPTQ finds
their decoder layers, the README shows the table, and what is not supported is refused before any work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from adalora_deploy.architectures import (
    ARCHITECTURES,
    UnsupportedArchitectureError,
    architecture_for,
    conv1d_as_linear,
    decoder_layers,
    support_table,
)
from adalora_deploy.cli import main
from tests.tiny_families import CONFIGS, tiny_config

ROOT = Path(__file__).resolve().parents[1]
MODEL_TYPES = [model_type for arch in ARCHITECTURES for model_type in arch.model_types]


def _tiny(model_type: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type), dtype=torch.float32).eval()


def test_every_family_has_a_tiny_model():
    assert set(MODEL_TYPES) == set(CONFIGS)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_table_entry_matches_the_model(model_type):
    """The layer path holds the 2 decoder layers; each default target names a module of the table's linear type."""
    from adalora_deploy.adapters import matches_target

    model = _tiny(model_type)
    arch = architecture_for(model_type)
    path, layers = decoder_layers(model)
    assert path == arch.layers and len(layers) == 2
    targets = [m for name, m in model.named_modules() if name and matches_target(name, list(arch.target_modules))]
    assert len(targets) == 2 * len(arch.target_modules)  # one per decoder layer
    assert {type(m).__name__ for m in targets} == {arch.linear}


def test_default_target_modules_are_recorded(tmp_path, caplog):
    from adalora_deploy.config import parse_run_config
    from adalora_deploy.demo import SAMPLE_TEXT
    from adalora_deploy.training import train
    from tests.conftest import run_config
    from tests.tiny_families import write_tiny_model

    model = write_tiny_model(tmp_path / "model", "gpt_neox")
    run = parse_run_config(run_config(model, SAMPLE_TEXT, adapter={"target_modules": None}, train={"steps": 6}))
    with caplog.at_level("INFO", logger="adalora_deploy"):
        train(run, tmp_path / "run", progress=False)
    assert "using the gpt_neox default ['query_key_value']" in caplog.text
    assert json.loads((tmp_path / "run" / "run.json").read_text())["target_modules"] == ["query_key_value"]
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["query_key_value"]


def test_conv1d_as_linear_computes_the_same_function():
    model = _tiny("gpt2")
    block = model.transformer.h[0]
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    before = block(x)[0] if isinstance(block(x), tuple) else block(x)
    replaced = conv1d_as_linear(block)
    after = block(x)[0] if isinstance(block(x), tuple) else block(x)
    assert sorted(replaced) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert all(type(block.get_submodule(name)) is torch.nn.Linear for name in replaced)
    ATOL = 1e-5  # addmm vs linear: fp32 summation order only (measured 4.8e-7)
    assert (before - after).abs().max() <= ATOL


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_neox", "phi3"])
def test_gptq_quantizes_every_decoder_linear(model_type, tmp_path):
    """GPTQ on families outside model.model.layers; the saved checkpoint loads back to the same logits."""
    from adalora_deploy.gptq.linear import quant_linears
    from adalora_deploy.gptq.checkpoint import load_gptq_model, save_gptq_model
    from adalora_deploy.gptq.driver import quantize_model
    from tests.conftest import random_tokens

    model = _tiny(model_type)
    ids = random_tokens(2, 16)
    reference = model(ids).logits
    report = quantize_model(model, random_tokens(8, 32, seed=3), method="gptq", bits=4, group_size=32)
    per_layer = {"gpt2": 4, "gpt_neox": 4, "phi3": 4}[model_type]
    assert len(report.layers) == len(quant_linears(model)) == 2 * per_layer
    assert report.layers[0].name.startswith(architecture_for(model_type).layers + ".0.")
    quantized = model(ids).logits
    assert 0 < (quantized - reference).abs().max() < reference.abs().max()  # quantized, still the same model
    save_gptq_model(model, tmp_path / "gptq", overwrite=True)
    loaded = load_gptq_model(tmp_path / "gptq")
    assert torch.equal(loaded(ids).logits, quantized)


def test_readme_architectures_table_is_the_support_table():
    assert support_table() in (ROOT / "README.md").read_text(encoding="utf-8")


# --- refusals: one line, exit 2, nothing written ------------------------------------------------------------


def _encoder(folder: Path, model_type: str) -> Path:
    from transformers import AutoConfig, AutoModel

    from adalora_deploy.demo import byte_tokenizer

    config = AutoConfig.for_model(model_type, vocab_size=259, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128, pad_token_id=258)
    AutoModel.from_config(config).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def _unknown(folder: Path, model_type: str) -> Path:
    from adalora_deploy.demo import byte_tokenizer

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 259}))
    byte_tokenizer().save_pretrained(folder)
    return folder


def _missing_head(folder: Path, _model_type: str) -> Path:
    """A Llama folder whose checkpoint lacks lm_head.weight (transformers would initialise it at random)."""
    from safetensors.torch import load_file, save_file

    from adalora_deploy.demo import write_tiny_llama

    write_tiny_llama(folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _tiny_llama(folder: Path, _model_type: str) -> Path:
    from adalora_deploy.demo import write_tiny_llama

    write_tiny_llama(folder)
    return folder


def _encoder_missing_layer(folder: Path, model_type: str) -> Path:
    """A BERT folder whose checkpoint lacks an encoder weight (only the head may be missing)."""
    from safetensors.torch import load_file, save_file

    _encoder(folder, model_type)
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if k.endswith("encoder.layer.0.attention.self.query.weight"))
    del tensors[key]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


CLS = "classification"
REFUSALS = [
    # (id, folder builder, model_type, task, command, message)
    ("bert-train", _encoder, "bert", None, "train", r"BERT encoder .*sequence classification only; set task: classif"),
    ("bert-quantize", _encoder, "bert", None, "quantize", r"BERT encoder .*set task: classification"),
    ("roberta-train", _encoder, "roberta", None, "train", r"RoBERTa encoder .*task: classification \(supported causal "
                                                           r"language models: .*Llama"),
    ("deberta-v2-train", _encoder, "deberta-v2", None, "train", r"DeBERTa-v2 encoder .*set task: classification"),
    ("deberta-v2-run", _encoder, "deberta-v2", None, "run", r"DeBERTa-v2 encoder .*set task: classification"),
    ("distilbert-classification-train", _encoder, "distilbert", CLS, "train",
     r"DistilBERT encoder .*not supported for task: classification; supported encoders: BERT, RoBERTa, DeBERTa-v2"),
    ("distilbert-classification-run", _encoder, "distilbert", CLS, "run", r"DistilBERT encoder .*not supported"),
    ("llama-classification-train", _tiny_llama, "llama", CLS, "train",
     r"Llama causal language model .*task: classification needs an encoder: BERT, RoBERTa, DeBERTa-v2"),
    ("llama-classification-run", _tiny_llama, "llama", CLS, "run", r"Llama causal language model .*needs an encoder"),
    ("unknown-classification-run", _unknown, "bloom", CLS, "run", r"model_type 'bloom', which is not supported for "
                                                                  r"task: classification"),
    ("unknown-train", _unknown, "bloom", None, "train", r"model_type 'bloom', which is not supported; supported .*GPT-NeoX"),
    ("unknown-quantize", _unknown, "bloom", None, "quantize", r"model_type 'bloom', which is not supported"),
    ("missing-weights-train", _missing_head, "llama", None, "train", r"lacks lm_head.weight; transformers would initialise"),
    ("encoder-missing-weights-train", _encoder_missing_layer, "bert", CLS, "train",
     r"lacks .*encoder.layer.0.attention.self.query.weight; transformers would initialise"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[case[0] for case in REFUSALS])
def test_refused_before_any_work(case, tmp_path, capsys):
    _, build, model_type, task, command, message = case
    model = build(tmp_path / "model", model_type)
    capsys.readouterr()  # the folder writer's own progress output
    out = tmp_path / "out"
    if command == "quantize":
        argv = ["quantize", str(model), "--method", "rtn", "--output", str(out)]
    else:
        config = {"model": {"path": str(model)},
                  "adapter": {"init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 1},
                  "train": {"data": "builtin:sample", "steps": 4, "batch_size": 2, "seq_len": 32}}
        if task is not None:
            from tests.encoders import write_labelled

            config["task"] = task
            config["train"].pop("data")
            config["data"] = {"train": str(write_labelled(tmp_path / "data.jsonl", 16)), "eval_size": 4}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        argv = [command, str(tmp_path / "c.yaml"), "--output", str(out)]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"adalora-deploy {command}: error: "), err
    assert re.search(message, err), err
    assert not out.exists()


def test_unsupported_architecture_error_is_a_user_error():
    from adalora_deploy.errors import UserError

    with pytest.raises(UnsupportedArchitectureError) as raised:
        architecture_for(None)
    assert isinstance(raised.value, UserError)
