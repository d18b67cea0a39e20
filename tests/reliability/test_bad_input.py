"""Bad input, end to end: each case gives one clear message naming what is wrong and how to fix it, a
non-zero exit, and no partial or corrupted artifact.

Every row of :data:`CASES` sets up one mistake a user makes, runs the command line on it, and checks the
exit status (2), that stderr is one ``adalora-deploy <command>: error:`` message matching the row's pattern
(what is wrong, and the fix), and that the row's output path was not created (or was left as it was).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from adalora_deploy.cli import main

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Case:
    """One mistake: ``setup(ws, tmp)`` returns the argv; ``message`` is a regex the error must match."""

    id: str
    setup: Callable[["Workspace", Path], list[str]]
    message: str
    output: str | None = "out"
    """Path (under tmp) that must not exist afterwards, or None."""
    patch: Callable[[pytest.MonkeyPatch], None] | None = field(default=None)


@dataclass
class Workspace:
    root: Path
    model: Path
    other_model: Path
    adapter: Path
    gptq: Path
    export: Path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    from adalora_deploy.cli import main as cli
    from adalora_deploy.demo import write_tiny_llama

    root = tmp_path_factory.mktemp("bad-input")
    model = write_tiny_llama(root / "model")
    other = write_tiny_llama(root / "other", hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=64)
    config = _config(model)
    config["train"].update(steps=8, checkpoint_every=0)
    config["adapter"].update(tinit=1, tfinal=2)
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    assert cli(["train", str(root / "run.yaml"), "--output", str(root / "run")]) == 0
    assert cli(["quantize", str(model), "--method", "rtn", "--group-size", "32", "--calibration", "builtin:sample",
                "--samples", "4", "--seq-len", "32", "--output", str(root / "gptq")]) == 0
    assert cli(["export", "--base", str(model), "--adapter", str(root / "run" / "adapter"), "--mode", "merged",
                "--output", str(root / "export")]) == 0
    return Workspace(root=root, model=model, other_model=other, adapter=root / "run" / "adapter", gptq=root / "gptq",
                     export=root / "export")


def _config(model_path: Path, **sections) -> dict:
    config = {"model": {"path": str(model_path)},
              "adapter": {"target_modules": ["q_proj", "v_proj"], "init_r": 6, "target_r": 2, "tinit": 2, "tfinal": 2,
                          "lora_alpha": 16},
              "train": {"data": "builtin:sample", "steps": 10, "batch_size": 2, "seq_len": 32, "lr": 1e-2}}
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def _yaml(tmp: Path, config: dict | str, name: str = "c.yaml") -> str:
    path = tmp / name
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return str(path)


def _train(tmp: Path, config: dict | str) -> list[str]:
    return ["train", _yaml(tmp, config), "--output", str(tmp / "out")]


def _data_file(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return str(path)


def _data_case(name: str, content: str | bytes, **data) -> Callable:
    def setup(ws: Workspace, tmp: Path) -> list[str]:
        path = _data_file(tmp, name, content)
        config = _config(ws.model)
        config["train"].pop("data")
        config["data"] = {"train": path, **data}
        return _train(tmp, config)
    return setup


def _copy_adapter(ws: Workspace, tmp: Path) -> Path:
    target = tmp / "adapter"
    shutil.copytree(ws.adapter, target)
    return target


def _edit_adapter_config(edit: Callable[[dict], None]) -> Callable:
    def setup(ws: Workspace, tmp: Path) -> list[str]:
        adapter = _copy_adapter(ws, tmp)
        config = json.loads((adapter / "adapter_config.json").read_text())
        edit(config)
        (adapter / "adapter_config.json").write_text(json.dumps(config))
        return ["compact", str(adapter), "--output", str(tmp / "out")]
    return setup


def _truncated_adapter(ws: Workspace, tmp: Path) -> list[str]:
    path = _copy_adapter(ws, tmp) / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    return ["compact", str(tmp / "adapter"), "--output", str(tmp / "out")]


def _broken_adapter_config(ws: Workspace, tmp: Path) -> list[str]:
    (_copy_adapter(ws, tmp) / "adapter_config.json").write_text("{not json")
    return ["compact", str(tmp / "adapter"), "--output", str(tmp / "out")]


def _tamper_export(change: Callable[[Path], None]) -> Callable:
    def setup(ws: Workspace, tmp: Path) -> list[str]:
        export = tmp / "export"
        shutil.copytree(ws.export, export)
        change(export)
        return ["check", str(export)]
    return setup


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _gptq_case(change: Callable[[Path], None]) -> Callable:
    def setup(ws: Workspace, tmp: Path) -> list[str]:
        folder = tmp / "gptq"
        shutil.copytree(ws.gptq, folder)
        change(folder)
        config = _config(folder, model={"quantization": "gptq"})
        return _train(tmp, config)
    return setup


def _gptq_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
    return change


def _gptq_tensor(folder: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.qweight"))
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, folder / "model.safetensors")


def _read_only_output(ws: Workspace, tmp: Path) -> list[str]:
    return ["compact", str(ws.adapter), "--output", str(tmp / "locked" / "out")]


def _read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only folder, as the kernel reports it (root would ignore a chmod, so the refusal is simulated)."""
    import tempfile

    real = tempfile.mkdtemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).name == "locked":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)


def _disk_full(monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)


def _mismatched_base(ws: Workspace, tmp: Path) -> list[str]:
    return ["merge", "--base", str(ws.other_model), "--adapter", str(ws.adapter), "--output", str(tmp / "out")]


def _renamed_modules(ws: Workspace, tmp: Path) -> list[str]:
    from safetensors.torch import load_file, save_file

    adapter = _copy_adapter(ws, tmp)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors = {k.replace("self_attn", "attention"): v for k, v in tensors.items()}
    save_file(tensors, adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["rank_pattern"] = {k.replace("self_attn", "attention"): v for k, v in config["rank_pattern"].items()}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return ["export", "--base", str(ws.model), "--adapter", str(adapter), "--mode", "merged", "--output", str(tmp / "out")]


def _pickled_adapter(ws: Workspace, tmp: Path) -> list[str]:
    adapter = _copy_adapter(ws, tmp)
    os.remove(adapter / "adapter_model.safetensors")
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04\x95\x00\x00")  # a pickle header; never opened
    return ["compact", str(adapter), "--output", str(tmp / "out")]


def _resume_other_config(ws: Workspace, tmp: Path) -> list[str]:
    shutil.copytree(ws.root / "run", tmp / "out-run")
    config = yaml.safe_load((ws.root / "run.yaml").read_text())
    config["train"]["lr"] = 0.5
    return ["train", _yaml(tmp, config), "--output", str(tmp / "out-run"), "--resume"]


CASES = [
    # configs
    Case("yaml-syntax", lambda ws, tmp: _train(tmp, "model: {path: x\nadapter: ["), r"not valid YAML"),
    Case("yaml-not-mapping", lambda ws, tmp: _train(tmp, "- a\n- b\n"), r"must be a YAML mapping"),
    Case("missing-config", lambda ws, tmp: ["train", str(tmp / "nope.yaml"), "--output", str(tmp / "out")],
         r"config file not found"),
    Case("unknown-section", lambda ws, tmp: _train(tmp, _config(ws.model) | {"trian": {}}), r"did you mean train"),
    Case("unknown-key", lambda ws, tmp: _train(tmp, _config(ws.model, train={"stpes": 3})), r"did you mean train.steps"),
    Case("missing-section", lambda ws, tmp: _train(tmp, {k: v for k, v in _config(ws.model).items() if k != "adapter"}),
         r"adapter: required section is missing"),
    Case("target-r-not-below-init-r", lambda ws, tmp: _train(tmp, _config(ws.model, adapter={"target_r": 6})),
         r"target_r.*must satisfy 0 < target_r < init_r.*pick a target rank"),
    Case("no-budgeting-phase", lambda ws, tmp: _train(tmp, _config(ws.model, adapter={"tinit": 8, "tfinal": 2})),
         r"tinit must be < total_step - tfinal.*lower tinit or tfinal"),
    Case("total-step-contradicts-steps", lambda ws, tmp: _train(tmp, _config(ws.model, adapter={"total_step": 99})),
         r"differs from train.steps"),
    Case("two-data-sources", lambda ws, tmp: _train(tmp, _config(ws.model) | {"data": {"train": "builtin:sample"}}),
         r"train.data and the data section both"),
    Case("bad-override", lambda ws, tmp: [*_train(tmp, _config(ws.model)), "--set", "steps=3"],
         r"expected section.key=value"),
    Case("model-folder-missing", lambda ws, tmp: _train(tmp, _config(tmp / "no-model")), r"no config.json"),
    Case("targets-match-nothing", lambda ws, tmp: _train(tmp, _config(ws.model, adapter={"target_modules": ["qkv"]})),
         r"matches no module of the model; its linear layers are named"),
    Case("unsupported-layer", lambda ws, tmp: _train(tmp, _config(ws.model, adapter={"target_modules": ["embed_tokens"]})),
         r"cannot adapt a torch.nn.modules.sparse.Embedding.*supported base layers"),
    # data
    Case("data-missing", lambda ws, tmp: _train(tmp, _config(ws.model, train={"data": str(tmp / "none.jsonl")})),
         r"data file not found"),
    Case("data-suffix", _data_case("x.xml", "<a/>"), r"must end in .txt, .jsonl, .csv, .parquet"),
    Case("data-bad-json", _data_case("x.jsonl", '{"text": "a"}\n{oops\n'), r"x.jsonl:2: not valid JSON"),
    Case("data-non-utf8", _data_case("x.txt", "caf\xe9 ".encode("latin-1") * 50), r"not UTF-8 text.*re-encode"),
    Case("data-empty", _data_case("x.jsonl", ""), r"no records \(the file is empty\)"),
    Case("data-too-small", _data_case("x.txt", "tiny"), r"fewer than one block of seq_len=32"),
    Case("data-no-usable-fields", _data_case("x.jsonl", '{"question": "q"}\n'),
         r"expected text, prompt \+ completion, or messages \(or set data.prompt"),
    Case("data-completions-cut-off", _data_case("x.jsonl", json.dumps({"prompt": "p", "completion": "z" * 80}) + "\n"),
         r"no example fits in train.seq_len = 32 tokens with its completion whole.*raise train.seq_len"),
    Case("data-template-field", _data_case("x.csv", "text,label\na,1\n", prompt="{review}", completion="{label}"),
         r"uses the field 'review', which the record lacks"),
    # files: adapters, checkpoints, GPTQ folders, exports
    Case("adapter-truncated-safetensors", lambda ws, tmp: _truncated_adapter(ws, tmp),
         r"adapter_model.safetensors is not a readable safetensors file"),
    Case("adapter-config-not-json", lambda ws, tmp: _broken_adapter_config(ws, tmp), r"is not valid JSON"),
    Case("adapter-not-adalora", _edit_adapter_config(lambda c: c.update(peft_type="LORA")), r"expected 'ADALORA'"),
    Case("rank-pattern-contradicts-tensors",
         _edit_adapter_config(lambda c: c["rank_pattern"].update(
             {k: [True] * len(v) for k, v in list(c["rank_pattern"].items())[:1]})),
         r"has rank \d+, its rank_pattern keeps 6 of 6"),
    Case("pickled-adapter-refused", _pickled_adapter,
         r"adapter_model.bin, a pickle.*safetensors only.*can run code.*re-save it"),
    Case("adapter-for-other-shapes", _mismatched_base, r"does not fit this model at .*expected"),
    Case("adapter-for-other-modules", _renamed_modules, r"trained for another base: module .*attention.* is not in"),
    Case("gptq-bad-bits", _gptq_case(_gptq_config(lambda c: c["quantization_config"].update(bits=5))),
         r"bits must be one of \(2, 3, 4, 8\), got 5"),
    Case("gptq-not-gptq", _gptq_case(_gptq_config(lambda c: c.pop("quantization_config"))),
         r"no 'quantization_config' entry; this is not a GPTQ checkpoint"),
    Case("gptq-inconsistent-shapes", _gptq_case(_gptq_tensor), r"q_proj.qweight' has shape .* expects"),
    Case("export-tampered-graph", _tamper_export(lambda e: _flip_byte(e / "model.onnx", 200)),
         r"model.onnx differs from the file export.json describes.*export again", output=None),
    Case("export-missing-file", _tamper_export(lambda e: os.remove(e / "config.json")),
         r"config.json is missing \(export.json lists it\)", output=None),
    Case("export-no-manifest", _tamper_export(lambda e: os.remove(e / "export.json")), r"missing file: .*export.json",
         output=None),
    Case("export-bad-options", lambda ws, tmp: ["export", "--base", str(ws.model), "--adapter", str(ws.adapter),
                                               "--mode", "merged", "--serving", "--output", str(tmp / "out")],
         r"--serving applies to --mode separate; for a fast merged graph use --weights int4"),
    Case("merge-contradicts-run-record", lambda ws, tmp: ["merge", "--base", str(ws.model), "--adapter", str(ws.adapter),
                                                         "--quantization", "bnb-nf4", "--output", str(tmp / "out")],
         r"trained on a none base .*add --force"),
    Case("resume-other-config", _resume_other_config, r"written by a different run config", output=None),
    Case("read-only-output", _read_only_output, r"cannot write .*: Permission denied; the folder is not writable",
         output="locked/out", patch=_read_only),
    Case("disk-full", lambda ws, tmp: ["compact", str(ws.adapter), "--output", str(tmp / "out")],
         r"cannot write .*No space left on device; the disk is full", patch=_disk_full),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case: Case, ws: Workspace, tmp_path: Path, capsys, monkeypatch):
    argv = case.setup(ws, tmp_path)
    if case.patch is not None:
        case.patch(monkeypatch)
    before = _snapshot(ws.root)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert lines and lines[0].startswith(f"adalora-deploy {argv[0]}: error: "), err
    assert "Traceback" not in err
    assert re.search(case.message, err, re.DOTALL), err
    if case.output:
        assert not (tmp_path / case.output).exists(), f"{case.output} was created"
    leftovers = [p.name for p in tmp_path.rglob("*.tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    assert _snapshot(ws.root) == before, "an existing artifact was changed"


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "parity.json" not in p.name}


def test_there_are_at_least_thirty_cases():
    assert len(CASES) >= 30
