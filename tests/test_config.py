"""Every validation rule of the configs, PEFT's names and defaults, YAML loading and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from adalora_deploy.config import (
    AdaLoraConfig,
    ConfigError,
    ModelConfig,
    TrainConfig,
    apply_overrides,
    load_run_config,
    parse_run_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_peft_defaults():
    config = AdaLoraConfig(total_step=100)
    assert (config.init_r, config.target_r, config.tinit, config.tfinal, config.deltaT) == (12, 8, 0, 0, 1)
    assert (config.beta1, config.beta2, config.orth_reg_weight, config.lora_alpha, config.lora_dropout) == (
        0.85, 0.85, 0.5, 8, 0.0)
    assert config.schedule == "cubic" and config.regularizer == "peft"


def test_total_step_is_required():
    with pytest.raises(TypeError):
        AdaLoraConfig()


@pytest.mark.parametrize(("kwargs", "field", "rule"), [
    ({"total_step": 0}, "total_step", "> 0"),
    ({"total_step": -3}, "total_step", "> 0"),
    ({"total_step": 10, "tinit": 8, "tfinal": 2}, "tinit", "budgeting phase"),
    ({"total_step": 10, "tinit": -1}, "tinit", ">= 0"),
    ({"total_step": 10, "tfinal": -1}, "tfinal", ">= 0"),
    ({"total_step": 10, "deltaT": 0}, "deltaT", ">= 1"),
    ({"total_step": 10, "target_r": 12}, "target_r", "target_r < init_r"),
    ({"total_step": 10, "target_r": 13}, "target_r", "target_r < init_r"),
    ({"total_step": 10, "target_r": 0}, "target_r", "0 < target_r"),
    ({"total_step": 10, "init_r": 0, "target_r": 0}, "init_r", ">= 1"),
    ({"total_step": 10, "beta1": 1.0}, "beta1", "[0, 1)"),
    ({"total_step": 10, "beta2": -0.1}, "beta2", "[0, 1)"),
    ({"total_step": 10, "orth_reg_weight": -0.5}, "orth_reg_weight", ">= 0"),
    ({"total_step": 10, "lora_alpha": -1}, "lora_alpha", ">= 0"),
    ({"total_step": 10, "lora_dropout": 1.0}, "lora_dropout", "[0, 1)"),
    ({"total_step": 10, "target_modules": []}, "target_modules", "non-empty"),
    ({"total_step": 10, "target_modules": "q_proj("}, "target_modules", "regex"),
    ({"total_step": 10, "schedule": "cosine"}, "schedule", "one of"),
    ({"total_step": 10, "regularizer": "l1"}, "regularizer", "one of"),
    ({"total_step": 2.5}, "total_step", "integer"),
])
def test_adalora_rules(kwargs, field, rule):
    with pytest.raises(ConfigError) as error:
        AdaLoraConfig(**kwargs)
    message = str(error.value)
    assert f"adapter.{field}" in message and rule in message


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"path": ""}, "path"),
    ({"path": "m", "quantization": "int3"}, "quantization"),
    ({"path": "m", "dtype": "float64"}, "dtype"),
    ({"path": "m", "device": "tpu"}, "device"),
    ({"path": "m", "int8_threshold": -1.0}, "int8_threshold"),
])
def test_model_rules(kwargs, field):
    with pytest.raises(ConfigError, match=f"model.{field}"):
        ModelConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"steps": 0}, "steps"), ({"batch_size": 0}, "batch_size"), ({"seq_len": 0}, "seq_len"),
    ({"grad_accum": 0}, "grad_accum"), ({"lr": 0}, "lr"), ({"checkpoint_every": -1}, "checkpoint_every"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
])
def test_train_rules(kwargs, field):
    with pytest.raises(ConfigError, match=f"train.{field}"):
        TrainConfig(**({"data": "x.txt", "steps": 5} | kwargs))


def _raw(tmp_path):
    return {"model": {"path": str(tmp_path)}, "adapter": {"target_modules": ["q_proj"], "target_r": 4},
            "train": {"data": "d.txt", "steps": 20}}


def test_unknown_keys_suggest_the_nearest(tmp_path):
    for section, key, suggestion in [("adapter", "target_rank", "target_r"), ("train", "batchsize", "batch_size"),
                                     ("model", "quantisation", "quantization"), ("adapter", "delta_t", "deltaT")]:
        raw = _raw(tmp_path)
        raw[section][key] = 1
        with pytest.raises(ConfigError, match=f"did you mean {section}.{suggestion}"):
            parse_run_config(raw)
    raw = _raw(tmp_path) | {"adaptor": {}}
    with pytest.raises(ConfigError, match="did you mean adapter"):
        parse_run_config(raw)


def test_missing_section_and_key(tmp_path):
    raw = _raw(tmp_path)
    del raw["train"]
    with pytest.raises(ConfigError, match="train: required section"):
        parse_run_config(raw)
    raw = _raw(tmp_path)
    del raw["train"]["steps"]
    with pytest.raises(ConfigError, match="train.steps: required key"):
        parse_run_config(raw)


def test_total_step_is_train_steps(tmp_path):
    run = parse_run_config(_raw(tmp_path))
    assert run.adapter.total_step == 20
    raw = _raw(tmp_path)
    raw["adapter"]["total_step"] = 30
    with pytest.raises(ConfigError, match="differs from train.steps"):
        parse_run_config(raw)


def test_int8_down_weights_need_int8_activations(tmp_path):
    raw = _raw(tmp_path)
    raw["adapter"]["down_weights"] = "int8"
    with pytest.raises(ConfigError, match="down_weights = 'int8': multiplies on the base's int8 activation codes"):
        parse_run_config(raw)
    raw["model"].update(quantization="gptq", activations="int8")
    assert parse_run_config(raw).adapter.down_weights == "int8"
    raw["adapter"]["down_weights"] = "int4"
    with pytest.raises(ConfigError, match="adapter.down_weights = 'int4': must be one of 'fp32', 'int8'"):
        parse_run_config(raw)


def test_overrides_and_relative_paths(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path) | {"train": {"data": "d.txt", "steps": 20}}))
    run = load_run_config(path, ["train.steps=40", "adapter.target_modules=[q_proj, v_proj]", "train.lr=1e-3"])
    assert run.train.steps == 40 and run.adapter.total_step == 40
    assert run.adapter.target_modules == ["q_proj", "v_proj"] and run.train.lr == 1e-3
    assert run.train.data == str(tmp_path / "d.txt")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        apply_overrides({}, ["steps=3"])
    with pytest.raises(ConfigError, match="did you mean train"):
        apply_overrides({}, ["trian.steps=3"])


def test_malformed_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(scalar)


def test_peft_adapter_config_round_trip():
    config = AdaLoraConfig(total_step=20, init_r=6, target_r=2, target_modules=["q_proj", "v_proj"])
    data = config.to_peft_dict({"a.lora_E": [True] * 6})
    back, pattern = AdaLoraConfig.from_peft_dict(data)
    assert back == config and pattern == {"a.lora_E": [True] * 6}
    with pytest.raises(ConfigError, match="ADALORA"):
        AdaLoraConfig.from_peft_dict(data | {"peft_type": "LORA"})


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    run = load_run_config(path)
    assert run.adapter.total_step == run.train.steps


def test_task_lm_eval_lists_task_files_relative_to_the_config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path) | {"train": {"data": "d.txt", "steps": 20},
                                                     "task": {"lm_eval": ["tasks/sentiment.yaml"]}}))
    assert load_run_config(path).task.lm_eval == [str(tmp_path / "tasks" / "sentiment.yaml")]
    assert load_run_config(tmp_path / "run.yaml", ["task.lm_eval=null"]).task.lm_eval is None  # the default: off
    for bad in ("tasks/sentiment.yaml", [], ["sentiment"]):
        with pytest.raises(ConfigError, match="task.lm_eval"):
            load_run_config(path, [f"task.lm_eval={bad!r}" if isinstance(bad, str) else f"task.lm_eval={bad}"])
