"""``adalora-deploy train`` and ``run``: a YAML run config, trained alone or as the whole job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adalora_deploy.config import load_run_config
from adalora_deploy.job import run_job

__all__ = ["register", "run_run", "run_train"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train`` and ``run``."""
    train = _add_run_parser(subparsers, "train", "train an AdaLoRA adapter from a YAML config")
    train.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint")
    train.set_defaults(run=run_train)
    job = _add_run_parser(subparsers, "run", "the whole job: prepare the base, evaluate, train, compact, export, "
                                              "check, evaluate the graphs, report (resumable)")
    job.add_argument("--from", dest="from_stage", default=None, metavar="STAGE",
                     help="redo from this stage: prepare, evaluate-base, train, evaluate-trained, compact, export, "
                          "check, evaluate-exports, report")
    job.set_defaults(run=run_run)


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
    return load_run_config(args.config, args.overrides), Path(args.output or Path("runs") / Path(args.config).stem)


def run_train(args: argparse.Namespace) -> int:
    from adalora_deploy.training import train  # lazy: imports torch and transformers; --help stays torch-free

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


def run_run(args: argparse.Namespace) -> int:
    """The whole job; prints each stage as it finishes and where the report is. 1 when a check failed."""
    run, output = _load_run(args)

    def show(name: str, result: dict) -> None:
        print(f"== {name} ({result['stage_seconds']:.1f} s)")
        for key, value in _stage_summary(name, result).items():
            print(f"   {key}: {value}")

    result = run_job(run, output, from_stage=args.from_stage, on_stage=show)
    skipped = [name for name in result.stages if name not in result.ran]
    if skipped:
        print(f"(already done in {output}: {', '.join(skipped)})")
    failed = [name for name, check in result.stages.get("check", {}).get("checks", {}).items() if not check["passed"]]
    print(f"report: {result.report_dir / 'report.md'}")
    if failed:
        print(f"adalora-deploy run: the check failed for {', '.join(failed)}; see {result.report_dir / 'report.md'}",
              file=sys.stderr)
        return 1
    return 0


def _stage_summary(name: str, result: dict) -> dict:
    """The few numbers of a stage worth a line each."""
    if name in ("evaluate-base", "evaluate-trained"):
        return {"held-out": _scores(result)}
    if name == "evaluate-exports":
        return {export: _scores(scores) for export, scores in result["scores"].items()}
    if name == "train":
        return {"loss": f"{result['first_loss']:.4f} -> {result['final_loss']:.4f}", "adapter": result["adapter"],
                "ranks kept": sum(result["live_ranks"].values())}
    if name == "export":
        return {export: f"{info['graph_bytes'] / 1e6:.1f} MB, {info['mode']} {info['weights']}"
                        f"{' serving' if info['serving'] else ''}" for export, info in result["exports"].items()}
    if name == "check":
        return {export: "PASS" if info["passed"] else f"FAIL: {'; '.join(info['failures'][:2])}"
                for export, info in result["checks"].items()}
    if name == "prepare":
        return {"base": result["base_folder"], "examples": f"{result['train_examples']} train, "
                                                           f"{result['eval_examples']} held out"}
    if name == "report":
        return {"folder": result["folder"]}
    return {}


def _scores(result: dict) -> str:
    accuracy = "" if result.get("accuracy") is None else f"accuracy {result['accuracy']:.3f}, "
    perplexity = "" if result.get("perplexity") is None else f" (perplexity {result['perplexity']:.2f})"
    return f"{accuracy}loss {result['loss']:.4f}{perplexity} on {result['examples']}"
