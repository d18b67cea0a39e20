"""``export_model`` + ``check_export`` end to end on a trained tiny Llama: manifest, ranks, parity, CLI."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from adalora_deploy.export.api import export_model
from adalora_deploy.export.judge.agreement import held_out_batch
from adalora_deploy.export.judge.check import ADAPTER_EFFECT_MIN, check_export
from adalora_deploy.export.build.manifest import read_manifest, sha256_file
from adalora_deploy.export.contract import FUSED_LINEARS, MANIFEST_FILE, PARITY_FILE
from adalora_deploy.export.build.source import load_source_model

from adalora_deploy.cli import main

BRANCH_BYTES_PER_RANK = 4
"""fp32 bytes per factor entry: a rank-r branch on a [out, in] linear stores r * (in + out) of them."""


def _assert_exact(report):
    assert report.adapter_effect > ADAPTER_EFFECT_MIN  # the adapter matters first, so parity means something
    assert report.passed, report.failures
    for name in ("source", "twin"):  # the trained model (the verdict) and the graph's own arithmetic
        report_ = report[name].report
        assert report_.tier == "exact"
        assert all(o.max_abs <= o.tolerance for o in report_.outputs)
        assert report_.tokens_equal  # KV-cache decoding == transformers greedy, batch 2, left padded


@pytest.fixture(scope="module")
def separate_dense(export_workspace, tmp_path_factory):
    ws = export_workspace
    out = tmp_path_factory.mktemp("exports") / "separate-none"
    manifest = export_model(ws.model, ws.adapter, output=out, mode="separate", quantization="none")
    return out, manifest


QUANTIZED_NODES = 8
"""Quantized matmul nodes of the tiny Llama's fast-path graph: 2 layers x (fused q/k/v, o, fused gate/up, down);
the branches of adapted modules are added beside the fused base (after its Split, or one per group before it), so
every base stays quantized."""


def test_separate_graph_holds_exactly_the_surviving_ranks(separate_dense):
    out, manifest = separate_dense
    ranks = manifest.ranks
    assert 0 in ranks.values() and any(r > 0 for r in ranks.values()), ranks  # the adapter has rank-0 modules
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    factors = {i.name: tuple(i.dims) for i in proto.graph.initializer if i.name.endswith((".lora_A", ".lora_B"))}
    covered: dict[str, int] = {}
    expected = 0
    for name, dims in factors.items():
        if not name.endswith(".lora_A"):
            continue
        path = name.removesuffix(".lora_A")
        parent, _, leaf = path.rpartition(".")
        members = [f"{parent}.{m}" for m in FUSED_LINEARS[leaf]] if leaf in FUSED_LINEARS else [path]
        rank = sum(ranks.get(m, 0) for m in members)
        assert dims[1] == rank > 0, (name, dims, {m: ranks.get(m, 0) for m in members})  # exactly the surviving ranks
        outputs = sum(_linear_shape(m)[1] for m in members)
        assert factors[f"{path}.lora_B"] == (rank, outputs)
        expected += BRANCH_BYTES_PER_RANK * rank * (_linear_shape(members[0])[0] + outputs)
        covered.update({m: ranks.get(m, 0) for m in members})
    assert {m for m, r in ranks.items() if r > 0} <= set(covered)  # every live module has a branch in the graph
    assert manifest.adapter_matmuls == 2 * sum(1 for name in factors if name.endswith(".lora_A"))
    stored = sum(4 * int(np.prod(dims)) for dims in factors.values())  # fp32 factors, wherever they are stored
    assert stored == expected


def _linear_shape(name: str) -> tuple[int, int]:
    """(in, out) of the tiny Llama's adapted linears (hidden 64, 2 kv heads of 16, MLP 128)."""
    return (128, 64) if name.endswith("down_proj") else (64, 64) if name.endswith("q_proj") else (64, 32)


def test_manifest_records_everything(separate_dense, export_workspace):
    out, manifest = separate_dense
    assert read_manifest(out) == manifest
    data = json.loads((out / MANIFEST_FILE).read_text())
    assert data["mode"] == "separate" and data["quantization"] == "none" and data["tier"] == "exact"
    assert {"torch", "transformers", "onnx", "onnxruntime", "adalora_deploy"} <= set(data["versions"])
    assert data["adapter_path"] == str(export_workspace.adapter.resolve())
    assert {"model.onnx", "config.json", "tokenizer.json"} <= set(manifest.files)
    for name, digest in manifest.files.items():
        assert sha256_file(out / name) == digest
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_separate_dense_check_passes_exact(separate_dense):
    out, _ = separate_dense
    report = check_export(out, max_new_tokens=8)
    _assert_exact(report)
    assert report["source"].report.tier == "exact" and report["source"].report.tokens_equal
    written = json.loads((out / PARITY_FILE).read_text())
    assert written["passed"] and [c["name"] for c in written["comparisons"]] == ["source", "twin"]


def test_check_batch_is_left_padded(separate_dense, export_workspace):
    out, _ = separate_dense
    model = load_source_model(export_workspace.model, export_workspace.adapter, quantization="none")
    ids, mask = held_out_batch(out, model.config)
    assert ids.shape[0] == 2 and mask[1, 0] == 0 and mask[:, -1].all()


def test_check_refuses_an_adapter_that_changes_nothing(separate_dense, export_workspace, capsys):
    out, _ = separate_dense
    code = main(["check", str(out), "--adapter", str(export_workspace.zero_adapter)])
    assert code == 2
    assert "prove nothing" in capsys.readouterr().err


def test_check_of_a_mismatched_adapter_fails_with_exit_1(separate_dense, export_workspace, capsys):
    out, _ = separate_dense
    code = main(["check", str(out), "--adapter", str(export_workspace.adapter2), "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED" in captured.out and "source" in captured.out
    assert not json.loads((out / PARITY_FILE).read_text())["passed"]


def test_merged_dense_fp32_is_exact_and_has_no_branch(export_workspace, tmp_path):
    manifest = export_model(export_workspace.model, export_workspace.adapter, output=tmp_path / "merged",
                            mode="merged", weights="fp32", quantization="auto")
    assert manifest.quantization == "none" and manifest.adapter_matmuls == 0 and not manifest.quantized_ops
    _assert_exact(check_export(tmp_path / "merged", max_new_tokens=8))


@pytest.mark.parametrize("argv, message", [
    (["--mode", "separate", "--weights", "int4"], "applies to --mode merged"),
    (["--mode", "merged", "--adapter-inputs"], "needs --mode separate"),
    (["--mode", "merged", "--serving"], "applies to --mode separate"),
])
def test_bad_option_combinations_exit_2(export_workspace, tmp_path, capsys, argv, message):
    code = main(["export", "--base", str(export_workspace.model), "--adapter", str(export_workspace.adapter),
                 "--output", str(tmp_path / "out"), *argv])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_gptq_act_order_separate(export_workspace, tmp_path, capsys):
    base = export_workspace.gptq_base(act_order=True)
    out = tmp_path / "gptq-act"
    assert main(["export", "--base", str(base), "--adapter", str(export_workspace.adapter), "--mode", "separate",
                 "--output", str(out)]) == 0
    manifest = read_manifest(out)
    assert manifest.quantization == "gptq" and manifest.base_kind == "gptq-4bit-g32-act"
    assert manifest.quantized_ops == {"com.microsoft::MatMulNBits": QUANTIZED_NODES}  # none dequantized
    assert manifest.op_counts["Gather"] > 1  # act-order: K permuted by a Gather in front of each MatMulNBits
    assert main(["check", str(out), "--max-new-tokens", "8"]) == 0
    table = capsys.readouterr().out
    assert "PASSED" in table
    parity = json.loads((out / PARITY_FILE).read_text())
    graph, source = parity["comparisons"]
    assert graph["tier"] == "exact" and graph["tokens_equal"]
    # QuantLinear computes with the exact fp32 product s·(q - z), as MatMulNBits does: exact against it too
    assert source["tier"] == "exact" and source["passed"] and source["tokens_equal"]


def test_nf4_separate_uses_matmulbnb4_and_is_exact(export_workspace, tmp_path):
    out = tmp_path / "nf4"
    manifest = export_model(export_workspace.model, export_workspace.adapter, output=out, mode="separate",
                            quantization="bnb-nf4", double_quant=True, force=True)  # float-trained adapter
    assert manifest.base_kind == "bnb-nf4-dq" and manifest.quantized_ops == {"com.microsoft::MatMulBnb4": QUANTIZED_NODES}
    report = check_export(out, max_new_tokens=8)
    _assert_exact(report)
    assert report["source"].report.tier == "exact"
