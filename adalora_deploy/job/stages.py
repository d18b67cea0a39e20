"""The stages of ``adalora-deploy run``, in the order they run (the package docstring says what each does).

Its own module so that the runner, which runs them, and the report, which lists their timings, both read
it without importing each other.
"""

from __future__ import annotations

__all__ = ["STAGES"]

STAGES = ("prepare", "evaluate-base", "train", "evaluate-trained", "compact", "export", "check", "evaluate-exports",
          "report")
