"""``adalora-deploy``: the command line.

Every error a user can cause ends in one line on stderr and exit status 2; an interrupted run exits 130.
Each subcommand lives with the code it drives and registers itself through ``add_parser(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

__all__ = ["main"]

logger = logging.getLogger("adalora_deploy")

# Modules that register subcommands, in the order they are listed in --help.
_COMMAND_MODULES = (
    "adalora_deploy.commands",
    "adalora_deploy.compaction_commands",
    "adalora_deploy.quantize",
    "adalora_deploy.export.commands",
)


# Exceptions a user can cause; each ends in one line and exit status 2.
_USER_ERRORS = (
    ("adalora_deploy.artifacts", "ArtifactError"),
    ("adalora_deploy.backends", "UnsupportedLayerError"),
    ("adalora_deploy.backends.gptq", "GPTQFormatError"),
    ("adalora_deploy.checkpoint", "AdapterMismatchError"),
    ("adalora_deploy.config", "ConfigError"),
    ("adalora_deploy.data", "DataError"),
    ("adalora_deploy.quantize", "QuantizationError"),
    ("adalora_deploy.training", "TrainingError"),
    ("adalora_deploy.export", "ExportError"),
)


def _user_errors() -> tuple[type[BaseException], ...]:
    errors = []
    for module_name, class_name in _USER_ERRORS:
        try:
            errors.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            logger.debug("error type %s.%s unavailable", module_name, class_name)
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adalora-deploy", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as error:
            logger.debug("commands of %s unavailable: %s", name, error)
            continue
        if hasattr(module, "add_parser"):
            module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own loggers at INFO; libraries (onnxscript's rewriter, torch's exporter, bitsandbytes' optional
    # kernel notices) only at WARNING, or everything with --verbose. transformers draws its own bars.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for name in ("adalora_deploy", "export"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for name in ("bitsandbytes", "torch.onnx"):  # optional-kernel and optional-torchvision notices
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished artifacts and the last checkpoint are intact", file=sys.stderr)
        return 130
    except _user_errors() as error:
        print(f"adalora-deploy {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
