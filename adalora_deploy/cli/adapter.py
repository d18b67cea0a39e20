"""Subcommands ``compact`` and ``merge``: slice a trained adapter, or fold it into its base model.

    adalora-deploy compact ADAPTER_DIR --output DIR [--format adalora|lora]
    adalora-deploy merge --base MODEL_DIR --adapter ADAPTER_DIR --output DIR
                         [--quantization none|bnb-nf4|bnb-fp4|bnb-int8|gptq]
                         [--requantize gptq|rtn --bits 4 --group-size 128 --calibration FILE]

Both print a per-layer table (ranks kept, sizes before/after) and write their folder atomically: a
failure leaves no output folder behind.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from adalora_deploy.artifacts import ArtifactError, check_output_dir
from adalora_deploy.cli.options import add_base_loading
from adalora_deploy.errors import QuantizationError
from adalora_deploy.quantization import GPTQ_METHODS

__all__ = ["register", "run_compact", "run_merge"]



def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``compact`` and ``merge``."""
    compact = subparsers.add_parser(
        "compact", help="slice a trained AdaLoRA adapter to its surviving ranks (AdaLoRA or LoRA format)",
        description="Slice P, Λ, Q of an AdaLoRA adapter (ours or PEFT's) to the triplets its rank_pattern "
                    "keeps; write PEFT's AdaLoRA format or a standard LoRA with per-module ranks.")
    compact.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="AdaLoRA adapter folder (adapter_config.json, "
                                                                    "adapter_model.safetensors)")
    compact.add_argument("--output", required=True, metavar="DIR", help="output adapter folder")
    compact.add_argument("--format", choices=("adalora", "lora"), default="adalora",
                         help="adalora: PEFT AdaLoRA, sliced (default); lora: PEFT LoRA, per-module ranks, scaling 1")
    compact.add_argument("--fan-in-fan-out", action="store_true", default=None,
                         help="the base stores weights (in, out), e.g. GPT-2's Conv1D (default: from the adapter config)")
    compact.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    compact.set_defaults(run=run_compact)

    merge = subparsers.add_parser(
        "merge", help="merge an AdaLoRA adapter into its base model (dense, bnb or GPTQ) and write a plain model",
        description="W = dequant(W0) + ΔW for every adapted linear (every other quantized linear is dequantized); "
                    "writes a Hugging Face model folder without quantization_config, or a GPTQ checkpoint "
                    "with --requantize.")
    merge.add_argument("--base", required=True, metavar="MODEL_DIR", help="base model folder the adapter was trained on")
    merge.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="AdaLoRA adapter folder")
    merge.add_argument("--output", required=True, metavar="DIR", help="merged model folder")
    add_base_loading(merge)
    merge.add_argument("--requantize", choices=GPTQ_METHODS, default=None,
                       help="re-quantize the merged weights and write a GPTQ checkpoint")
    merge.add_argument("--bits", type=int, default=4, help="re-quantization bits (default: 4)")
    merge.add_argument("--group-size", type=int, default=128, help="re-quantization group size, -1 for one (default: 128)")
    merge.add_argument("--calibration", default=None, metavar="FILE",
                       help="calibration text (.txt/.jsonl) for --requantize (default: the packaged sample text)")
    merge.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    merge.set_defaults(run=run_merge)


def run_compact(args: argparse.Namespace) -> int:
    """``adalora-deploy compact``: write the sliced adapter and print its table."""
    from adalora_deploy.compaction import compact_adapter  # lazy: imports torch; --help stays torch-free

    check_output_dir(args.output, args.overwrite)
    report = compact_adapter(args.adapter_dir, args.output, format=args.format, fan_in_fan_out=args.fan_in_fan_out)
    print(report.format_table())
    saved = 1 - report.bytes_after / report.bytes_before if report.bytes_before else 0.0
    removed = f"; adapters removed from {len(report.removed)} rank-0 modules" if report.removed else ""
    print(f"wrote {report.output_dir} ({args.format} format): {report.bytes_after} of {report.bytes_before} "
          f"tensor bytes ({saved:.0%} smaller){removed}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    """``adalora-deploy merge``: merge, optionally re-quantize, print the per-layer table."""
    # lazy: these import torch; --help stays torch-free
    from adalora_deploy.compaction import compaction_report
    from adalora_deploy.merge import merge_adapter
    from adalora_deploy.peft_format import read_compact_adapter

    if args.requantize is None and (args.calibration is not None):
        raise QuantizationError("--calibration only applies with --requantize gptq|rtn")
    if args.group_size != -1 and args.group_size < 1:
        raise QuantizationError(f"--group-size must be -1 or >= 1, got {args.group_size}")
    if not (Path(args.base) / "config.json").is_file():
        raise ArtifactError(f"--base {args.base}: no config.json (expected a local Hugging Face model folder)")
    check_output_dir(args.output, args.overwrite)
    ranks = compaction_report(read_compact_adapter(args.adapter), "adalora")
    report = merge_adapter(args.base, args.adapter, args.output, quantization=args.quantization,
                           double_quant=args.double_quant, force=args.force,
                           requantize=args.requantize, bits=args.bits, group_size=args.group_size,
                           calibration=args.calibration, device=args.device)
    print(ranks.format_table())
    print()
    print(report.format_table())
    kind = f"GPTQ {args.requantize} {args.bits}-bit" if args.requantize else "float (safetensors)"
    print(f"wrote {report.output_dir}: merged {sum(1 for r in report.layers if r.rank)} adapters into the "
          f"{report.base_quantization} base; {kind}")
    return 0
