"""Arguments that several commands share, defined once."""

from __future__ import annotations

import argparse

from adalora_deploy.quantization import QUANTIZATIONS

__all__ = ["add_base_loading"]


def add_base_loading(parser: argparse.ArgumentParser) -> None:
    """``--quantization``, ``--double-quant`` and ``--force``: how to load the base a trained adapter needs.

    Read by :func:`adalora_deploy.models.resolve_quantization`: by default the base is loaded as the
    training run recorded it (``run.json`` beside the adapter), and a contradicting choice needs ``--force``.
    """
    parser.add_argument("--quantization", choices=("auto", *QUANTIZATIONS), default="auto",
                        help="how to load the base (default auto: GPTQ folders are detected, else the training "
                             "run's run.json beside the adapter, else none)")
    parser.add_argument("--double-quant", action="store_true", default=None,
                        help="bnb 4-bit: double-quantized statistics (default: as in the training run)")
    parser.add_argument("--force", action="store_true",
                        help="accept a --quantization/--double-quant that contradicts the training run record")
