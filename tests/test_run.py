"""The whole job (`adalora-deploy run`) end to end on a shortened embedded default, and its resumption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adalora_deploy.cli import main
from adalora_deploy.config import load_run_config
from adalora_deploy.job import STAGES, run_job
from adalora_deploy.job.report import PLOTS

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SHORT = ["train.steps=24", "adapter.tinit=4", "adapter.tfinal=4", "train.checkpoint_every=6", "train.eval_every=6"]


def _set(overrides: list[str]) -> list[str]:
    return [item for pair in (("--set", o) for o in overrides) for item in pair]


def test_run_does_every_stage_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", str(CONFIG), "--output", str(out), *_set(SHORT)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    job = json.loads((out / "job.json").read_text())
    assert set(job["stages"]) == set(STAGES)
    assert all(name in printed for name in STAGES)
    for folder in ("train/adapter", "adapter-adalora", "adapter-lora", "exports/merged", "exports/separate"):
        assert (out / folder).is_dir(), folder
    checks = job["stages"]["check"]["checks"]
    assert checks["merged"]["passed"] and checks["separate"]["passed"]
    # the graphs score what the trained model scores on the same held-out blocks
    trained = job["stages"]["evaluate-trained"]["loss"]
    assert trained < job["stages"]["evaluate-base"]["loss"]  # training helped on held-out text
    for name in ("merged", "separate"):
        assert job["stages"]["evaluate-exports"]["scores"][name]["loss"] == pytest.approx(trained, abs=1e-4)
    report = out / "report"
    assert {p.name for p in report.iterdir()} >= {"report.md", "report.json", *PLOTS}
    for plot in PLOTS:
        assert (report / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (report / plot).stat().st_size > 10_000
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval_loss" in m] == [5, 11, 17, 23]
    # a rerun has nothing left to do; --from redoes from a stage
    assert main(["run", str(CONFIG), "--output", str(out), *_set(SHORT)]) == 0
    assert "already done" in capsys.readouterr().out
    result = run_job(load_run_config(CONFIG, SHORT), out, from_stage="report")
    assert result.ran == ("report",)


def test_a_run_interrupted_in_training_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    run = load_run_config(CONFIG, SHORT)
    whole = run_job(run, tmp_path / "whole", until="train")
    import adalora_deploy.training as training

    original = training.save_training_checkpoint
    calls = {"n": 0}

    def crash_after_second_checkpoint(*args, **kwargs):
        original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # what SIGINT does mid-run; the checkpoint before it is complete

    monkeypatch.setattr(training, "save_training_checkpoint", crash_after_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run_job(run, tmp_path / "cut")
    monkeypatch.setattr(training, "save_training_checkpoint", original)
    assert json.loads((tmp_path / "cut" / "job.json").read_text())["stages"].keys() == {"prepare", "evaluate-base"}
    resumed = run_job(run, tmp_path / "cut", until="train")
    assert resumed.stages["train"]["resumed_from"] == 12
    from safetensors.torch import load_file

    first = load_file(Path(whole.stages["train"]["adapter"]) / "adapter_model.safetensors")
    second = load_file(Path(resumed.stages["train"]["adapter"]) / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_changed_config_is_not_mixed_into_an_existing_run(tmp_path):
    out = tmp_path / "run"
    run_job(load_run_config(CONFIG, SHORT), out, until="prepare")
    from adalora_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="holds a job of another config"):
        run_job(load_run_config(CONFIG, [*SHORT, "train.lr=0.02"]), out)


def test_report_rank_grid_reads_the_adapter_through_peft_format(tmp_path):
    """The ranks plot's grid: layer from the module name, modules in target_modules' order, rank = kept triplets."""
    from adalora_deploy.adapters import inject_adapters
    from adalora_deploy.demo import tiny_llama
    from adalora_deploy.job.report import _rank_grid
    from adalora_deploy.peft_format import save_adapter
    from tests.test_compaction import INIT_R, adalora_config, set_random_masked

    model = tiny_llama(0)
    config = adalora_config(["q_proj", "v_proj", "down_proj"])
    adapters = inject_adapters(model, config)
    set_random_masked(adapters, masks={0: [True, False] * (INIT_R // 2), 1: [True] * INIT_R})
    save_adapter(adapters, config, tmp_path / "adapter")
    layers, modules, ranks, init_r = _rank_grid(tmp_path / "adapter", ["q_proj", "v_proj", "down_proj"])
    expected = {(int(name.split(".")[2]), name.rsplit(".", 1)[1]): int(layer.rank_mask.sum())
                for name, layer in adapters.items() if layer.rank_mask.any()}
    assert init_r == INIT_R and modules == ["q_proj", "v_proj", "down_proj"]
    assert layers == sorted({layer for layer, _ in expected})
    assert ranks == expected and ranks[(0, "q_proj")] == INIT_R // 2 and ranks[(0, "v_proj")] == INIT_R


def test_an_int8_activation_job_ships_the_fast_graph_checked_teacher_forced(tmp_path):
    """``model.activations: int8`` (the default job's setting) on a GPTQ base: the separate graph runs MatMulNBits
    at accuracy_level 4, and the job's check holds it to the exact tier teacher-forced, the report says so."""
    import onnx

    out = tmp_path / "run"
    overrides = [*SHORT, "model.quantization=gptq", "model.activations=int8", "quantize.group_size=32"]
    assert main(["run", str(CONFIG), "--output", str(out), *_set(overrides)]) == 0
    job = json.loads((out / "job.json").read_text())
    check = job["stages"]["check"]["checks"]["separate"]
    assert check["passed"] and check["verdict"] == "teacher-forced" and check["source_tokens_equal"]
    assert 0 <= check["free_running_top1"] <= 1
    graph = onnx.load(str(out / "exports" / "separate" / "model.onnx"), load_external_data=False)
    levels = {a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {4}
    assert "PASS (teacher-forced" in (out / "report" / "report.md").read_text()


def test_report_counts_the_answers_a_graph_shares_with_the_trained_model():
    """Equal accuracies can hide answers that differ (int8 activations round each side its own way): the report
    counts them, and which side was right where they part; a job recorded without answers gets no count."""
    from adalora_deploy.job.report import answer_agreement

    trained = {"answers": [0, 1, 1, 0, 1], "labels": [0, 1, 0, 0, 1]}
    graph = {"answers": [0, 1, 0, 1, 1]}
    assert answer_agreement(trained, graph) == {"same": 3, "examples": 5, "only_graph_right": 1,
                                                "only_trained_right": 1, "p_value": 1.0}
    assert answer_agreement(trained, trained)["same"] == 5
    assert answer_agreement({"accuracy": 0.5}, graph) is None  # a job.json from before answers were kept
    assert answer_agreement({"answers": [0, 1]}, graph) is None
    assert answer_agreement({"answers": trained["answers"]}, graph) == {"same": 3, "examples": 5}


def test_mcnemar_exact_p_values():
    from adalora_deploy.job.report import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(2, 3) == 1.0 and mcnemar_exact(3, 2) == 1.0
    assert mcnemar_exact(5, 2) == pytest.approx(0.453125)  # 2 * (1 + 7 + 21) / 128
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64) and mcnemar_exact(9, 1) == pytest.approx(0.021484375)
