"""Merging: ``dequant(W0) + ΔW`` as a plain float model gives the masked model's logits; re-quantization
error is reported; the ``merge`` CLI writes a folder or nothing."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from adalora_deploy.adapters import find_adapters, inject_adapters
from adalora_deploy.backends import backend_for
from adalora_deploy.cli import main
from adalora_deploy.config import ModelConfig
from adalora_deploy.demo import tiny_llama
from adalora_deploy.errors import AdapterMismatchError
from adalora_deploy.merge import (
    MergeReport,
    merge_adapter,
    merge_into_dense,
    save_merged_model,
)
from adalora_deploy.metrics import row_metrics, sqnr_db
from adalora_deploy.models import load_base_model
from adalora_deploy.peft_format import load_adapter, save_adapter
from tests.conftest import random_tokens
from tests.test_compaction import (
    EDGE_MASKS,
    FP32_PARITY_ATOL,
    MIN_ADAPTER_EFFECT,
    adalora_config,
    gptq_model_dir,  # noqa: F401  (a fixture)
    logits,
    set_random_masked,
    tiny_gpt2,
)

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

REQUANT_MIN_WEIGHT_SQNR_DB = 15.0
"""4-bit symmetric, group 32, of the merged tiny Llama (adapters at REQUANT_ADAPTER_STRENGTH), 16
calibration blocks of the sample text. Measured worst layer 20.17 dB (RTN) and 16.32 dB (GPTQ, which
minimizes the output error, not the weight error); 4-bit uniform quantization of Gaussian weights
gives ~20 dB."""

REQUANT_MIN_LOGITS_COSINE = 0.95
"""Same setting, lowest per-token cosine of re-quantized vs merged float logits on 4 blocks. Measured
0.977 (RTN, max abs 0.105) and 0.994 (GPTQ, max abs 0.054)."""

REQUANT_ADAPTER_STRENGTH = 0.1
"""Λ scale for the re-quantization test: ΔW of about W0's size, as after training (the parity tests use
1.0, where ΔW is ~10x W0 and 4-bit re-quantization of a low-rank-dominated weight is poor)."""


def _masked_adapter(model_dir: Path, quantization: str, folder: Path,
                    strength: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inject random masked adapters into the base, save them; returns (masked logits, base logits).

    The masked model runs in train mode: bnb's Linear8bitLt casts its input to fp16 in eval mode on
    CPU but computes ``x @ dequant(W).T`` in fp32 in train mode, which is what the merged float weight
    reproduces (eval vs train differ by 6.8e-3 there; for the other bases the modes agree exactly, and
    dropout is 0)."""
    ids = random_tokens()
    model = load_base_model(ModelConfig(path=str(model_dir), quantization=quantization, device="cpu")).train()
    base = logits(model, ids)
    config = adalora_config()
    adapters = inject_adapters(model, config)
    set_random_masked(adapters, masks=EDGE_MASKS, strength=strength)
    save_adapter(adapters, config, folder, base_model_name_or_path=str(model_dir))
    return logits(model, ids), base


@pytest.mark.parametrize("quantization", ["none", "bnb-nf4", "bnb-int8", "gptq"])
def test_merged_model_matches_masked_model(tiny_model_dir, gptq_model_dir, tmp_path, quantization):
    model_dir = gptq_model_dir if quantization == "gptq" else tiny_model_dir
    reference, base = _masked_adapter(model_dir, quantization, tmp_path / "adapter")
    assert (reference - base).abs().max() > MIN_ADAPTER_EFFECT
    report = merge_adapter(model_dir, tmp_path / "adapter", tmp_path / "merged", quantization=quantization)
    assert isinstance(report, MergeReport) and report.requantization is None
    merged_ranks = {row.name: row.rank for row in report.layers if row.rank}
    assert len(merged_ranks) == 5 and all(rank > 0 for rank in merged_ranks.values())  # 6 adapters, one pruned
    if quantization != "none":  # every quantized linear was dequantized: 2 layers x 7 linears
        assert len(report.layers) == 14
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    names = {path.name for path in (tmp_path / "merged").iterdir()}
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(name.endswith((".bin", ".pt", ".tmp")) for name in names)
    merged = load_base_model(ModelConfig(path=str(tmp_path / "merged"), device="cpu"))
    assert all(backend_for(m).kind == "dense" for m in merged.modules() if isinstance(m, torch.nn.Linear))
    assert (logits(merged, random_tokens()) - reference).abs().max() <= FP32_PARITY_ATOL


def test_merge_into_dense_leaves_no_adapter_or_quantized_layer(tiny_model_dir):
    model = load_base_model(ModelConfig(path=str(tiny_model_dir), quantization="bnb-nf4", device="cpu")).train()
    adapters = inject_adapters(model, adalora_config())
    set_random_masked(adapters)
    reference = logits(model, random_tokens())
    rows = merge_into_dense(model)
    assert not find_adapters(model)
    assert not any(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
    assert {row.base_kind for row in rows} == {"bnb-nf4"}
    assert (logits(model, random_tokens()) - reference).abs().max() <= FP32_PARITY_ATOL


def test_gpt2_conv1d_merge_transposes_delta(tmp_path):
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    ids = random_tokens()
    model = tiny_gpt2()
    base = logits(model, ids)
    adapters = inject_adapters(model, adalora_config(["c_attn", "c_fc"]))
    set_random_masked(adapters)
    reference = logits(model, ids)
    assert (reference - base).abs().max() > MIN_ADAPTER_EFFECT
    rows = merge_into_dense(model)
    assert {row.base_kind for row in rows} == {"dense-conv1d"}
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    save_merged_model(model, tmp_path / "merged")
    merged = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged, ids) - reference).abs().max() <= FP32_PARITY_ATOL


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_requantized_merge_reports_its_error(tiny_model_dir, tmp_path, method):
    reference, base = _masked_adapter(tiny_model_dir, "none", tmp_path / "adapter", strength=REQUANT_ADAPTER_STRENGTH)
    assert (reference - base).abs().max() > MIN_ADAPTER_EFFECT
    report = merge_adapter(tiny_model_dir, tmp_path / "adapter", tmp_path / "merged", requantize=method, bits=4,
                           group_size=32, calibration_samples=16)
    requant = report.requantization
    assert requant is not None and len(requant.layers) == 14
    assert math.isfinite(requant.worst_sqnr_db) and requant.worst_sqnr_db >= REQUANT_MIN_WEIGHT_SQNR_DB
    assert 0 < requant.logits_max_abs and requant.logits_cosine >= REQUANT_MIN_LOGITS_COSINE
    assert "re-quantized" in report.format_table()
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4
    reloaded = load_base_model(ModelConfig(path=str(tmp_path / "merged"), quantization="gptq", device="cpu"))
    assert backend_for(reloaded.model.layers[0].self_attn.q_proj).kind == "gptq"


def test_error_metrics():
    weight = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    assert sqnr_db(weight, weight) == math.inf
    assert sqnr_db(weight, weight * 1.1) == pytest.approx(20.0, abs=1e-5)  # noise = 0.1 |W|, fp32 product
    metrics = row_metrics(weight, -weight, logits=True)
    assert metrics.max_abs == pytest.approx(float(2 * weight.abs().max())) and metrics.cosine_min == pytest.approx(-1.0)


def test_cli_merge_writes_model_and_rejects_adapter_for_another_base(tiny_model_dir, tmp_path, capsys):
    reference, _ = _masked_adapter(tiny_model_dir, "none", tmp_path / "adapter")
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(tmp_path / "adapter"),
                 "--output", str(tmp_path / "merged")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "0/6" in out and "wrote" in out
    merged = load_base_model(ModelConfig(path=str(tmp_path / "merged"), device="cpu"))
    assert (logits(merged, random_tokens()) - reference).abs().max() <= FP32_PARITY_ATOL

    # An adapter trained on GPT-2 applied to the Llama: exit 2, one line, no output folder left.
    gpt2 = tiny_gpt2()
    config = adalora_config(["c_attn"])
    adapters = inject_adapters(gpt2, config)
    save_adapter(adapters, config, tmp_path / "gpt2-adapter")
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", str(tmp_path / "gpt2-adapter"),
                 "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "another base" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]

    # A Llama of another width with the same module names: caught on shapes.
    other = tmp_path / "narrow"
    tiny_llama(0, hidden_size=32, intermediate_size=64).save_pretrained(other)
    model = load_base_model(ModelConfig(path=str(other), device="cpu"))
    with pytest.raises(AdapterMismatchError, match="does not fit"):
        load_adapter(model, tmp_path / "adapter")
    assert main(["merge", "--base", str(other), "--adapter", str(tmp_path / "adapter"),
                 "--output", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_merge_loads_the_base_as_the_run_record_says_and_refuses_a_contradiction(tiny_model_dir, tmp_path, capsys):
    """An adapter trained on bnb-nf4 must not be folded silently into dense weights it never saw."""
    reference, base = _masked_adapter(tiny_model_dir, "bnb-nf4", tmp_path / "run" / "adapter")
    assert (reference - base).abs().max() > MIN_ADAPTER_EFFECT
    (tmp_path / "run" / "run.json").write_text(json.dumps({"model": {"quantization": "bnb-nf4",
                                                                      "double_quant": False}}))
    adapter = str(tmp_path / "run" / "adapter")
    assert main(["merge", "--base", str(tiny_model_dir), "--adapter", adapter, "--quantization", "none",
                 "--output", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "trained on a bnb-nf4 base" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "refused").exists()
    # default (auto) reads the record: the merged float model computes what the nf4 model + adapter computed
    report = merge_adapter(tiny_model_dir, adapter, tmp_path / "merged")
    assert report.base_quantization == "bnb-nf4"
    merged = load_base_model(ModelConfig(path=str(tmp_path / "merged"), device="cpu"))
    assert (logits(merged, random_tokens()) - reference).abs().max() <= FP32_PARITY_ATOL
    # --force accepts the contradiction knowingly
    forced = merge_adapter(tiny_model_dir, adapter, tmp_path / "forced", quantization="none", force=True)
    assert forced.base_quantization == "none"
