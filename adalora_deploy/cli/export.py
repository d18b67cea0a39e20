"""The ``export`` and ``check`` subcommands (registered by :mod:`adalora_deploy.cli`).

``export`` and ``check`` raise :class:`~adalora_deploy.errors.ExportError` (and the
library's ArtifactError, AdapterMismatchError...) for user errors: the CLI prints one line and exits 2.
A check that runs but misses its tier prints the table and exits 1.
"""

from __future__ import annotations

import argparse
import sys

from adalora_deploy.cli.options import add_base_loading

__all__ = ["register", "run_adapter_file", "run_check", "run_export"]



def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``export``, ``check`` and ``adapter-file``."""
    export = subparsers.add_parser(
        "export",
        help="export a base + AdaLoRA adapter as an ONNX decoding graph (merged or separate)",
        description="Export a base model (float, bnb NF4/FP4/LLM.int8, GPTQ) with an AdaLoRA adapter as one "
                    "KV-cache ONNX graph, with config, tokenizer files and an export.json manifest.",
    )
    export.add_argument("--base", required=True, metavar="MODEL_DIR", help="local Hugging Face (or GPTQ) model folder")
    export.add_argument("--adapter", required=True, metavar="ADAPTER_DIR", help="AdaLoRA adapter folder")
    export.add_argument("--mode", choices=("merged", "separate"), required=True,
                        help="merged: ΔW folded into the dequantized base; separate: quantized base + low-rank branch")
    export.add_argument("--weights", choices=("fp32", "fp16", "int4", "int8"), default="fp32",
                        help="merged graph weights: fp32 (exact), fp16, int4/int8 MatMulNBits at accuracy_level 4 "
                             "(smallest, fastest on CPU); separate mode keeps the base's own (default: fp32)")
    export.add_argument("--serving", action="store_true",
                        help="separate mode: fast lossy kernels (MatMulNBits accuracy_level 4 for GPTQ, NF4/FP4 as "
                             "int4, LLM.int8 as 8-bit) instead of the exact MatMulBnb4 / LLM.int8 emulation")
    add_base_loading(export)
    export.add_argument("--adapter-inputs", action="store_true",
                        help="separate mode: adapter factors as graph inputs with a symbolic rank (one graph, many "
                             "adapters) plus adapter.onnx_adapter")
    export.add_argument("--builder", choices=("auto", "fast", "dynamo"), default="auto",
                        help="fast: build the graph node by node with onnxruntime's fused ops (Llama, Mistral, "
                             "Qwen2); dynamo: torch.onnx.export (any traceable model); auto: fast when possible")
    export.add_argument("--opset", type=int, default=None, help="default-domain opset (default: 20)")
    export.add_argument("--output", required=True, metavar="DIR", help="export folder")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.set_defaults(run=run_export)

    check = subparsers.add_parser(
        "check",
        help="check an exported graph under onnxruntime against its torch model; writes parity.json",
        description="Run the exported graph under onnxruntime and the torch model it came from on held-out "
                    "prompts and a greedy generation (batch 2, left padded); exit 1 when a parity tier is missed.",
    )
    check.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by `adalora-deploy export`")
    check.add_argument("--base", default=None, metavar="MODEL_DIR", help="base folder (default: from export.json)")
    check.add_argument("--adapter", default=None, metavar="ADAPTER_DIR",
                       help="adapter folder (default: from export.json)")
    check.add_argument("--max-new-tokens", type=int, default=12, help="greedy generation length (default: 12)")
    check.add_argument("--decode-steps", type=int, default=3, help="incremental steps compared (default: 3)")
    check.add_argument("--provider", choices=("cpu", "cuda", "auto"), default="cpu", help="onnxruntime provider")
    check.set_defaults(run=run_check)
    _add_adapter_file_parser(subparsers)


def _add_adapter_file_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "adapter-file", help="write an .onnx_adapter for an adapter-inputs export from any adapter of the same base",
        description="Slice an AdaLoRA adapter to its surviving ranks, fold Λ and the scale, and write onnxruntime's "
                    "AdapterFormat file for a graph exported with --adapter-inputs (switch it per run with "
                    "onnxruntime.LoraAdapter + RunOptions.add_active_adapter).")
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="AdaLoRA adapter folder (ours or PEFT's)")
    parser.add_argument("--export", required=True, metavar="EXPORT_DIR", help="an export made with --adapter-inputs")
    parser.add_argument("--output", required=True, metavar="FILE", help="the .onnx_adapter file to write")
    parser.set_defaults(run=run_adapter_file)


def run_adapter_file(args: argparse.Namespace) -> int:
    """Write the file and say how many modules carry a non-zero branch."""
    from adalora_deploy.export.adapter_file import write_adapter_file

    path = write_adapter_file(args.adapter, args.export, args.output)
    print(f"wrote {path} for {args.export}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Export and print a one-paragraph summary."""
    from adalora_deploy.artifacts import check_output_dir
    from adalora_deploy.export.api import export_model
    from adalora_deploy.export.graph import DEFAULT_OPSET

    check_output_dir(args.output, args.overwrite)
    manifest = export_model(
        args.base, args.adapter, output=args.output, mode=args.mode, weights=args.weights,
        quantization=args.quantization, double_quant=args.double_quant, adapter_inputs=args.adapter_inputs,
        serving=args.serving, opset=args.opset or DEFAULT_OPSET, force=args.force, builder=args.builder,
    )
    ranks = ", ".join(f"{name}={rank}" for name, rank in manifest.ranks.items())
    print(f"wrote {args.output}: {manifest.mode} {manifest.weights}{' serving' if manifest.serving else ''}, "
          f"base {manifest.base_kind}, graph {manifest.graph_bytes / 1e6:.2f} MB")
    print(f"arithmetic: {manifest.arithmetic} (tier {manifest.tier}); built by the {manifest.builder} path, "
          f"{sum(manifest.op_counts.values())} nodes")
    print(f"quantized ops: {manifest.quantized_ops or 'none'}; adapter MatMuls: {manifest.adapter_matmuls}")
    print(f"ranks: {ranks}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Check, print the table; 0 when every comparison meets its tier, else 1."""
    from adalora_deploy.export.check import check_export

    if args.max_new_tokens < 1 or args.decode_steps < 0:
        from adalora_deploy.errors import ExportError

        raise ExportError("--max-new-tokens must be >= 1 and --decode-steps >= 0")
    report = check_export(args.export_dir, base=args.base, adapter=args.adapter, decode_steps=args.decode_steps,
                          max_new_tokens=args.max_new_tokens, provider=args.provider)
    print(report.format_table())
    if not report.passed:
        print(f"adalora-deploy check: {len(report.failures)} parity failure(s); see {args.export_dir}/parity.json",
              file=sys.stderr)
        return 1
    return 0
