"""``training``: one AdaLoRA training step (forward, backward, optimizer, allocator) and its peak memory,
ours vs PEFT's AdaLoRA on the same base kind (dense fp32, bnb NF4), all seven projections, init_r 12.
Each side runs in its own process (``run_all.py train-step ...``) so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import bench_fastpath
from bench_allocator import TARGETS
from harness import PYTHON, RUN_ALL, Suite, last_json, ratio, run_child, show, show_ratio, stats, tail


def shaped_model_dir(suite: Suite) -> str:
    """A randomly initialised model with SmolLM2-135M's shapes, saved once (no tokenizer: training timing only)."""
    from bench_allocator import smollm2_shaped

    folder = suite.workdir / "smollm2-shaped"
    if not (folder / "config.json").exists():
        smollm2_shaped().save_pretrained(folder)
    return str(folder)


def train_step(model_dir: str, kind: str, impl: str, steps: int, seq_len: int, threads: int | None) -> dict[str, Any]:
    """Time ``steps`` AdaLoRA training steps (after one warm-up step) of ``impl`` (ours | peft) on a ``kind`` base.

    Phases: forward (loss + orthogonal regularizer), backward, optimizer (AdamW step + zero_grad), allocator
    (importance update and budget masking, every step is in the budgeting phase). Peak RSS is sampled during
    the steps; ``rss_base_mb`` is the base after one inference forward, before the adapters.
    """
    import torch

    from adalora_deploy.config import ModelConfig
    from adalora_deploy.models import load_base_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_base_model(ModelConfig(path=model_dir, quantization=kind, device="cpu"))
    tokens = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # touches every weight page (safetensors are memory-mapped) before the baseline
        model(input_ids=tokens)
    rss_base = bench_fastpath._rss()
    total, tinit, tfinal = 1000, 1, 10
    if impl == "ours":
        from adalora_deploy import AdaLoraConfig, inject_adapters
        from adalora_deploy.training import AdaLoraController, make_optimizer

        config = AdaLoraConfig(total_step=total, tinit=tinit, tfinal=tfinal, target_modules=TARGETS)
        adapters = inject_adapters(model, config)
        controller = AdaLoraController(adapters, config)
        optimizer = make_optimizer(adapters, lr=1e-3)
        trainable = sum(p.numel() for p in adapters.parameters())

        def loss():
            return model(input_ids=tokens, labels=tokens).loss + controller.regularizer()

        def allocate(step: int):
            controller.after_optimizer_step(step, optimizer)
    else:
        from peft import AdaLoraConfig as PeftAdaLoraConfig
        from peft import get_peft_model

        model = get_peft_model(model, PeftAdaLoraConfig(total_step=total, tinit=tinit, tfinal=tfinal,
                                                        target_modules=TARGETS, init_r=12, target_r=8))
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-3)
        trainable = sum(p.numel() for p in parameters)

        def loss():  # PEFT's AdaLoraModel.forward adds the orthogonal regularizer to the loss
            return model(input_ids=tokens, labels=tokens).loss

        def allocate(step: int):
            model.base_model.update_and_allocate(step)
    model.train()
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "allocator": [], "step": []}
    sampler = None
    for i in range(steps + 1):
        if i == 1:  # after the warm-up step: Adam state exists, every buffer is allocated
            sampler = bench_fastpath._PeakRss()
        t0 = time.perf_counter()
        value = loss()
        t1 = time.perf_counter()
        value.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        allocate(tinit + 1 + i)  # reads the gradients: before zero_grad, as in training
        t4 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if i:
            for name, seconds in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2 + t5 - t4),
                                  ("allocator", t4 - t3), ("step", t5 - t0)):
                phases[name].append(seconds * 1000)
    peak = sampler.stop()
    return {"kind": kind, "impl": impl, "threads": torch.get_num_threads(), "seq_len": seq_len,
            "trainable_params": trainable, "rss_base_mb": rss_base / 2**20, "rss_peak_mb": peak / 2**20,
            "training_overhead_mb": (peak - rss_base) / 2**20, "ms": phases}


def run(suite: Suite) -> None:
    model_dir = suite.model
    if model_dir is None:
        model_dir = shaped_model_dir(suite)
        suite.skip("training", "the real weights", "real model missing; timing a random model with SmolLM2-135M's "
                   "shapes instead (same cost per step)")
    steps, seq_len = (3, 128) if suite.quick else (6, 128)
    kinds = ["none", "bnb-nf4"]
    try:
        import peft  # noqa: F401
    except ImportError:
        suite.skip("training", "PEFT's AdaLoRA", "peft is not installed (pip install peft)")
        return
    results: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        for impl in ("ours", "peft"):
            argv = [PYTHON, str(RUN_ALL), "train-step", "--model", model_dir, "--kind", kind,
                    "--impl", impl, "--steps", str(steps), "--seq-len", str(seq_len), "--threads", str(suite.threads)]
            suite.command("training", argv)
            run = run_child(argv, timeout=1800)
            if run.returncode:
                suite.skip("training", f"{impl} on {kind}", f"failed: {tail(run.stderr)}")
                continue
            record = last_json(run.stdout)
            record["process_peak_rss_mb"] = run.peak_rss_mb
            record["ms"] = {k: stats(v) for k, v in record["ms"].items()}
            results[f"{kind}/{impl}"] = record
            print(f"  training {kind} {impl}: step {show(record['ms']['step'])} ms", flush=True)
    suite.results["training"] = results
    rows = []
    for kind in kinds:
        ours, peer = results.get(f"{kind}/ours"), results.get(f"{kind}/peft")
        if not ours or not peer:
            continue
        for phase in ("forward", "backward", "optimizer", "allocator", "step"):
            rows.append([kind, phase, show(ours["ms"][phase]), show(peer["ms"][phase]),
                         show_ratio(ratio(ours["ms"][phase], peer["ms"][phase]))])
        rows.append([kind, "peak RSS - base (MB)", f"{ours['training_overhead_mb']:.0f}",
                     f"{peer['training_overhead_mb']:.0f}",
                     show_ratio(ours["training_overhead_mb"] / peer["training_overhead_mb"])])
        rows.append([kind, "process peak RSS (MB)", f"{ours['process_peak_rss_mb']:.0f}",
                     f"{peer['process_peak_rss_mb']:.0f}",
                     show_ratio(ours["process_peak_rss_mb"] / peer["process_peak_rss_mb"])])
    first = next(iter(results.values()), {})
    suite.print_table(f"Training step, batch 1 x {seq_len} tokens, 7 projections x 30 layers, init_r 12, "
                      f"{first.get('threads')} torch threads, ms: median [min-max] of {steps} steps",
                      ["base", "phase", "ours", "PEFT AdaLoRA", "ours/PEFT"], rows)



def train_step_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="run_all.py train-step", description=train_step.__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--kind", choices=["none", "bnb-nf4", "bnb-fp4", "bnb-int8"], required=True)
    parser.add_argument("--impl", choices=["ours", "peft"], required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    print(json.dumps(train_step(args.model, args.kind, args.impl, args.steps, args.seq_len, args.threads)))


