"""Subcommands of the core: ``train``."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train an AdaLoRA adapter from a YAML config")
    train.add_argument("config", help="YAML run config (sections model, adapter, train)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (YAML syntax); repeatable")
    train.add_argument("--output", default=None, help="output folder (default: runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    train.set_defaults(run=_run_train)

    pipeline = subparsers.add_parser("pipeline", help="train, compact, export and check, end to end")
    pipeline.add_argument("config", help="YAML run config (sections model, adapter, train)")
    pipeline.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                          help="override one config value (YAML syntax); repeatable")
    pipeline.add_argument("--output", default=None, help="output folder (default: runs/<config name>)")
    pipeline.set_defaults(run=_run_pipeline)


def _run_train(args: argparse.Namespace) -> int:
    from adalora_deploy.config import load_run_config
    from adalora_deploy.training import train

    run = load_run_config(args.config, args.overrides)
    output = Path(args.output or Path("runs") / Path(args.config).stem)
    result = train(run, output, resume=args.resume)
    _print_training(result)
    return 0


def _print_training(result) -> None:
    print(f"trained {result.steps} steps: loss {result.first_loss:.4f} -> {result.final_loss:.4f}")
    print(f"{'module':<48} {'rank':>5}")
    for name, rank in result.live_ranks.items():
        print(f"{name:<48} {rank:>5}")
    print(f"adapter: {result.adapter_dir}  (PEFT AdaLoRA format)")


def _run_pipeline(args: argparse.Namespace) -> int:
    from adalora_deploy.config import load_run_config
    from adalora_deploy.training import train

    run = load_run_config(args.config, args.overrides)
    output = Path(args.output or Path("runs") / Path(args.config).stem)
    print("== train")
    result = train(run, output)
    _print_training(result)
    return 0
