"""Training step cost of ``model.activations: int8`` (onnxruntime's int8 activation arithmetic emulated in the
forward, straight-through gradients), alone and with ``adapter.down_weights: int8`` (the main job's default: each
branch's down-projection on the 8-bit grid too), against fp32 activations, on the same GPTQ base.

    python benchmarks/bench_int8_training.py [--base GPTQ_FOLDER] [--steps 5] [--batch 8] [--seq-len 128]

``--base`` defaults to the GPTQ base of the main job (``runs/smollm2-sentiment/job.json``; run the job
first). The arithmetics train the job's adapter (all seven projections, init_r 12) on the same random tokens;
steps are interleaved (fp32, int8, int8 + down, fp32, ...) after one warm-up step each, so machine load hits all
alike. Prints forward, backward and whole-step milliseconds (median [min-max]) and the ratios to fp32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from adalora_deploy import AdaLoraConfig, inject_adapters
from adalora_deploy.config import ModelConfig
from adalora_deploy.models import load_base_model
from adalora_deploy.training import AdaLoraController, make_optimizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _job_base() -> str:
    record = Path("runs/smollm2-sentiment/job.json")
    if not record.is_file():
        raise SystemExit("no --base and no runs/smollm2-sentiment/job.json: run the main job first or pass --base")
    return json.loads(record.read_text())["stages"]["prepare"]["base_folder"]


ARITHMETICS = {"fp32": ("fp32", "fp32"), "int8": ("int8", "fp32"), "int8+down": ("int8", "int8")}
"""Name -> (model.activations, adapter.down_weights)."""


def _trainer(base: str, activations: str, down_weights: str, tokens: torch.Tensor):
    model = load_base_model(ModelConfig(path=base, quantization="gptq", device="cpu", activations=activations))
    config = AdaLoraConfig(total_step=1000, tinit=1, tfinal=10, target_modules=TARGETS, init_r=12, target_r=4,
                           down_weights=down_weights)
    adapters = inject_adapters(model, config)
    controller = AdaLoraController(adapters, config)
    optimizer = make_optimizer(adapters, lr=1e-3)
    model.train()

    def step(index: int) -> tuple[float, float, float]:
        t0 = time.perf_counter()
        loss = model(input_ids=tokens, labels=tokens).loss + controller.regularizer()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        controller.after_optimizer_step(index + 2, optimizer)
        optimizer.zero_grad(set_to_none=True)
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (time.perf_counter() - t0) * 1e3

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="GPTQ base folder (default: the main job's)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    base = args.base or _job_base()
    tokens = torch.randint(0, 49152, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    steppers = {name: _trainer(base, *settings, tokens) for name, settings in ARITHMETICS.items()}
    for step in steppers.values():
        step(0)  # warm-up: Adam state, buffers
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in steppers}
    for index in range(1, args.steps + 1):
        for name, step in steppers.items():
            times[name].append(step(index))
    print(f"GPTQ base {base}, batch {args.batch} x {args.seq_len} tokens, {torch.get_num_threads()} threads, "
          f"{args.steps} interleaved steps each: ms median [min-max]")
    print(f"{'arithmetic':<12} {'forward':>24} {'backward':>24} {'step':>24}")
    medians = {}
    for name, rows in times.items():
        cells = []
        for column in range(3):
            values = [row[column] for row in rows]
            cells.append(f"{statistics.median(values):8.0f} [{min(values):.0f}-{max(values):.0f}]")
        medians[name] = statistics.median(row[2] for row in rows)
        print(f"{name:<12} " + " ".join(f"{cell:>24}" for cell in cells))
    print(", ".join(f"{name} / fp32 step: {medians[name] / medians['fp32']:.2f}x" for name in medians if name != "fp32"))


if __name__ == "__main__":
    main()
