"""``adalora-deploy train`` and ``pipeline``: run a YAML run config."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["register", "run_pipeline", "run_train"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``pipeline``."""
    train = _add_run_parser(subparsers, "train", "train an AdaLoRA adapter from a YAML config")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    train.set_defaults(run=run_train)
    pipeline = _add_run_parser(subparsers, "pipeline", "train, compact, export and check, end to end")
    pipeline.set_defaults(run=run_pipeline)


def _add_run_parser(subparsers: argparse._SubParsersAction, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that runs a YAML run config: CONFIG, --set overrides, --output."""
    parser = subparsers.add_parser(name, help=help)
    parser.add_argument("config", help="YAML run config (sections model, adapter, train)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (YAML syntax); repeatable")
    parser.add_argument("--output", default=None, help="output folder (default: runs/<config name>)")
    return parser


def _load_run(args: argparse.Namespace):
    """The validated run config and the output folder of a run subcommand."""
    from adalora_deploy.config import load_run_config

    return load_run_config(args.config, args.overrides), Path(args.output or Path("runs") / Path(args.config).stem)


def run_train(args: argparse.Namespace) -> int:
    from adalora_deploy.training import train

    run, output = _load_run(args)
    result = train(run, output, resume=args.resume)
    _print_training(result)
    return 0


def _print_training(result) -> None:
    print(f"trained {result.steps} steps: loss {result.first_loss:.4f} -> {result.final_loss:.4f}")
    print(f"{'module':<48} {'rank':>5}")
    for name, rank in result.live_ranks.items():
        print(f"{name:<48} {rank:>5}")
    print(f"adapter: {result.adapter_dir}  (PEFT AdaLoRA format)")


def run_pipeline(args: argparse.Namespace) -> int:
    """train -> compact (AdaLoRA and LoRA) -> export merged and separate -> check each under onnxruntime."""
    from adalora_deploy.compaction import compact_adapter
    from adalora_deploy.export.api import export_model
    from adalora_deploy.export.check import check_export
    from adalora_deploy.training import train

    run, output = _load_run(args)
    print("== train")
    result = train(run, output)
    _print_training(result)
    print("\n== compact")
    for fmt in ("adalora", "lora"):
        report = compact_adapter(result.adapter_dir, output / f"adapter-{fmt}", format=fmt)
        print(f"{fmt:>8}: {report.params_after} of {report.params_before} adapter parameters -> {report.output_dir}")
    failures = 0
    for mode in ("merged", "separate"):
        print(f"\n== export {mode}")
        export_dir = output / f"onnx-{mode}"
        manifest = export_model(result.base_model, result.adapter_dir, output=export_dir, mode=mode,
                                quantization=run.model.quantization, double_quant=run.model.double_quant)
        print(f"{export_dir}: {manifest.graph_bytes / 1e6:.2f} MB, {manifest.arithmetic}, "
              f"adapter MatMuls {manifest.adapter_matmuls}")
        print(f"== check {mode}")
        check = check_export(export_dir)
        print(check.format_table())
        failures += not check.passed
    if failures:
        print(f"adalora-deploy pipeline: {failures} export(s) failed their parity check", file=sys.stderr)
        return 1
    print(f"\nall stages passed; artifacts in {output}")
    return 0
