"""Cost of the rank allocator per optimizer step at SmolLM2-135M's shapes, ours vs PEFT's.

Builds a randomly initialised LlamaForCausalLM with SmolLM2-135M's config (hidden 576, 30 layers,
9/3 heads, intermediate 1536, vocab 49152), adapts all seven projections (210 layers, init_r 12),
and times one forward+backward (batch 1 x 128 tokens) for scale, then one ``update_and_allocate``
in the budgeting phase for each implementation, on the same gradients.

    python benchmarks/bench_allocator.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_shaped():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=2048)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def timed(function, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    base = smollm2_shaped()
    tokens = torch.randint(0, 49152, (1, 128))
    total, tinit, tfinal = 1000, 10, 10

    from adalora_deploy import AdaLoraConfig, RankAllocator, inject_adapters

    ours_model = copy.deepcopy(base)
    config = AdaLoraConfig(total_step=total, tinit=tinit, tfinal=tfinal, target_modules=TARGETS)
    adapters = inject_adapters(ours_model, config)
    with torch.no_grad():
        for layer in adapters.values():
            layer.lora_E.normal_()
    ours_model(input_ids=tokens, labels=tokens).loss.backward()
    allocator = RankAllocator(adapters, config)
    step = iter(range(tinit + 1, total))
    ours_ms = timed(lambda: allocator.update_and_allocate(next(step)), args.repeats)
    forward_backward_ms = timed(lambda: ours_model(input_ids=tokens, labels=tokens).loss.backward(), 2)

    from peft import AdaLoraConfig as PeftAdaLoraConfig
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base), PeftAdaLoraConfig(
        total_step=total, tinit=tinit, tfinal=tfinal, target_modules=TARGETS, init_r=12, target_r=8))
    peft_model(input_ids=tokens, labels=tokens).loss.backward()
    peft_step = iter(range(tinit + 1, total))
    peft_ms = timed(lambda: peft_model.base_model.update_and_allocate(next(peft_step)), args.repeats)

    print(f"SmolLM2-135M shapes, {len(adapters)} adapted layers, init_r 12, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'what':<44} {'ms / step':>10}")
    print(f"{'forward+backward, batch 1 x 128 tokens':<44} {forward_backward_ms:>10.1f}")
    print(f"{'adalora-deploy update_and_allocate':<44} {ours_ms:>10.1f}")
    print(f"{'peft 0.21.2 update_and_allocate':<44} {peft_ms:>10.1f}")
    print(f"{'speed-up':<44} {peft_ms / ours_ms:>9.1f}x")


if __name__ == "__main__":
    main()
