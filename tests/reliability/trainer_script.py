"""Run by tests/reliability/test_distributed.py (under torchrun or alone): AdaLoraTrainer on the tiny Llama.

Usage: python trainer_script.py OUTPUT_JSON PER_DEVICE_BATCH
Writes this rank's final rank_pattern and adapter tensors' checksums to OUTPUT_JSON.<rank>.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch.utils.data import Dataset, SequentialSampler
from transformers import TrainingArguments

from adalora_deploy import AdaLoraConfig, AdaLoraTrainer, inject_adapters
from adalora_deploy.data import token_blocks
from adalora_deploy.demo import SAMPLE_TEXT, byte_tokenizer, tiny_llama

STEPS = 12


class Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.blocks[index], "labels": self.blocks[index]}


class SequentialTrainer(AdaLoraTrainer):
    """The same rows in the same order with 1 or 2 processes (accelerate shards whole batches across ranks)."""

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)


def main(output: str, per_device: int) -> None:
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    config = AdaLoraConfig(total_step=STEPS, init_r=8, target_r=3, tinit=2, tfinal=2, deltaT=1, lora_alpha=16,
                           target_modules=["q_proj", "v_proj"])
    adapters = inject_adapters(model, config)
    args = TrainingArguments(output_dir=os.path.dirname(output), max_steps=STEPS, per_device_train_batch_size=per_device,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, dataloader_drop_last=True, seed=0, disable_tqdm=True)
    data = Blocks(token_blocks(SAMPLE_TEXT, byte_tokenizer(), 32))
    SequentialTrainer(model=model, adalora_config=config, args=args, train_dataset=data).train()
    rank = int(os.environ.get("RANK", "0"))
    state = {"rank_pattern": adapters.rank_pattern(),
             "tensors": {f"{name}.{key}": getattr(layer, key).detach().double().sum().item()
                         for name, layer in adapters.items() for key in ("lora_A", "lora_E", "lora_B")}}
    with open(f"{output}.{rank}", "w", encoding="utf-8") as handle:
        json.dump(state, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
