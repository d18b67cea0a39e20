"""``adalora-deploy quantize``: a float model folder to a GPTQ checkpoint (GPTQ solver or round-to-nearest)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from adalora_deploy.artifacts import check_output_dir
from adalora_deploy.errors import QuantizationError
from adalora_deploy.gptq import SUPPORTED_BITS
from adalora_deploy.quantization import GPTQ_METHODS

__all__ = ["register", "run_quantize"]

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``quantize``."""
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a float model folder to a GPTQ checkpoint (GPTQ or round-to-nearest)",
        description="Quantize the linears of a local Hugging Face causal-LM folder and write a GPTQ checkpoint.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="local Hugging Face model folder (float weights)")
    parser.add_argument("--method", choices=GPTQ_METHODS, default="gptq", help="solver (default: gptq)")
    parser.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4, help="bits per weight (default: 4)")
    parser.add_argument(
        "--group-size", type=int, default=128, help="input channels per group, -1 for one (default: 128)"
    )
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid (written as gptq_v2)")
    parser.add_argument(
        "--desc-act", action="store_true", help="act-order: quantize columns by decreasing Hessian diagonal"
    )
    parser.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration text (.txt or .jsonl); required by gptq; rtn uses it only with --measure-error",
    )
    parser.add_argument(
        "--measure-error",
        action="store_true",
        help="rtn: measure each layer's output error on --calibration (runs calibration forwards; "
        "without it rtn runs no forward and reports weight errors)",
    )
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample (default: 128)")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples, at most (default: 128)")
    parser.add_argument(
        "--percdamp", type=float, default=0.01, help="GPTQ damping, fraction of mean diag(H) (default: 0.01)"
    )
    parser.add_argument(
        "--no-true-sequential",
        dest="true_sequential",
        action="store_false",
        help="gptq: take all Hessians of a decoder layer from one pass of the float layer "
        "(default: each group of linears sees the already-quantized ones before it)",
    )
    parser.add_argument(
        "--act-group-aware",
        action="store_true",
        help="gptq: group-aware reordering (GAR): visit groups and their columns by decreasing diag(H), "
        "keeping natural groups (an ordinary desc_act=False checkpoint)",
    )
    parser.add_argument(
        "--tables",
        action="store_true",
        help="quantize the lm_head too (same bits and groups; GPTQ on the final hidden states), and a tied "
        "embedding with it as one table: the export then holds it as int4/int8 blocks the adapter trained on",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward (default: 8)")
    parser.add_argument(
        "--calibration-dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="run calibration forwards under autocast to this dtype (bfloat16: faster on CPUs with AMX; "
        "default: the model's float32)",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="output GPTQ model folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(run=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    """Quantize ``args.model_dir`` and write ``args.output``; prints the per-layer error table.

    Raises:
        QuantizationError: bad options or an unreadable model folder (the caller maps it to exit 2).
    """
    import torch  # lazy: the CLI's --help and serve stay torch-free
    from transformers import AutoTokenizer  # lazy: as torch

    from adalora_deploy.architectures import check_model_folder  # lazy: imports torch
    from adalora_deploy.data import calibration_blocks  # lazy: imports torch
    from adalora_deploy.gptq.folder import quantize_folder  # lazy: imports torch

    model_dir = Path(args.model_dir)
    output = Path(args.output)
    if not (model_dir / "config.json").is_file():
        raise QuantizationError(f"MODEL_DIR {model_dir}: no config.json (expected a local Hugging Face model folder)")
    check_model_folder(model_dir)
    if args.samples < 1:
        raise QuantizationError(f"--samples must be >= 1, got {args.samples}")
    if args.group_size != -1 and args.group_size < 1:
        raise QuantizationError(f"--group-size must be -1 or >= 1, got {args.group_size}")
    if args.desc_act and args.method == "rtn":
        raise QuantizationError("--desc-act only applies to --method gptq")
    if args.batch_size < 1:
        raise QuantizationError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.method == "gptq" and not args.calibration:
        raise QuantizationError("--method gptq needs --calibration FILE")
    if args.measure_error and not args.calibration:
        raise QuantizationError("--measure-error needs --calibration FILE")
    use_calibration = args.method == "gptq" or args.measure_error
    if args.calibration and not use_calibration:
        logger.info("rtn needs no calibration: %s is not read (add --measure-error to measure errors on it)",
                    args.calibration)
    check_output_dir(output, args.overwrite)
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as error:
        raise QuantizationError(f"MODEL_DIR {model_dir}: cannot load model/tokenizer ({error})") from None
    tokenizer_seconds = time.perf_counter() - started
    blocks = calibration_blocks(args.calibration, tokenizer, args.seq_len, args.samples) if use_calibration else None
    done = quantize_folder(
        model_dir,
        output,
        blocks,
        overwrite=args.overwrite,
        method=args.method,
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        desc_act=args.desc_act,
        percdamp=args.percdamp,
        batch_size=args.batch_size,
        true_sequential=args.true_sequential,
        act_group_aware=args.act_group_aware,
        tables=args.tables,
        calibration_dtype=None if args.calibration_dtype is None else getattr(torch, args.calibration_dtype),
        progress=sys.stderr.isatty(),
    )
    report = done.report
    group = "all" if args.group_size == -1 else args.group_size
    calibration = (
        f"{report.num_samples} samples x {report.seq_len} tokens" if report.num_samples else "no calibration"
    )
    print(
        f"{args.method} {args.bits}-bit, group {group}, {'sym' if args.sym else 'asym'}"
        f"{', act-order' if args.desc_act else ''}{', group-aware order' if args.act_group_aware else ''}; "
        f"{calibration}; {report.seconds:.1f} s"
    )
    print(report.format_table())
    print(f"worst SQNR {report.worst_sqnr_db:.2f} dB; wrote {output}")
    print(f"time: load {tokenizer_seconds + done.load_seconds:.1f} s, quantize {report.timings.format()}, "
          f"save {done.save_seconds:.1f} s")
    return 0
