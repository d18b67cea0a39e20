"""``adalora-deploy``: the command line.

One module per command group, each with ``register(subparsers)`` and one ``run_<command>(args) -> int``
handler per command; handlers import the heavy libraries they need, so ``--help`` stays instant.

Every error a user can cause (:class:`adalora_deploy.errors.UserError`) ends in one line on stderr and exit
status 2; an interrupted run exits 130; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from adalora_deploy.cli import adapter, export, quantize, serve, train
from adalora_deploy.errors import UserError

__all__ = ["build_parser", "main"]

DESCRIPTION = ("AdaLoRA from fine-tuning to edge deployment: train on float or quantized bases, compact to the "
               "surviving ranks, export ONNX, check parity under onnxruntime, generate and serve with onnxruntime.")

COMMAND_GROUPS = (train, quantize, adapter, export, serve)
"""Modules that register subcommands, in the order ``--help`` lists them."""

EXTRA_OF_MODULE = {"torch": "train", "transformers": "train", "bitsandbytes": "train", "safetensors": "train",
                   "onnx": "train", "onnxscript": "train", "tqdm": "train", "peft": "peft"}
"""Optional packages the commands import inside their handlers, and the extra that installs each (the base
install has only the command line; ``serve``'s own packages raise MissingDependencyError where they are used)."""

LIBRARY_LOGGERS = ("bitsandbytes", "torch.onnx")
"""Optional-kernel and optional-torchvision notices: shown only with --verbose."""


def build_parser() -> argparse.ArgumentParser:
    """The parser with every subcommand registered."""
    parser = argparse.ArgumentParser(prog="adalora-deploy", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(subparsers)
    return parser


def _configure_logging(verbose: bool) -> None:
    # Our own loggers at INFO; libraries (onnxscript's rewriter, torch's exporter, bitsandbytes' optional
    # kernel notices) only at WARNING, or everything with --verbose. transformers draws its own bars.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("adalora_deploy").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the serving install has no transformers
        return
    hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the process exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm-eval"]:  # everything after it is lm-eval's, options included
        argv = ["lm-eval", "--", *argv[1:]]
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished artifacts and the last checkpoint are intact", file=sys.stderr)
        return 130
    except UserError as error:
        print(f"adalora-deploy {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        package = (error.name or "").split(".")[0]
        if package not in EXTRA_OF_MODULE:
            raise
        print(f"adalora-deploy {args.command}: error: this command needs {package}, which is not installed: "
              f"pip install 'adalora-deploy[{EXTRA_OF_MODULE[package]}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
