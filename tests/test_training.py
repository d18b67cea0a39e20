"""Training: the transformers.Trainer integration (with gradient accumulation) and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import TrainingArguments

from adalora_deploy import AdaLoraConfig, AdaLoraTrainer, inject_adapters
from adalora_deploy.cli import main
from adalora_deploy.demo import tiny_llama
from adalora_deploy.regularizer import orthogonal_regularizer
from adalora_deploy.training import AdaLoraCallback, AdaLoraController, TrainingError
from tests.conftest import random_tokens, run_config


class _Blocks(torch.utils.data.Dataset):
    def __init__(self, count: int):
        self.tokens = random_tokens(batch=count, length=16, seed=3)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


def _args(tmp_path, **kwargs):
    return TrainingArguments(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no",
                             logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0, **kwargs)


def _config(**kwargs):
    return AdaLoraConfig(**({"total_step": 10, "init_r": 6, "target_r": 2, "tinit": 1, "tfinal": 2,
                             "target_modules": ["q_proj", "v_proj"]} | kwargs))


def test_trainer_runs_real_adalora_with_gradient_accumulation(tmp_path):
    config = _config()
    model = tiny_llama()
    adapters = inject_adapters(model, config)
    trainer = AdaLoraTrainer(model=model, adalora_config=config, args=_args(tmp_path), train_dataset=_Blocks(40))
    trainer.train()
    history = trainer.adalora_callback.history
    assert [h.step for h in history] == list(range(10))  # optimizer steps, not the 20 micro-batches
    assert [h.budget for h in history] == [trainer.adalora.allocator.budget(t) for t in range(10)]
    assert history[config.total_step - config.tfinal].final
    assert sum(adapters.live_ranks().values()) == 4 * config.target_r
    assert any(float(layer.lora_E.detach().abs().max()) > 0 for layer in adapters.values())


def test_trainer_regularizer_is_added_once_per_optimizer_step(tmp_path):
    config = _config(orth_reg_weight=0.5)
    model = tiny_llama()
    adapters = inject_adapters(model, config)
    trainer = AdaLoraTrainer(model=model, adalora_config=config, args=_args(tmp_path), train_dataset=_Blocks(8))
    trainer.current_gradient_accumulation_steps = 2
    batch = _Blocks(2)[0]
    inputs = {k: v.unsqueeze(0) for k, v in batch.items()}
    regularizer = 0.5 * orthogonal_regularizer(adapters).item()
    plain = super(AdaLoraTrainer, trainer).compute_loss(model, inputs, num_items_in_batch=torch.tensor(15)).item()
    ours = trainer.compute_loss(model, inputs, num_items_in_batch=torch.tensor(15)).item()
    # Llama normalizes by num_items_in_batch, so Trainer does not divide by the accumulation steps: we do.
    assert ours == pytest.approx(plain + regularizer / 2, rel=1e-5)
    plain = super(AdaLoraTrainer, trainer).compute_loss(model, inputs).item()
    assert trainer.compute_loss(model, inputs).item() == pytest.approx(plain + regularizer, rel=1e-5)


def test_plain_trainer_without_regularizer_fails_loudly(tmp_path):
    from transformers import Trainer

    config = _config()
    model = tiny_llama()
    adapters = inject_adapters(model, config)
    callback = AdaLoraCallback(AdaLoraController(adapters, config))
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_Blocks(40), callbacks=[callback])
    with pytest.raises(TrainingError, match="regularizer was not applied"):
        trainer.train()


def test_trainer_step_count_must_match_total_step(tmp_path):
    from adalora_deploy import ConfigError

    config = _config(total_step=12)
    model = tiny_llama()
    inject_adapters(model, config)
    trainer = AdaLoraTrainer(model=model, adalora_config=config, args=_args(tmp_path), train_dataset=_Blocks(40))
    with pytest.raises(ConfigError, match="max_steps=total_step"):
        trainer.train()


def _write_config(tmp_path, model_dir, data, **sections):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(model_dir, data, **sections)))
    return path


def test_cli_train_writes_adapter_checkpoint_and_metrics(tiny_model_dir, sample_text, tmp_path, capsys):
    config = _write_config(tmp_path, tiny_model_dir, sample_text)
    out = tmp_path / "out"
    assert main(["train", str(config), "--output", str(out), "--set", "train.steps=8", "--set", "adapter.tfinal=1"]) == 0
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "checkpoint" / "state.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 8 and {"step", "loss", "budget"} <= set(records[0])
    assert "model.layers.0.self_attn.q_proj" in capsys.readouterr().out


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.batchsize=2"], "did you mean train.batch_size"),
    (["adapter.target_r=12"], "target_r < init_r"),
    (["train.data=/nonexistent.txt"], "data file not found"),
    (["model.path=/nonexistent"], "no config.json"),
    (["adapter.target_modules=[query]"], "matches no module"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tiny_model_dir, sample_text, tmp_path, capsys, overrides, message):
    config = _write_config(tmp_path, tiny_model_dir, sample_text)
    out = tmp_path / "out"
    args = ["train", str(config), "--output", str(out)]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]
    assert not (out / "adapter").exists()


def test_nan_loss_stops_with_a_clear_error(tiny_model_dir, sample_text, tmp_path, capsys):
    config = _write_config(tmp_path, tiny_model_dir, sample_text, train={"lr": 1.0e30, "steps": 6})
    assert main(["train", str(config), "--output", str(tmp_path / "out"), "--set", "adapter.tfinal=1"]) == 2
    assert "loss is nan" in capsys.readouterr().err.lower()
    assert not (tmp_path / "out" / "adapter").exists()
