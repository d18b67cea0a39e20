"""AdaLoRA training on every base kind: same config, only model.quantization changes."""

from __future__ import annotations

import pytest
import torch

from adalora_deploy import AdaLoraConfig, inject_adapters
from adalora_deploy.config import ModelConfig
from adalora_deploy.data import BlockBatches, token_blocks
from adalora_deploy.demo import SAMPLE_TEXT
from adalora_deploy.models import load_base_model, load_tokenizer
from adalora_deploy.training import AdaLoraController, make_optimizer

STEPS = 16


def _train(model, tokenizer, config: AdaLoraConfig) -> tuple[list[float], object]:
    torch.manual_seed(0)
    adapters = inject_adapters(model, config)
    controller = AdaLoraController(adapters, config)
    optimizer = make_optimizer(adapters, lr=1e-2)
    batches = BlockBatches(token_blocks(SAMPLE_TEXT, tokenizer, 32), 4, seed=0)
    model.train()
    losses = []
    for step in range(config.total_step):
        batch = batches.batch(step)
        loss = model(input_ids=batch, labels=batch).loss
        (loss + controller.regularizer()).backward()
        optimizer.step()
        controller.after_optimizer_step(step, optimizer)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, adapters


@pytest.fixture(scope="module")
def gptq_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    """The tiny Llama quantized with our GPTQ solver: 2, 4 and 8 bits (group 32), and 4-bit act-order."""
    from transformers import AutoModelForCausalLM

    from adalora_deploy.gptq.checkpoint import save_gptq_model
    from adalora_deploy.gptq.driver import quantize_model

    calibration = token_blocks(SAMPLE_TEXT, load_tokenizer(str(tiny_model_dir)), 32)[:16]
    folders = {}
    for name, bits, desc_act in (("gptq-2", 2, False), ("gptq-4", 4, False), ("gptq-4-act", 4, True), ("gptq-8", 8, False)):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        quantize_model(model, calibration, method="gptq", bits=bits, group_size=32, desc_act=desc_act)
        folder = tmp_path_factory.mktemp(name)
        save_gptq_model(model, folder, tokenizer_source=tiny_model_dir, overwrite=True)
        folders[name] = str(folder)
    return folders


def _base_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize(("quantization", "double_quant"), [
    ("none", False), ("bnb-nf4", False), ("bnb-nf4", True), ("bnb-fp4", False), ("bnb-fp4", True), ("bnb-int8", False),
])
def test_training_lowers_loss_and_keeps_base(tiny_model_dir, quantization, double_quant):
    _check_training(str(tiny_model_dir), quantization, double_quant, tiny_model_dir)


@pytest.mark.parametrize("name", ["gptq-2", "gptq-4", "gptq-4-act", "gptq-8"])
def test_training_on_gptq_bases(gptq_dirs, tiny_model_dir, name):
    _check_training(gptq_dirs[name], "gptq", False, tiny_model_dir)


def _check_training(path: str, quantization: str, double_quant: bool, tokenizer_dir) -> None:
    config = AdaLoraConfig(total_step=STEPS, init_r=6, target_r=2, tinit=2, tfinal=3, lora_alpha=16,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], orth_reg_weight=0.1)
    model = load_base_model(ModelConfig(path=path, quantization=quantization, double_quant=double_quant, device="cpu"))
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"none": "Linear", "bnb-int8": "Linear8bitLt", "gptq": "QuantLinear"}.get(quantization, "Linear4bit") in kinds
    before = _base_state(model)
    losses, adapters = _train(model, load_tokenizer(str(tokenizer_dir)), config)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    after = {k.replace(".base_layer", ""): v for k, v in _base_state(model).items()}
    assert before.keys() <= after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "base weights changed during training"
    assert sum(adapters.live_ranks().values()) == len(adapters) * config.target_r
    kind = next(iter(adapters.values())).backend.describe(next(iter(adapters.values())).base_layer)
    expected = {"none": "dense", "bnb-int8": "bnb-int8", "gptq": "gptq"}.get(quantization, f"bnb-{quantization[4:]}")
    assert kind.startswith(expected) and kind.endswith("-dq") == double_quant


@pytest.mark.parametrize("name", ["gptq-4", "gptq-4-act"])
def test_int8_down_projection_computes_the_8_bit_product_and_trains(gptq_dirs, tiny_model_dir, name):
    """``adapter.down_weights: int8``: the branch's down product is the base's int8 activation codes times ``Λ Q``
    on the 8-bit grid (in the exported channel order with act-order), gradients reach P, Λ and Q straight
    through, and training still lowers the loss."""
    from adalora_deploy import functional as F
    from adalora_deploy.gptq.int8_compute import fake_quantize_activations, fake_quantize_weights

    model = load_base_model(ModelConfig(path=gptq_dirs[name], quantization="gptq", device="cpu", activations="int8"))
    config = AdaLoraConfig(total_step=STEPS, init_r=6, target_r=2, tinit=2, tfinal=3, lora_alpha=16,
                           target_modules=["q_proj", "o_proj"], orth_reg_weight=0.1, down_weights="int8")
    losses, adapters = _train(model, load_tokenizer(str(tiny_model_dir)), config)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    layer = next(layer for layer in adapters.values() if layer.live_rank > 0)
    block, perm = layer.down_layout()
    assert block == 32 and (perm is not None) == name.endswith("-act")
    x = torch.randn(2, 5, layer.in_features) * 3
    codes = fake_quantize_activations(x, block, perm)
    down = codes @ fake_quantize_weights(layer.lora_A * layer.lora_E, block, perm).T
    expected = layer.base_layer(x) + (down @ layer.lora_B.T) * layer.scale
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    fp32_down = layer.base_layer(x) + F.adapter_output(x, layer.lora_A, layer.lora_E, layer.lora_B, layer.scale)
    assert (layer(x) - fp32_down).abs().max() > 1e-4  # the 8-bit grid is visible in the output
    layer.zero_grad()
    layer(x.requires_grad_()).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.lora_A, layer.lora_E, layer.lora_B))
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_int8_down_projection_needs_int8_activations(gptq_dirs):
    from adalora_deploy.errors import ConfigError

    model = load_base_model(ModelConfig(path=gptq_dirs["gptq-4"], quantization="gptq", device="cpu"))
    config = AdaLoraConfig(total_step=STEPS, init_r=6, target_r=2, lora_alpha=16, target_modules=["q_proj"],
                           down_weights="int8")
    with pytest.raises(ConfigError, match="does not compute with int8 activations"):
        inject_adapters(model, config)
