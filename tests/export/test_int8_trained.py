"""Exports of a GPTQ base whose token table is quantized too (``quantize --tables``).

The base: a tiny tied Llama, GPTQ 4-bit group 32 with the lm_head (and so the tied embedding) quantized. An
adapter trained with fp32 activations exports exactly (accuracy_level 0, the table once as MatMulNBits +
GatherBlockQuantized blocks) and ``check`` holds it to the exact tier; the same graph with int8 activations
(accuracy_level 4) fails that tier. An adapter trained with ``model.activations: int8`` exports the fast graph
(accuracy_level 4 everywhere), held to the exact tier teacher-forced (export.judge.forced: both sides round the
same int8 codes; free-running, int8 rounding is not reproducible across implementations, tests/test_tables.py
measures why), and the same weights in blocks of another length fail it.
"""

from __future__ import annotations


import onnx
import pytest

from adalora_deploy.export.api import export_model
from adalora_deploy.export.judge.check import check_export

from .conftest import ADAPTED_MODULES
from .helpers import set_accuracy_level


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    from adalora_deploy.config import parse_run_config
    from adalora_deploy.data import token_blocks
    from adalora_deploy.demo import SAMPLE_TEXT, write_tiny_llama
    from adalora_deploy.gptq.checkpoint import save_gptq_model
    from adalora_deploy.gptq.driver import quantize_model
    from adalora_deploy.models import load_tokenizer
    from adalora_deploy.training import train
    from tests.conftest import run_config

    root = tmp_path_factory.mktemp("int8-trained")
    model_dir = write_tiny_llama(root / "model", tie_word_embeddings=True, vocab_size=264)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    blocks = token_blocks(str(SAMPLE_TEXT), load_tokenizer(str(model_dir)), 32)[:16]
    quantize_model(model, blocks, method="gptq", bits=4, group_size=32, tables=True)
    base = save_gptq_model(model, root / "base", tokenizer_source=model_dir)
    adapters = {}
    for name, activations, down in (("int8", "int8", "fp32"), ("fp32", "fp32", "fp32"), ("int8-down", "int8", "int8")):
        run = parse_run_config(run_config(
            base, SAMPLE_TEXT, model={"quantization": "gptq", "device": "cpu", "activations": activations},
            adapter={"target_modules": ADAPTED_MODULES + ["o_proj", "up_proj"], "lora_alpha": 32,
                     "down_weights": down},
            train={"lr": 2e-2}))
        adapters[name] = train(run, root / f"run-{name}", progress=False).adapter_dir
    return root, base, adapters


def _nodes(folder, op):
    return [n for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node if n.op_type == op]


def _accuracy_levels(folder) -> set[int]:
    return {a.i for n in _nodes(folder, "MatMulNBits") for a in n.attribute if a.name == "accuracy_level"}


def _separate(int8_run, adapter: str):
    """``--mode separate`` of one of the run's adapters: (folder, manifest)."""
    root, base, adapters = int8_run
    out = root / f"export-{adapter}"
    return out, export_model(base, adapters[adapter], output=out, mode="separate")


@pytest.fixture(scope="module")
def exact_export(int8_run):
    return _separate(int8_run, "fp32")


def test_a_quantized_table_exports_once_and_exactly(exact_export):
    out, manifest = exact_export
    assert _accuracy_levels(out) == {0} and manifest.source_tier == "exact"
    assert len(_nodes(out, "GatherBlockQuantized")) == 1  # the tied table, read from the lm_head's blocks
    names = {i.name for i in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.initializer}
    assert "model.embed_tokens.weight" not in names  # no fp32 table
    report = check_export(out, max_new_tokens=6)
    assert report.passed, report.failures
    assert report["source"].report.tier == "exact" and report["source"].report.tokens_equal


def test_int8_activations_in_the_exact_graph_fail_the_check(exact_export, tmp_path):
    import shutil

    out, _ = exact_export
    fast = tmp_path / "acc4"
    shutil.copytree(out, fast)
    set_accuracy_level(fast, 4)
    report = check_export(fast, max_new_tokens=6)
    assert not report.passed
    assert any("max abs" in failure for failure in report["source"].report.failures)


@pytest.fixture(scope="module")
def int8_export(int8_run):
    return _separate(int8_run, "int8")


def test_int8_trained_adapter_exports_the_fast_graph_exact_when_teacher_forced(int8_export):
    out, manifest = int8_export
    assert manifest.source_tier == "exact" and "accuracy_level 4" in manifest.arithmetic
    assert manifest.agreement["method"] == "teacher-forced" and manifest.agreement["passed"]
    assert _accuracy_levels(out) == {4}
    assert len(_nodes(out, "GatherBlockQuantized")) == 1
    report = check_export(out, max_new_tokens=6)
    assert report.passed, report.failures
    source = report["source"].report
    assert source.tier == "exact" and source.tokens_equal
    names = {o.name for o in source.outputs}
    # every quantized op's input is compared, on prefill rows (M > 1) and decode steps (M = 1), and the logits
    assert {"prefill/logits", "decode/logits", "prefill/lm_head", "decode/lm_head"} <= names
    assert {"prefill/model.layers.0.self_attn.qkv_proj", "decode/model.layers.1.mlp.down_proj",
            "prefill/model.layers.0.self_attn.o_proj.base"} <= names
    assert all(o.max_abs <= o.tolerance for o in source.outputs)
    assert report["free-running"].informational and report["twin"].report.tier == "exact"


def test_activation_blocks_of_another_length_fail_the_teacher_forced_check(int8_run, int8_export, tmp_path,
                                                                           monkeypatch):
    """The same weights in MatMulNBits blocks of 16 (the trained blocks are 32): activations rounded per 16
    values, another arithmetic, which the check must catch at the first op it feeds."""
    from adalora_deploy.export.build import modules

    root, base, adapters = int8_run
    monkeypatch.setattr(modules, "nbits_block_size", lambda group, k: 16)
    out = tmp_path / "blocks-16"
    export_model(base, adapters["int8"], output=out, mode="separate", measure_agreement=False)
    monkeypatch.undo()
    blocks = {a.i for n in _nodes(out, "MatMulNBits") for a in n.attribute if a.name == "block_size"}
    assert blocks == {16}
    report = check_export(out, max_new_tokens=6)
    assert not report.passed
    failures = report["source"].report.failures
    assert any("prefill/model.layers.0.self_attn.o_proj" in f and "teacher-forced" in f for f in failures), failures
    assert any(f.startswith("decode/") for f in failures)
    same = check_export(int8_export[0], max_new_tokens=6)  # the graph of the trained blocks, for contrast
    assert same.passed, same.failures


def _float_tables(folder) -> list[str]:
    """fp32 initializers shaped like the token table [vocab, hidden] (or its transpose)."""
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    shape = sorted([config["vocab_size"], config["hidden_size"]])
    return [init.name for init in onnx.load(str(folder / "model.onnx")).graph.initializer
            if init.data_type == onnx.TensorProto.FLOAT and sorted(init.dims) == shape]


def test_merged_int4_keeps_the_base_table_instead_of_a_float_one(int8_run, exact_export):
    """A merged int4 graph of a base with a quantized table holds that table (MatMulNBits for the logits,
    GatherBlockQuantized for the embedding, the very integers of the separate export), not two fp32 copies."""
    from onnx import numpy_helper

    root, base, adapters = int8_run
    out = root / "merged-int4"
    manifest = export_model(base, adapters["fp32"], output=out, mode="merged", weights="int4", requantize="rtn")
    assert "kept as trained" in manifest.arithmetic
    assert _float_tables(out) == []
    assert len(_nodes(out, "GatherBlockQuantized")) == 1
    separate, _ = exact_export
    qweight = {name: {i.name: numpy_helper.to_array(i) for i in onnx.load(str(folder / "model.onnx")).graph.initializer
                      if i.name == "lm_head.qweight"} for name, folder in (("merged", out), ("separate", separate))}
    assert (qweight["merged"]["lm_head.qweight"] == qweight["separate"]["lm_head.qweight"]).all()
    report = check_export(out, max_new_tokens=6)
    assert report["twin"].report.passed, report["twin"].report.failures  # the graph computes its own twin


def test_merged_fp32_of_a_quantized_table_holds_one_float_table(int8_run):
    root, base, adapters = int8_run
    out = root / "merged-fp32"
    export_model(base, adapters["fp32"], output=out, mode="merged")
    assert len(_float_tables(out)) == 1
    report = check_export(out, max_new_tokens=6)
    assert report.passed, report.failures
    assert report["source"].report.tier == "exact"


# --- adapter.down_weights: int8 (the down-projection on the 8-bit grid, an 8-bit MatMulNBits in the graph) ----


@pytest.fixture(scope="module")
def int8_down_export(int8_run):
    return _separate(int8_run, "int8-down")


def _down_nodes(folder):
    return [n for n in _nodes(folder, "MatMulNBits") if n.input[1].endswith(".lora_A.qweight")]


def test_int8_down_adapter_exports_8_bit_down_products_exact_when_teacher_forced(int8_run, int8_down_export):
    from adalora_deploy.models import load_trained_model

    root, base, adapters = int8_run
    out, manifest = int8_down_export
    downs = _down_nodes(out)
    attributes = [{a.name: a.i for a in n.attribute} for n in downs]
    # one down node per branch (q/k/v share one, the joint branch), each followed by its up product's Gemm
    assert len(downs) == len(_nodes(out, "Gemm")) >= 2 and manifest.adapter_matmuls == 2 * len(downs)
    assert all(a["bits"] == 8 and a["accuracy_level"] == 4 and a["block_size"] == 32 for a in attributes)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert not [i.name for i in graph.graph.initializer if i.name.endswith(".lora_A")]  # no fp32 down factor left
    assert "8-bit MatMulNBits" in manifest.arithmetic and manifest.source_tier == "exact"
    assert manifest.agreement["method"] == "teacher-forced" and manifest.agreement["passed"]
    from adalora_deploy.adapters import find_adapters

    layers = find_adapters(load_trained_model(base, adapters["int8-down"], quantization="gptq")).values()
    assert {layer.down_weights for layer in layers} == {"int8"}
    assert sum(float(layer.lora_E.abs().sum()) for layer in layers) > 0  # trained: the branches are not zero
    report = check_export(out, max_new_tokens=6)
    assert report.passed, report.failures
    source = report["source"].report
    assert source.tier == "exact" and source.tokens_equal and all(o.max_abs <= o.tolerance for o in source.outputs)


@pytest.mark.parametrize("change", ["fp32-down", "down-blocks-16"])
def test_a_down_product_computed_otherwise_fails_the_teacher_forced_check(int8_run, tmp_path, monkeypatch, change):
    """The same adapter with its down factor exported in fp32 (no 8-bit grid), or on 8-bit blocks of 16 (its
    activations rounded per 16 values, the base's per 32): another arithmetic, caught where the layer's output
    next enters a quantized op."""
    from adalora_deploy.export.build import convert

    root, base, adapters = int8_run
    if change == "fp32-down":
        monkeypatch.setattr(convert, "_int8_down", lambda layer, A: None)
    else:
        original = convert._int8_down
        monkeypatch.setattr(convert, "_int8_down", lambda layer, A: original(_Blocks16(layer), A))
    out = tmp_path / change
    export_model(base, adapters["int8-down"], output=out, mode="separate", measure_agreement=False)
    monkeypatch.undo()
    assert (len(_down_nodes(out)) == 0) == (change == "fp32-down")
    report = check_export(out, max_new_tokens=6)
    assert not report.passed
    assert any("teacher-forced" in f for f in report["source"].report.failures), report["source"].report.failures


class _Blocks16:
    """An adapted layer whose down product claims blocks of 16 (the base's are 32)."""

    def __init__(self, layer):
        self.layer = layer

    def down_layout(self):
        return 16, self.layer.down_layout()[1]


def test_int8_down_adapter_copied_without_its_run_record_still_loads_as_trained(int8_run, tmp_path):
    """An adapter folder copied away from its run.json: its 8-bit down-projections imply the int8 activations."""
    import shutil

    from adalora_deploy.adapters import find_adapters
    from adalora_deploy.models import load_trained_model

    root, base, adapters = int8_run
    copied = tmp_path / "adapter"
    shutil.copytree(adapters["int8-down"], copied)
    layers = find_adapters(load_trained_model(base, copied, quantization="gptq")).values()
    assert {layer.down_weights for layer in layers} == {"int8"}
    assert all(layer.base_layer.activation_block == 32 for layer in layers)


def test_int8_down_adapter_refuses_adapter_inputs(int8_run, tmp_path):
    from adalora_deploy.errors import ExportError

    root, base, adapters = int8_run
    with pytest.raises(ExportError, match="8-bit down-projection"):
        export_model(base, adapters["int8-down"], output=tmp_path / "inputs", mode="separate", adapter_inputs=True)
    assert not (tmp_path / "inputs").exists()
