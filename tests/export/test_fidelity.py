"""``check`` judges a graph against the trained model: one weight moved by one step fails the exact tier, a
graph that changes decisions fails the lossy tier (with advice) even when it matches its own twin, and
merged int4 re-quantizes with GPTQ by default, its agreement with the source recorded in ``export.json``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from adalora_deploy.cli import main
from adalora_deploy.export.api import export_model
from adalora_deploy.export.judge.check import check_export
from adalora_deploy.export.build.manifest import sha256_file
from adalora_deploy.export.contract import MANIFEST_FILE
from adalora_deploy.export.judge.parity import LOSSY_MIN_TOP1


def _edit_initializers(folder, edit) -> None:
    """Rewrite ``folder/model.onnx`` with ``edit(name, array) -> array | None`` applied to every initializer,
    and its hash in the manifest: an export that computes something else, not a file tampered with after
    export (which ``check`` refuses before running it)."""
    path = folder / "model.onnx"
    model = onnx.load(str(path))
    for index, init in enumerate(model.graph.initializer):
        new = edit(init.name, numpy_helper.to_array(init))
        if new is not None:
            model.graph.initializer[index].CopyFrom(numpy_helper.from_array(new, init.name))
    onnx.save(model, str(path))
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["files"]["model.onnx"], manifest["sizes"]["model.onnx"] = sha256_file(path), path.stat().st_size
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def gptq_separate(export_workspace, tmp_path_factory):
    """An adapter trained on a 4-bit GPTQ base, exported exactly (MatMulNBits, accuracy_level 0)."""
    ws = export_workspace
    base = ws.gptq_base(act_order=False)
    adapter = ws.trained_on(base, "gptq")
    out = tmp_path_factory.mktemp("fidelity") / "gptq-separate"
    manifest = export_model(base, adapter, output=out, mode="separate")
    return out, manifest


def test_exact_graph_passes_and_records_its_agreement(gptq_separate):
    out, manifest = gptq_separate
    agreement = manifest.agreement
    assert agreement["tier"] == "exact" and agreement["passed"] and agreement["positions"] == 512
    assert agreement["top1"] == 1.0 and agreement["max_abs"] <= agreement["tolerance"]
    report = check_export(out, max_new_tokens=6)
    assert report.passed, report.failures
    assert report.positions == 512 and report["source"].report.tokens_equal


def test_one_weight_moved_by_one_quantization_step_fails_the_exact_tier(gptq_separate, tmp_path):
    out, _ = gptq_separate
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    initializers = {i.name: i for i in onnx.load(str(moved / "model.onnx")).graph.initializer}
    # layer 1's down_proj (".base." when it carries a branch): the last linear before the logits
    target = next(n for n in initializers if "layers.1." in n and "down_proj" in n and n.endswith("qweight"))
    scales = numpy_helper.to_array(initializers[target.replace("qweight", "scales")])
    row, block = np.unravel_index(np.argmax(scales), scales.shape)  # the block with the largest step

    def move_one_code(name, array):
        if name != target:
            return None
        array = array.copy()
        byte = int(array[row, block, 0])
        low = byte & 0x0F
        array[row, block, 0] = (byte & 0xF0) | (low + 1 if low < 15 else low - 1)  # one 4-bit code, one step
        return array

    _edit_initializers(moved, move_one_code)
    report = check_export(moved, max_new_tokens=6)
    assert not report.passed
    source = report["source"].report
    assert source.tier == "exact" and any("max abs" in f for f in source.failures)
    logits = source["logits"]
    assert logits.max_abs > logits.tolerance
    assert not report["twin"].passed  # the twin holds the trained integers too


@pytest.fixture(scope="module")
def merged_int4(export_workspace, tmp_path_factory):
    ws = export_workspace
    root = tmp_path_factory.mktemp("merged-int4")
    gptq = export_model(ws.model, ws.adapter, output=root / "gptq", mode="merged", weights="int4", calibration_samples=16)
    rtn = export_model(ws.model, ws.adapter, output=root / "rtn", mode="merged", weights="int4", requantize="rtn")
    return root, gptq, rtn


def test_merged_int4_requantizes_with_gptq_by_default(merged_int4):
    _, gptq, rtn = merged_int4
    assert gptq.requantization["method"] == "gptq" and gptq.requantization["calibration"] == "builtin:sample"
    assert rtn.requantization["method"] == "rtn"
    # every linear of the 2 layers in MatMulNBits (the fast path fuses q/k/v and gate/up: 4 ops a layer)
    assert gptq.quantized_ops == rtn.quantized_ops == {"com.microsoft::MatMulNBits": 8 if gptq.builder == "fast" else 14}
    for manifest in (gptq, rtn):
        assert manifest.source_tier == "lossy" and manifest.agreement["passed"]
        assert manifest.agreement["top1"] >= LOSSY_MIN_TOP1
    # error compensation measured, not assumed: GPTQ's next-token distribution is closer to the trained model's
    assert gptq.agreement["mean_kl"] < rtn.agreement["mean_kl"]


def test_lossy_graph_that_changes_decisions_fails_although_it_matches_its_twin(merged_int4, tmp_path, capsys):
    root, _, _ = merged_int4
    broken = tmp_path / "broken"
    shutil.copytree(root / "rtn", broken)
    rng = np.random.default_rng(0)

    def scramble_layer0(name, array):  # weights that no longer compute what was trained
        if "layers.0." in name and name.endswith("qweight"):
            return rng.integers(0, 256, array.shape, dtype=np.uint8)
        return None

    _edit_initializers(broken, scramble_layer0)
    code = main(["check", str(broken), "--max-new-tokens", "4"])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    written = json.loads((broken / "parity.json").read_text())
    comparisons = {c["name"]: c for c in written["comparisons"]}
    assert comparisons["twin"]["passed"]  # the graph computes its own (wrong) weights faithfully...
    assert not comparisons["source"]["passed"]  # ...but not what was trained: the verdict says so
    assert comparisons["source"]["summary"]["logits_top1"] < LOSSY_MIN_TOP1
    assert "top-1 agreement" in captured.out and "FAILED" in captured.out
    assert "--requantize gptq" in written["advice"] and "keep the trained model's decisions" in captured.out


def test_check_with_an_eval_file_reports_accuracy_and_perplexity(gptq_separate, tmp_path):
    out, _ = gptq_separate
    eval_file = tmp_path / "eval.jsonl"
    lines = [{"prompt": f"Question {i}: is the river {w}? ", "choices": ["yes", "no"], "label": i % 2}
             for i, w in enumerate(["high", "low", "cold", "clear", "brown", "wide"])]
    lines.append({"text": "The miller rowed across the river every morning before the baker opened."})
    eval_file.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    report = check_export(out, eval_file=eval_file, max_new_tokens=4)
    assert report.passed, report.failures
    evaluation = report["eval"].evaluation
    assert evaluation.answer_agreement == 1.0 and evaluation.candidate.accuracy == evaluation.reference.accuracy
    assert evaluation.candidate.perplexity == pytest.approx(evaluation.reference.perplexity, rel=1e-5)
    assert "accuracy" in report.format_table()


def test_export_cli_prints_the_agreement(export_workspace, tmp_path, capsys):
    ws = export_workspace
    code = main(["export", "--base", str(ws.model), "--adapter", str(ws.adapter), "--mode", "merged",
                 "--weights", "int4", "--requantize", "rtn", "--output", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    assert "agreement with the trained model on 512 held-out positions" in out and "lossy tier met" in out
    assert "re-quantized: rtn 4-bit, block 32" in out


@pytest.mark.parametrize("argv, message", [
    (["--mode", "separate", "--requantize", "gptq"], "--requantize applies to --mode merged"),
    (["--mode", "merged", "--weights", "int4", "--requantize", "rtn", "--calibration", "x.txt"],
     "--calibration* options apply"),
])
def test_requantization_options_need_merged_int_weights(export_workspace, tmp_path, capsys, argv, message):
    code = main(["export", "--base", str(export_workspace.model), "--adapter", str(export_workspace.adapter),
                 "--output", str(tmp_path / "out"), *argv])
    assert code == 2 and message in capsys.readouterr().err


def test_check_refuses_an_adapter_trained_on_another_base_kind(gptq_separate, export_workspace, capsys):
    out, _ = gptq_separate
    nf4_adapter = export_workspace.trained_on(export_workspace.model, "bnb-nf4")
    code = main(["check", str(out), "--adapter", str(nf4_adapter), "--base", str(export_workspace.model)])
    assert code == 2
    assert "trained on a bnb-nf4 base" in capsys.readouterr().err


def test_int4_requantization_without_enough_calibration_refuses(export_workspace, tmp_path, capsys):
    """The packaged sample gives 27 of the 32 default sequences: no graph is written that might miss its tier."""
    out = tmp_path / "out"
    code = main(["export", "--base", str(export_workspace.model), "--adapter", str(export_workspace.adapter),
                 "--mode", "merged", "--weights", "int4", "--output", str(out)])
    assert code == 2 and not out.exists()
    err = capsys.readouterr().err.strip()
    assert "27 of the 32 sequences" in err and "--requantize rtn" in err and len(err.splitlines()) == 1
