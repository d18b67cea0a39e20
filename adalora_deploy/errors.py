"""Every error a user can cause, under one base class.

The command line catches :class:`UserError` alone: its message is printed as one line on stderr and the
process exits with status 2. Anything else is a bug and keeps its traceback.

Each class also derives from the built-in exception it used to be (``ValueError``, ``TypeError``,
``RuntimeError``, ``AssertionError``, ``ImportError``), so code that caught those keeps working. This module
imports nothing, so the onnxruntime-only serving side can use it without torch.
"""

from __future__ import annotations

__all__ = [
    "AdapterMismatchError",
    "ArtifactError",
    "ConfigError",
    "DataError",
    "ExportError",
    "GPTQFormatError",
    "MissingDependencyError",
    "ParityError",
    "ProviderError",
    "QuantizationError",
    "TrainingError",
    "UnsupportedLayerError",
    "UserError",
    "VacuousCheckError",
    "require",
]


class UserError(Exception):
    """An error the user can cause and fix; the message names what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """A configuration value breaks a rule; the message says field, value, rule and fix."""


class ArtifactError(UserError, ValueError):
    """A file we were asked to read is missing, corrupt or not what it claims to be."""


class DataError(UserError, ValueError):
    """A data file is missing, malformed or too short."""


class AdapterMismatchError(UserError, ValueError):
    """An adapter does not fit the base model it is applied to."""


class UnsupportedLayerError(UserError, TypeError):
    """A target module is not a linear layer of a kind we can adapt."""


class GPTQFormatError(UserError, ValueError):
    """A GPTQ checkpoint or packing request is malformed (names the file, key or argument)."""


class QuantizationError(UserError, ValueError):
    """Quantization cannot run on these inputs (bad option, unsupported model, singular Hessian...)."""


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not match the run)."""


class ExportError(UserError, RuntimeError):
    """The model could not be exported; the message says which step failed and why."""


class ParityError(UserError, AssertionError):
    """One or more parity checks failed; the message lists every failure."""


class VacuousCheckError(ParityError, ExportError):
    """The adapter does not change the torch model's output: a parity check would prove nothing."""


class ProviderError(UserError, RuntimeError):
    """An onnxruntime execution provider was asked for that this onnxruntime build does not offer."""


class MissingDependencyError(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


def require(module: str, extra: str, purpose: str):
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra to install.

    Args:
        module: the importable name (``"fastapi"``).
        extra: the adalora-deploy extra that installs it (``"serve"``).
        purpose: what needs it, for the message (``"the OpenAI-compatible server"``).
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"{purpose} needs {module.split('.')[0]} ({error}); install it with: pip install 'adalora-deploy[{extra}]'"
        ) from None
