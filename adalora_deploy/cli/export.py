"""The ``export`` and ``check`` subcommands (registered by :mod:`adalora_deploy.cli`).

``export`` and ``check`` raise :class:`~adalora_deploy.errors.ExportError` (and the
library's ArtifactError, AdapterMismatchError...) for user errors: the CLI prints one line and exits 2.
A check that runs but misses its tier prints the table and exits 1.
"""

from __future__ import annotations

import argparse
import sys

from adalora_deploy.artifacts import check_output_dir
from adalora_deploy.cli.options import add_base_loading
from adalora_deploy.errors import ExportError
from adalora_deploy.quantization import GPTQ_METHODS

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
    export.add_argument("--requantize", choices=GPTQ_METHODS, default=None,
                        help="--weights int4/int8: how the merged weights are re-quantized: gptq (error-compensating "
                             "on --calibration text; default) or rtn (round-to-nearest)")
    export.add_argument("--calibration", default=None, metavar="FILE",
                        help="--requantize gptq: calibration text (.txt/.jsonl), ideally like the task's "
                             "(default: the packaged sample text)")
    export.add_argument("--calibration-samples", type=int, default=None,
                        help="calibration sequences (default: 32)")
    export.add_argument("--calibration-seq-len", type=int, default=None,
                        help="tokens per calibration sequence (default: 128)")
    export.add_argument("--text", default=None, metavar="FILE",
                        help="held-out text (.txt/.jsonl) for the agreement with the trained model measured after "
                             "the export (default: a packaged held-out passage)")
    export.add_argument("--serving", action="store_true",
                        help="separate mode: fast lossy kernels (MatMulNBits accuracy_level 4 for GPTQ, NF4/FP4 as "
                             "int4, LLM.int8 as 8-bit) instead of the exact MatMulBnb4 / LLM.int8 emulation")
    add_base_loading(export)
    export.add_argument("--adapter-inputs", action="store_true",
                        help="separate mode: adapter factors as graph inputs with a symbolic rank (one graph, many "
                             "adapters) plus adapter.onnx_adapter")
    export.add_argument("--builder", choices=("auto", "fast", "dynamo"), default="auto",
                        help="fast: build the graph node by node with onnxruntime's fused ops (Llama, Mistral, "
                             "Qwen2, Qwen3, Gemma, Gemma2, Gemma3, Phi-3); dynamo: torch.onnx.export (any "
                             "traceable model); auto: fast when possible")
    export.add_argument("--opset", type=int, default=None, help="default-domain opset (default: 20)")
    export.add_argument("--output", required=True, metavar="DIR", help="export folder")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    export.set_defaults(run=run_export)

    check = subparsers.add_parser(
        "check",
        help="judge an exported graph under onnxruntime against the trained model; writes parity.json",
        description="Run the exported graph under onnxruntime against the trained model (base as trained + "
                    "adapter) on held-out text and greedy generations, and against its own torch twin; with "
                    "--eval, task accuracy and perplexity too. Exit 1 when the graph misses its tier.",
    )
    check.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by `adalora-deploy export`")
    check.add_argument("--base", default=None, metavar="MODEL_DIR", help="base folder (default: from export.json)")
    check.add_argument("--adapter", default=None, metavar="ADAPTER_DIR",
                       help="adapter folder (default: from export.json)")
    check.add_argument("--eval", dest="eval_file", default=None, metavar="FILE",
                       help="eval file (JSONL: {\"prompt\", \"choices\", \"label\"} task lines and/or {\"text\"} "
                            "lines): task accuracy and perplexity of the graph beside the trained model's, judged")
    check.add_argument("--text", default=None, metavar="FILE",
                       help="held-out text (.txt/.jsonl) for the next-token agreement (default: the eval file's "
                            "text, else a packaged held-out passage)")
    check.add_argument("--positions", type=int, default=None,
                       help="held-out token positions compared with the trained model (default: 512)")
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
    from adalora_deploy.export.build.adapter_file import write_adapter_file  # lazy: torch and onnx

    path = write_adapter_file(args.adapter, args.export, args.output)
    print(f"wrote {path} for {args.export}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Export and print a one-paragraph summary."""
    # lazy: these import torch and onnx; --help and serve stay torch-free
    from adalora_deploy.export.api import CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN, export_model
    from adalora_deploy.export.build.graph import DEFAULT_OPSET

    requantizing = args.mode == "merged" and args.weights in ("int4", "int8")
    if not requantizing and args.requantize is not None:
        raise ExportError("--requantize applies to --mode merged --weights int4/int8")
    calibration_options = (args.calibration, args.calibration_samples, args.calibration_seq_len)
    if (not requantizing or args.requantize == "rtn") and any(v is not None for v in calibration_options):
        raise ExportError("--calibration* options apply to --mode merged --weights int4/int8 with --requantize gptq")
    check_output_dir(args.output, args.overwrite)
    manifest = export_model(
        args.base, args.adapter, output=args.output, mode=args.mode, weights=args.weights,
        quantization=args.quantization, double_quant=args.double_quant, adapter_inputs=args.adapter_inputs,
        serving=args.serving, opset=args.opset or DEFAULT_OPSET, force=args.force, builder=args.builder,
        requantize=args.requantize or "gptq", calibration=args.calibration,
        calibration_samples=args.calibration_samples or CALIBRATION_SAMPLES,
        calibration_seq_len=args.calibration_seq_len or CALIBRATION_SEQ_LEN, agreement_text=args.text,
    )
    ranks = ", ".join(f"{name}={rank}" for name, rank in manifest.ranks.items())
    print(f"wrote {args.output}: {manifest.mode} {manifest.weights}{' serving' if manifest.serving else ''}, "
          f"base {manifest.base_kind}, graph {manifest.graph_bytes / 1e6:.2f} MB")
    print(f"arithmetic: {manifest.arithmetic} (tier {manifest.tier}); built by the {manifest.builder} path, "
          f"{sum(manifest.op_counts.values())} nodes")
    print(f"quantized ops: {manifest.quantized_ops or 'none'}; "
          f"adapter products (MatMul, Gemm): {manifest.adapter_matmuls}")
    print(f"ranks: {ranks}")
    if manifest.requantization is not None:
        r = manifest.requantization
        extra = (f" on {r['samples']} x {r['seq_len']} tokens of {r['calibration']}, worst layer output SQNR "
                 f"{r['worst_output_sqnr_db']:.1f} dB" if r["method"] == "gptq" else "")
        print(f"re-quantized: {r['method']} {r['bits']}-bit, block {r['block_size']}{extra}")
    a = manifest.agreement
    if a is not None:
        print(f"agreement with the trained model on {a['positions']} held-out positions: top-1 {a['top1']:.4f}, "
              f"mean KL {a['mean_kl']:.3g}, max abs {a['max_abs']:.3g} -> {a['tier']} tier "
              f"{'met' if a['passed'] else 'MISSED'}")
        if not a["passed"]:
            from adalora_deploy.export.build.kinds import keeping_exports  # lazy: imports torch

            print(f"warning: this graph changes what the trained model computes; "
                  f"{keeping_exports(manifest.quantization, manifest.mode, manifest.weights, manifest.serving)}",
                  file=sys.stderr)
    return 0


def run_check(args: argparse.Namespace) -> int:
    """Check, print the table; 0 when every comparison meets its tier, else 1."""
    from adalora_deploy.export.judge.check import check_export  # lazy: imports torch; --help stays torch-free

    if args.max_new_tokens < 1 or args.decode_steps < 0:
        raise ExportError("--max-new-tokens must be >= 1 and --decode-steps >= 0")
    if args.positions is not None and args.positions < 2:
        raise ExportError("--positions must be >= 2")
    report = check_export(args.export_dir, base=args.base, adapter=args.adapter, text=args.text,
                          eval_file=args.eval_file, positions=args.positions, decode_steps=args.decode_steps,
                          max_new_tokens=args.max_new_tokens, provider=args.provider)
    print(report.format_table())
    if not report.passed:
        print(f"adalora-deploy check: {len(report.failures)} parity failure(s); see {args.export_dir}/parity.json",
              file=sys.stderr)
        return 1
    return 0
