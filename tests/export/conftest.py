"""Fixtures for the export/check tests: a tiny Llama folder, trained AdaLoRA adapters, GPTQ bases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

ADAPTED_MODULES = ["q_proj", "v_proj", "down_proj"]
"""Target modules of the test adapters; with the budget below the allocator leaves some at rank 0."""


@dataclass(frozen=True)
class ExportWorkspace:
    """Folders shared by the export tests."""

    root: Path
    model: Path
    """Float tiny Llama (hidden 64, 2 layers) with the byte tokenizer."""
    adapter: Path
    """Trained adapter (seed 0): ranks 0/12/1/0/11/0 over q/v/down of both layers (some rank 0)."""
    adapter2: Path
    """A second trained adapter on the same modules (seed 1, other data order and ranks)."""
    zero_adapter: Path
    """An untrained adapter (Λ = 0): changes nothing, so checks with it must be refused."""

    def trained_on(self, base: Path, quantization: str, double_quant: bool = False) -> Path:
        """An adapter trained (20 steps, ~1 s) on ``base`` loaded as ``quantization``; its ``run.json`` records
        the base kind, which ``export --quantization auto`` reads."""
        from adalora_deploy.config import parse_run_config
        from adalora_deploy.demo import SAMPLE_TEXT
        from adalora_deploy.training import train
        from tests.conftest import run_config

        out = self.root / f"run-{base.name}-{quantization}{'-dq' if double_quant else ''}"
        if not (out / "adapter" / "adapter_config.json").is_file():
            run = parse_run_config(run_config(
                base, SAMPLE_TEXT, model={"quantization": quantization, "double_quant": double_quant, "device": "cpu"},
                adapter={"target_modules": ADAPTED_MODULES, "lora_alpha": 32}, train={"lr": 2e-2}))
            train(run, out, progress=False)
        return out / "adapter"

    def gptq_base(self, act_order: bool) -> Path:
        """A 4-bit group-32 GPTQ checkpoint of :attr:`model` (built on first use, ~5 s)."""
        folder = self.root / f"gptq{'-act' if act_order else ''}"
        if not (folder / "config.json").is_file():
            import torch
            from transformers import AutoModelForCausalLM

            from adalora_deploy.data import token_blocks
            from adalora_deploy.demo import SAMPLE_TEXT
            from adalora_deploy.gptq.checkpoint import save_gptq_model
            from adalora_deploy.gptq.driver import quantize_model
            from adalora_deploy.models import load_tokenizer

            blocks = token_blocks(str(SAMPLE_TEXT), load_tokenizer(str(self.model)), 32)[:16]
            model = AutoModelForCausalLM.from_pretrained(self.model, dtype=torch.float32, local_files_only=True)
            quantize_model(model, blocks, method="gptq", bits=4, group_size=32, desc_act=act_order)
            save_gptq_model(model, folder, tokenizer_source=self.model, overwrite=True)
        return folder


@pytest.fixture(scope="session")
def export_workspace(tmp_path_factory) -> ExportWorkspace:
    from adalora_deploy import inject_adapters, save_adapter
    from adalora_deploy.config import parse_run_config
    from adalora_deploy.demo import SAMPLE_TEXT, tiny_llama, write_tiny_llama
    from adalora_deploy.training import train
    from tests.conftest import run_config

    root = tmp_path_factory.mktemp("export-workspace")
    model = write_tiny_llama(root / "model")
    adapters = []
    for seed, target_r in ((0, 4), (1, 3)):
        run = parse_run_config(run_config(model, SAMPLE_TEXT, adapter={"target_modules": ADAPTED_MODULES,
                                                                        "lora_alpha": 32, "target_r": target_r},
                                          train={"lr": 2e-2, "seed": seed}))
        adapters.append(train(run, root / f"run{seed}", progress=False).adapter_dir)
    zero = root / "zero-adapter"
    untrained = tiny_llama()
    save_adapter(inject_adapters(untrained, run.adapter), run.adapter, zero, base_model_name_or_path=str(model))
    return ExportWorkspace(root=root, model=model, adapter=adapters[0], adapter2=adapters[1], zero_adapter=zero)


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""A ChatML template like SmolLM2's (with a jinja filter, so rendering is more than concatenation)."""


@dataclass(frozen=True)
class ServingExports:
    """Exports of the workspace's trained adapter for generation and serving tests (tokenizer with a chat template)."""

    model: Path
    """The tiny Llama folder with ``chat_template.jinja``."""
    merged: Path
    """``--mode merged`` fp32: exact, the adapter baked in."""
    adapter_inputs: Path
    """``--mode separate --adapter-inputs``: the base by default, ``adapter.onnx_adapter`` = the trained adapter."""
    adapters: Path
    """A folder with ``second.onnx_adapter`` (the workspace's second adapter) for ``serve --adapters``."""


@pytest.fixture(scope="session")
def serving_exports(export_workspace, tmp_path_factory) -> ServingExports:
    import shutil

    from adalora_deploy.export.build.adapter_file import write_adapter_file
    from adalora_deploy.export.api import export_model

    ws = export_workspace
    root = tmp_path_factory.mktemp("serving")
    model = root / "model"
    shutil.copytree(ws.model, model)
    (model / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    merged, adapter_inputs = root / "tiny-merged", root / "tiny-ai"
    export_model(model, ws.adapter, output=merged, mode="merged", quantization="none")
    export_model(model, ws.adapter, output=adapter_inputs, mode="separate", quantization="none", adapter_inputs=True)
    (root / "adapters").mkdir()
    write_adapter_file(ws.adapter2, adapter_inputs, root / "adapters" / "second.onnx_adapter")
    return ServingExports(model=model, merged=merged, adapter_inputs=adapter_inputs, adapters=root / "adapters")
