"""Crash safety: SIGKILL ``train``, ``quantize``, ``export`` and ``run`` at random moments (seeded).

After every kill: the artifacts that existed before are intact, every artifact that exists is complete
(no half-written file passes for a finished one), and ``train --resume`` / a rerun of ``run`` end with
exactly the adapter of an uninterrupted run. Each command is first timed uninterrupted; kill moments are
drawn uniformly over that duration (process start-up included), so kills land in every phase.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TRIALS = 10
SEED = 20261130


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "adalora_deploy.cli", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _timed(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    result = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-2000:]
    return time.perf_counter() - started


def _kill_at(argv: list[str], cwd: Path, seconds: float) -> int | None:
    """Start ``argv``, SIGKILL it after ``seconds`` (None when it finished first); returns its status."""
    process = subprocess.Popen(argv, cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
        return None


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _same_adapter(a: Path, b: Path) -> bool:
    first, second = _tensors(a), _tensors(b)
    same_config = json.loads((a / "adapter_config.json").read_text())["rank_pattern"] == \
        json.loads((b / "adapter_config.json").read_text())["rank_pattern"]
    return same_config and first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def _no_half_files(folder: Path) -> None:
    """Every artifact file under ``folder`` is finished: no temporary leftovers outside hidden temp names are
    readable as artifacts, and every adapter, checkpoint and manifest that exists loads."""
    from adalora_deploy.artifacts import load_tensors, read_json

    for path in folder.rglob("*"):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue  # hidden temporary names: never read as artifacts
        if path.name.endswith(".safetensors"):
            load_tensors(path)
        elif path.suffix == ".json":
            read_json(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from adalora_deploy.demo import write_tiny_llama

    root = tmp_path_factory.mktemp("crash")
    model = write_tiny_llama(root / "model")
    config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    config["model"]["path"] = str(model)
    config["train"].update(steps=30, checkpoint_every=3, eval_every=0)
    config["adapter"].update(tinit=4, tfinal=4)
    config["export"] = [{"name": "merged", "mode": "merged"}]
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    return {"root": root, "model": model, "config": root / "run.yaml"}


def test_train_killed_at_random_moments_resumes_to_the_uninterrupted_adapter(tiny, tmp_path):
    reference = tmp_path / "reference"
    duration = _timed(_cli("train", str(tiny["config"]), "--output", str(reference)), tmp_path)
    rng = random.Random(SEED)
    for trial in range(TRIALS):
        out = tmp_path / f"trial{trial}"
        status = _kill_at(_cli("train", str(tiny["config"]), "--output", str(out)), tmp_path, rng.uniform(0.1, 1.0) * duration)
        if out.exists():
            _no_half_files(out)
        resume = ["--resume"] if (out / "checkpoint" / "state.json").is_file() else []
        if not resume and out.exists():  # killed before the first checkpoint: nothing to resume, start again
            assert not (out / "adapter").exists()
            subprocess.run(["rm", "-rf", str(out)], check=True)
        if status is None or resume:
            _timed(_cli("train", str(tiny["config"]), "--output", str(out), *resume), tmp_path)
        assert _same_adapter(out / "adapter", reference / "adapter"), f"trial {trial}"


def test_quantize_killed_leaves_the_earlier_checkpoint_intact_or_a_complete_new_one(tiny, tmp_path):
    from adalora_deploy.gptq.checkpoint import load_gptq_model

    argv = _cli("quantize", str(tiny["model"]), "--method", "gptq", "--group-size", "32", "--calibration",
                "builtin:sample", "--samples", "8", "--seq-len", "32", "--output", str(tmp_path / "gptq"), "--overwrite")
    duration = _timed(argv, tmp_path)
    earlier = {p.name: p.read_bytes() for p in (tmp_path / "gptq").iterdir()}
    rng = random.Random(SEED + 1)
    for _ in range(TRIALS):
        _kill_at(argv, tmp_path, rng.uniform(0.1, 1.0) * duration)
        folder = tmp_path / "gptq"
        from adalora_deploy.artifacts import recover

        recover(folder)  # what the next write does first: a swap killed between its renames is undone
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == earlier  # same settings: same bytes
        load_gptq_model(folder)


def test_export_killed_leaves_the_earlier_export_intact(tiny, tmp_path):
    from adalora_deploy.export.build.manifest import read_manifest, verify_files

    from adalora_deploy.artifacts import recover

    adapter = tmp_path / "run"
    _timed(_cli("train", str(tiny["config"]), "--output", str(adapter)), tmp_path)
    argv = _cli("export", "--base", str(tiny["model"]), "--adapter", str(adapter / "adapter"), "--mode", "merged",
                "--output", str(tmp_path / "export"), "--overwrite")
    duration = _timed(argv, tmp_path)
    rng = random.Random(SEED + 2)
    for _ in range(TRIALS):
        _kill_at(argv, tmp_path, rng.uniform(0.1, 1.0) * duration)
        folder = recover(tmp_path / "export")
        verify_files(read_manifest(folder))  # the earlier export or a complete new one, never a mix


def test_run_killed_at_random_moments_reruns_to_the_uninterrupted_adapter(tiny, tmp_path):
    reference = tmp_path / "reference"
    duration = _timed(_cli("run", str(tiny["config"]), "--output", str(reference)), tmp_path)
    rng = random.Random(SEED + 3)
    for trial in range(TRIALS):
        out = tmp_path / f"trial{trial}"
        _kill_at(_cli("run", str(tiny["config"]), "--output", str(out)), tmp_path, rng.uniform(0.1, 1.0) * duration)
        if out.exists():
            _no_half_files(out)
        _timed(_cli("run", str(tiny["config"]), "--output", str(out)), tmp_path)
        assert _same_adapter(out / "train" / "adapter", reference / "train" / "adapter"), f"trial {trial}"
        report = json.loads((out / "report" / "report.json").read_text())
        assert report["checks"]["merged"]["passed"]
