"""Compaction: sliced AdaLoRA and converted LoRA adapters give the masked model's outputs.

Every parity test first proves the adapter changes the logits, then compares. References are the
masked model (full init_r tensors, masked Λ = 0) as trained or as set up here.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from adalora_deploy.adapters import AdapterSet, find_adapters, inject_adapters
from adalora_deploy.artifacts import ArtifactError
from adalora_deploy.cli import main
from adalora_deploy.compaction import compact_adapter, from_adapters
from adalora_deploy.config import AdaLoraConfig, ModelConfig, parse_run_config
from adalora_deploy.demo import tiny_llama
from adalora_deploy.models import load_base_model
from adalora_deploy.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    load_adapter,
    read_compact_adapter,
    save_adapter,
)
from adalora_deploy.training import AdaLoraController, make_optimizer, train
from tests.conftest import random_tokens, run_config

peft = pytest.importorskip("peft")

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

FP32_PARITY_ATOL = 1e-5
"""Compacted / converted / merged vs masked logits, fp32. Only float reassociation differs (dropping
zero terms of the rank contraction; Λ folded into Q and scale into P for LoRA). Measured max 3.2e-7
(dense, nf4, int8 bases, adalora and lora formats) and 1e-6 for merged weights."""

MIN_ADAPTER_EFFECT = 1e-2
"""The adapters set up here move the tiny Llama's logits by 0.15 (PEFT-trained) to 0.9 (random
factors); anything below this means the parity test would pass with no adapter at all."""

IN_TRAINING_LOSS_ATOL = 1e-6
"""Masked vs compacted training, orth_reg_weight = 0: per-step loss difference. Measured 0.0 on CPU
(bit-identical); reassociation of the rank contraction could give ~1e-7."""

TARGETS = ["q_proj", "v_proj", "down_proj"]
INIT_R = 6


def adalora_config(targets: list[str] | str = TARGETS, **changes) -> AdaLoraConfig:
    """A small AdaLoRA config (init_r 6)."""
    values = {"total_step": 10, "init_r": INIT_R, "target_r": 3, "lora_alpha": 8, "target_modules": targets}
    values.update(changes)
    return AdaLoraConfig(**values)


def set_random_masked(adapters: AdapterSet, seed: int = 3, masks: dict[int, list[bool]] | None = None,
                      strength: float = 1.0) -> None:
    """Give every layer random non-zero P, Λ (times ``strength``), Q and a rank mask (random, or
    ``masks[layer index]``)."""
    generator = torch.Generator().manual_seed(seed)
    for index, layer in enumerate(adapters.values()):
        with torch.no_grad():
            layer.lora_E.copy_(torch.randn(layer.lora_E.shape, generator=generator) * strength)
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)
        keep = torch.rand(layer.init_r, generator=generator) > 0.5
        if masks and index in masks:
            keep = torch.tensor(masks[index])
        layer.apply_mask(keep)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def peft_logits(base: torch.nn.Module, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    return logits(model, ids)


def tensor_numel(folder: Path) -> dict[str, int]:
    from safetensors.torch import load_file

    return {key: value.numel() for key, value in load_file(str(folder / ADAPTER_WEIGHTS)).items()}


# Pruned layer 0 (q_proj of layer 0), everything kept in layer 1, random elsewhere.
EDGE_MASKS = {0: [False] * INIT_R, 1: [True] * INIT_R}


@pytest.fixture(scope="module")
def gptq_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama quantized with RTN 4-bit, group 32, saved as a GPTQ checkpoint."""
    from adalora_deploy.gptq.checkpoint import save_gptq_model
    from adalora_deploy.gptq.driver import quantize_model

    model = load_base_model(ModelConfig(path=str(tiny_model_dir), device="cpu"))
    quantize_model(model, random_tokens(batch=4, length=32), method="rtn", bits=4, group_size=32)
    return save_gptq_model(model, tmp_path_factory.mktemp("gptq") / "model", tokenizer_source=tiny_model_dir)


@pytest.mark.parametrize("quantization", ["none", "bnb-nf4", "bnb-int8", "gptq"])
def test_compacted_and_lora_match_masked_model(tiny_model_dir, gptq_model_dir, tmp_path, quantization):
    """PEFT loads both formats onto dense and bnb bases; it has no dispatcher for our GPTQ QuantLinear,
    so on the gptq base the compacted AdaLoRA folder is checked through our own loader only."""
    ids = random_tokens()
    model_dir = gptq_model_dir if quantization == "gptq" else tiny_model_dir
    model = load_base_model(ModelConfig(path=str(model_dir), quantization=quantization, device="cpu"))
    base = logits(model, ids)
    config = adalora_config()
    adapters = inject_adapters(model, config)
    set_random_masked(adapters, masks=EDGE_MASKS)
    reference = logits(model, ids)
    assert (reference - base).abs().max() > MIN_ADAPTER_EFFECT
    save_adapter(adapters, config, tmp_path / "masked", base_model_name_or_path=str(model_dir))

    ranks = adapters.live_ranks()
    pruned = next(name for name, rank in ranks.items() if rank == 0)
    for fmt in ("adalora", "lora"):
        report = compact_adapter(tmp_path / "masked", tmp_path / fmt, format=fmt)
        assert {layer.name: layer.rank for layer in report.layers} == ranks
        assert report.removed == (pruned,)
        # On disk: exactly the surviving ranks' parameters, nothing for the pruned module.
        numel = tensor_numel(tmp_path / fmt)
        assert sum(numel.values()) == report.params_after
        assert not any(pruned in key for key in numel)
        for layer in report.layers:
            per_rank = layer.shape[0] + layer.shape[1] + (1 if fmt == "adalora" else 0)
            assert layer.params_after == ranks[layer.name] * per_rank
        assert report.bytes_after == 4 * report.params_after < report.bytes_before
        if quantization != "gptq":
            fresh = load_base_model(ModelConfig(path=str(model_dir), quantization=quantization, device="cpu"))
            got = peft_logits(fresh, tmp_path / fmt, ids)
            assert (got - reference).abs().max() <= FP32_PARITY_ATOL, fmt

    data = json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())
    assert data["peft_type"] == "LORA" and pruned not in data["target_modules"]
    assert all(data["alpha_pattern"][key] == rank for key, rank in data["rank_pattern"].items())
    # Our loader reads the compacted AdaLoRA folder too.
    ours = load_base_model(ModelConfig(path=str(model_dir), quantization=quantization, device="cpu"))
    load_adapter(ours, tmp_path / "adalora")
    assert (logits(ours, ids) - reference).abs().max() <= FP32_PARITY_ATOL


def test_in_memory_model_compacts_like_its_folder(tmp_path):
    ids = random_tokens()
    model = tiny_llama(0)
    config = adalora_config()
    adapters = inject_adapters(model, config)
    set_random_masked(adapters)
    reference = logits(model, ids)
    report = compact_adapter(adapters, tmp_path / "lora", format="lora", config=config)
    assert report.params_after == sum(r * (l.in_features + l.out_features) for r, l in
                                      zip(adapters.live_ranks().values(), adapters.values()))
    assert (peft_logits(tiny_llama(0), tmp_path / "lora", ids) - reference).abs().max() <= FP32_PARITY_ATOL
    # Compacting the model itself (no optimizer) keeps its output; the written adapter is the same.
    compact_adapter(adapters, tmp_path / "before", config=config)
    from adalora_deploy.compaction import compact_in_place

    compact_in_place(adapters)
    assert (logits(model, ids) - reference).abs().max() <= FP32_PARITY_ATOL
    compact_adapter(adapters, tmp_path / "after", config=config)
    from safetensors.torch import load_file

    before, after = (load_file(str(tmp_path / n / ADAPTER_WEIGHTS)) for n in ("before", "after"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_none_pruned_and_one_module_only(tmp_path):
    ids = random_tokens()
    model = tiny_llama(0)
    config = adalora_config("model\\.layers\\.1\\.self_attn\\.v_proj")
    adapters = inject_adapters(model, config)
    assert list(adapters) == ["model.layers.1.self_attn.v_proj"]
    set_random_masked(adapters, masks={0: [True] * INIT_R})
    reference = logits(model, ids)
    assert (reference - logits(tiny_llama(0), ids)).abs().max() > MIN_ADAPTER_EFFECT
    report = compact_adapter(adapters, tmp_path / "lora", format="lora", config=config)
    assert [(layer.rank, layer.init_r) for layer in report.layers] == [(INIT_R, INIT_R)]
    assert (peft_logits(tiny_llama(0), tmp_path / "lora", ids) - reference).abs().max() <= FP32_PARITY_ATOL
    compact_adapter(adapters, tmp_path / "adalora", config=config)
    assert (peft_logits(tiny_llama(0), tmp_path / "adalora", ids) - reference).abs().max() <= FP32_PARITY_ATOL


def test_every_layer_pruned_is_an_error_and_writes_nothing(tmp_path):
    model = tiny_llama(0)
    config = adalora_config(["q_proj"])
    adapters = inject_adapters(model, config)
    set_random_masked(adapters, masks={0: [False] * INIT_R, 1: [False] * INIT_R})
    with pytest.raises(ArtifactError, match="rank 0"):
        compact_adapter(adapters, tmp_path / "out", config=config)
    assert list(tmp_path.iterdir()) == []


def _peft_trained(steps_run: int, tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """An AdaLoRA adapter trained by PEFT itself (total_step 12, final mask at step 9), saved after
    ``steps_run`` steps; returns the folder, the PEFT model's logits and the base logits."""
    ids = random_tokens(batch=4, length=32)
    torch.manual_seed(0)
    config = peft.AdaLoraConfig(init_r=INIT_R, target_r=2, tinit=2, tfinal=3, deltaT=1, total_step=12, lora_alpha=8,
                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = peft.get_peft_model(tiny_llama(0), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps_run):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    model.eval()
    reference = logits(model, ids)
    folder = tmp_path / f"peft-{steps_run}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(folder))
    return folder, reference, logits(tiny_llama(0), ids)


def test_peft_trained_adapter_round_trips_through_compact_and_lora(tmp_path):
    folder, reference, base = _peft_trained(12, tmp_path)
    ids = random_tokens(batch=4, length=32)
    assert (reference - base).abs().max() > MIN_ADAPTER_EFFECT
    saved = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert saved["rank_pattern"] is not None
    for fmt in ("adalora", "lora"):
        report = compact_adapter(folder, tmp_path / fmt, format=fmt)
        assert sum(layer.rank for layer in report.layers) == 4 * 2  # n * target_r, PEFT's final budget
        assert (peft_logits(tiny_llama(0), tmp_path / fmt, ids) - reference).abs().max() <= FP32_PARITY_ATOL
    ours = tiny_llama(0)
    load_adapter(ours, tmp_path / "adalora")
    assert (logits(ours, ids) - reference).abs().max() <= FP32_PARITY_ATOL


def test_peft_adapter_saved_without_rank_pattern_is_compacted_by_zero_singular_values(tmp_path):
    # PEFT saves rank_pattern null and full init_r tensors until its first masking step (t > tinit);
    # triplets with Λ = 0 (zeroed here by hand, as a mask would) contribute nothing and are dropped.
    from safetensors.torch import load_file, save_file

    folder, _, base = _peft_trained(2, tmp_path)
    ids = random_tokens(batch=4, length=32)
    assert json.loads((folder / ADAPTER_CONFIG).read_text())["rank_pattern"] is None
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    e_keys = sorted(k for k in tensors if k.endswith("lora_E"))
    assert all(tensors[k].shape == (INIT_R, 1) for k in e_keys)
    for key in e_keys:  # two steps barely move Λ; make the adapter matter
        tensors[key] *= 50.0
    tensors[e_keys[0]][[1, 4]] = 0.0
    tensors[e_keys[1]][:] = 0.0
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    reference = peft_logits(tiny_llama(0), folder, ids)
    assert (reference - base).abs().max() > MIN_ADAPTER_EFFECT
    adapter = read_compact_adapter(folder)
    assert [layer.rank for layer in adapter.layers] == [INIT_R - 2, 0, INIT_R, INIT_R]
    for fmt in ("adalora", "lora"):
        compact_adapter(folder, tmp_path / fmt, format=fmt)
        assert (peft_logits(tiny_llama(0), tmp_path / fmt, ids) - reference).abs().max() <= FP32_PARITY_ATOL


def tiny_gpt2(seed: int = 0):
    """A tiny GPT2LMHeadModel (Conv1D layers, weight stored (in, out)), built in code."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=259, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=256,
                        eos_token_id=257)
    return GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_converts_with_fan_in_fan_out(tmp_path):
    ids = random_tokens()
    model = tiny_gpt2()
    base = logits(model, ids)
    config = adalora_config(["c_attn", "c_fc"])
    adapters = inject_adapters(model, config)
    set_random_masked(adapters)
    reference = logits(model, ids)
    assert (reference - base).abs().max() > MIN_ADAPTER_EFFECT
    assert from_adapters(adapters, config).fan_in_fan_out
    report = compact_adapter(adapters, tmp_path / "lora", format="lora", config=config)
    assert json.loads((tmp_path / "lora" / ADAPTER_CONFIG).read_text())["fan_in_fan_out"] is True
    assert report.layers[0].shape == (192, 64)  # c_attn: (d_out, d_in) although Conv1D stores (64, 192)
    assert (peft_logits(tiny_gpt2(), tmp_path / "lora", ids) - reference).abs().max() <= FP32_PARITY_ATOL
    compact_adapter(adapters, tmp_path / "adalora", config=config)
    assert (peft_logits(tiny_gpt2(), tmp_path / "adalora", ids) - reference).abs().max() <= FP32_PARITY_ATOL


# --- in-training compaction ---------------------------------------------------------------------------


def _train_loop(compact: bool, gamma: float, steps: int = 16) -> tuple[list[float], list[tuple[int, int]]]:
    """Our training step by hand on fixed batches; returns losses and (trainable, optimizer state) sizes."""
    torch.manual_seed(0)
    model = tiny_llama(0)
    config = adalora_config(["q_proj", "v_proj"], total_step=steps, target_r=2, tinit=2, tfinal=6,
                            orth_reg_weight=gamma, compact_in_training=compact)
    adapters = inject_adapters(model, config, seed=0)
    controller = AdaLoraController(adapters, config)
    optimizer = make_optimizer(adapters, lr=1e-2)
    batches = [random_tokens(batch=4, length=32, seed=s) for s in range(4)]
    model.train()
    losses, sizes = [], []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(input_ids=batch, labels=batch).loss
        (loss + controller.regularizer()).backward()
        optimizer.step()
        controller.after_optimizer_step(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        state = sum(v.numel() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
        sizes.append((trainable, state))
    return losses, sizes


def test_in_training_compaction_reproduces_masked_training_without_regularizer():
    masked, masked_sizes = _train_loop(compact=False, gamma=0.0)
    compacted, compacted_sizes = _train_loop(compact=True, gamma=0.0)
    final = 16 - 6
    for step, (a, b) in enumerate(zip(masked, compacted)):
        assert abs(a - b) <= IN_TRAINING_LOSS_ATOL, step
    assert masked[:final + 1] == compacted[:final + 1]  # identical computation up to the compaction
    assert masked[-1] != masked[final]  # training still moves after the final mask
    # 4 layers (q: 64x64, v: 32x64) at init_r 6 before; n * target_r = 8 triplets survive after.
    full = 2 * 6 * (64 + 64 + 1) + 2 * 6 * (32 + 64 + 1)
    assert masked_sizes[final] == (full, 2 * full) == compacted_sizes[final - 1]
    trainable, state = compacted_sizes[final]
    assert trainable < full / 2 and state == 2 * trainable
    assert all(size == masked_sizes[final] for size in masked_sizes[final:])


def test_in_training_compaction_differs_with_regularizer():
    # γ > 0: masked rows still enter Q Q^T - I and P^T P - I in masked training, not after slicing.
    masked, _ = _train_loop(compact=False, gamma=0.5)
    compacted, _ = _train_loop(compact=True, gamma=0.5)
    final = 16 - 6
    assert masked[:final + 1] == compacted[:final + 1]
    after = max(abs(a - b) for a, b in zip(masked[final + 1:], compacted[final + 1:]))
    assert after > IN_TRAINING_LOSS_ATOL


def test_train_with_compaction_saves_adapter_peft_loads(tiny_model_dir, sample_text, tmp_path):
    ids = random_tokens()
    runs = {}
    for compact in (False, True):
        raw = run_config(tiny_model_dir, sample_text, adapter={"orth_reg_weight": 0.0, "compact_in_training": compact,
                                                               "tfinal": 4},
                         train={"steps": 12, "checkpoint_every": 0, "lr": 2e-2})
        runs[compact] = train(parse_run_config(raw), tmp_path / f"run-{compact}", progress=False)
    adapters = {}
    for compact, result in runs.items():
        model = tiny_llama(0)
        load_adapter(model, result.adapter_dir)
        adapters[compact] = logits(model, ids)
    assert (adapters[True] - logits(tiny_llama(0), ids)).abs().max() > MIN_ADAPTER_EFFECT
    assert (adapters[True] - adapters[False]).abs().max() <= FP32_PARITY_ATOL
    assert (peft_logits(tiny_llama(0), runs[True].adapter_dir, ids) - adapters[True]).abs().max() <= FP32_PARITY_ATOL
    # The masked run's adapter, compacted offline to LoRA, is the same model too.
    compact_adapter(runs[False].adapter_dir, tmp_path / "lora", format="lora")
    assert (peft_logits(tiny_llama(0), tmp_path / "lora", ids) - adapters[False]).abs().max() <= FP32_PARITY_ATOL


# --- CLI ----------------------------------------------------------------------------------------------


def test_cli_compact_writes_both_formats_and_rejects_bad_input(tmp_path, capsys):
    model = tiny_llama(0)
    config = adalora_config()
    adapters = inject_adapters(model, config)
    set_random_masked(adapters, masks=EDGE_MASKS)
    save_adapter(adapters, config, tmp_path / "masked")
    for fmt in ("adalora", "lora"):
        assert main(["compact", str(tmp_path / "masked"), "--output", str(tmp_path / fmt), "--format", fmt]) == 0
        assert (tmp_path / fmt / ADAPTER_WEIGHTS).is_file()
        out = capsys.readouterr().out
        assert "model.layers.0.self_attn.q_proj" in out and "0/6" in out and "smaller" in out
    assert main(["compact", str(tmp_path / "masked"), "--output", str(tmp_path / "lora")]) == 2
    assert "--overwrite" in capsys.readouterr().err  # an existing folder is never replaced silently
    assert main(["compact", str(tmp_path / "masked"), "--output", str(tmp_path / "lora"), "--overwrite"]) == 0
    assert main(["compact", str(tmp_path / "missing"), "--output", str(tmp_path / "bad")]) == 2
    assert "adapter folder not found" in capsys.readouterr().err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / ADAPTER_CONFIG).write_text("{}")
    assert main(["compact", str(tmp_path / "broken"), "--output", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    assert find_adapters(model)  # the in-memory model is untouched by the CLI
