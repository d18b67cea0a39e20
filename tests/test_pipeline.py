"""The main job end to end, as the README runs it, on a shortened embedded default."""

from __future__ import annotations

import json
from pathlib import Path

from adalora_deploy.cli import main

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_pipeline_trains_compacts_exports_and_checks(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["pipeline", str(CONFIG), "--output", str(out), "--set", "train.steps=24",
                 "--set", "adapter.tinit=4", "--set", "adapter.tfinal=4"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    for folder in ("adapter", "adapter-adalora", "adapter-lora", "onnx-merged", "onnx-separate"):
        assert (out / folder).is_dir(), folder
    for mode in ("merged", "separate"):
        parity = json.loads((out / f"onnx-{mode}" / "parity.json").read_text())
        assert parity["passed"] and parity["adapter_effect"] > 1e-2
    assert printed.count("PASSED") == 2 and "all stages passed" in printed
