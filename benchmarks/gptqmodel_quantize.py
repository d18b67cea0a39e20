"""The peer of ``adalora-deploy quantize --method gptq``: gptqmodel on the same calibration token blocks.

Runs in whatever environment has gptqmodel (it pins its own dependencies; a separate virtual environment
keeps them out of ours): ``benchmarks/run_all.py --sections quantize --gptqmodel-python VENV/bin/python``.
It reads the calibration blocks our side cut (a JSON list of token id lists), so both solvers see exactly the
same tokens, quantizes with the same settings, writes the checkpoint and prints one JSON line with its
quantization seconds (model load and save excluded; the caller times the whole process too).

    python benchmarks/gptqmodel_quantize.py MODEL_DIR --ids calibration.json --output DIR
        [--bits 4] [--group-size 128] [--damp 0.01]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--ids", required=True, help="JSON list of calibration token id lists")
    parser.add_argument("--output", required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--damp", type=float, default=0.01, help="damping, fraction of mean diag(H) (ours: 0.01)")
    args = parser.parse_args()

    import gptqmodel
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    torch.set_num_threads(os.cpu_count() or 1)
    with open(args.ids, encoding="utf-8") as file:
        blocks = json.load(file)
    calibration = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in blocks]
    # our quantize's defaults: symmetric, no act-order, no group-aware reordering (gptqmodel 7.6 turns GAR on for
    # GPTQ by default), true-sequential; and no offload of finished layers to disk (we keep them in memory)
    config = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=False, sym=True,
                            damp_percent=args.damp, act_group_aware=False, offload_to_disk=False)
    started = time.perf_counter()
    model = GPTQModel.load(args.model, config, device="cpu")
    loaded = time.perf_counter()
    model.quantize(calibration, batch_size=1)
    quantized = time.perf_counter()
    model.save(args.output)
    print(json.dumps({"gptqmodel": gptqmodel.__version__, "load_s": loaded - started,
                      "quantize_s": quantized - loaded, "save_s": time.perf_counter() - quantized,
                      "samples": len(blocks), "seq_len": len(blocks[0])}))


if __name__ == "__main__":
    main()
