"""lm-evaluation-harness tasks on the job's exports (``task.lm_eval`` in the config): each export is scored by
the in-process model :class:`adalora_deploy.export.runtime.lm_eval_model.AdaloraDeployLM`, on local task YAML files
only (datasets runs offline: nothing is downloaded), and the report lists each task's metrics beside the
built-in held-out accuracy."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

from adalora_deploy.errors import ConfigError, require

__all__ = ["lm_eval_scores", "report_lines", "task_names"]

logger = logging.getLogger(__name__)


def task_names(files: Sequence[str | Path]) -> list[str]:
    """The ``task:`` name of each task YAML file.

    Raises:
        ConfigError: a missing file, or one without a ``task:`` name.
    """
    names = []
    for file in map(Path, files):
        if not file.is_file():
            raise ConfigError(f"task.lm_eval: {file} does not exist; list lm-eval task YAML files")
        # lm-eval's YAML may hold tags such as !function that a plain YAML reader refuses: read the name only
        match = re.search(r"^task:\s*['\"]?([^'\"\s#]+)", file.read_text(encoding="utf-8"), re.MULTILINE)
        name = match.group(1) if match else None
        if not isinstance(name, str) or not name:
            raise ConfigError(f"task.lm_eval: {file} has no top-level `task: NAME` line")
        names.append(name)
    return names


def lm_eval_scores(export_dir: str | Path, files: Sequence[str | Path], *, batch_size: int = 8) -> dict[str, Any]:
    """Every metric of every task in ``files`` for the export in ``export_dir``: ``{task: {metric: value}}``."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local data files only, never the Hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lm_eval = require("lm_eval", "lmeval", "task.lm_eval (lm-evaluation-harness tasks)")
    from lm_eval.tasks import TaskManager

    # lazy: imports lm-eval, an optional extra
    from adalora_deploy.export.runtime.lm_eval_model import AdaloraDeployLM

    names = task_names(files)
    folders = sorted({str(Path(f).resolve().parent) for f in files})
    model = AdaloraDeployLM(export=str(export_dir), batch_size=batch_size)
    results = lm_eval.simple_evaluate(model=model, tasks=names, task_manager=TaskManager(include_path=folders))
    return {task: {metric: value for metric, value in values.items() if isinstance(value, (int, float))
                   and not isinstance(value, bool)} for task, values in results["results"].items()}


def report_lines(scores: dict[str, dict[str, Any]]) -> list[str]:
    """The report's table of lm-eval metrics per export (``scores``: export -> evaluate-exports result)."""
    rows = [(name, task, metric, value) for name, result in scores.items()
            for task, metrics in (result.get("lm_eval") or {}).items() for metric, value in metrics.items()
            if "stderr" not in metric]
    if not rows:
        return []
    lines = ["", "lm-evaluation-harness tasks (`task.lm_eval`) on each export, in process:", "",
             "| export | task | metric | value |", "|---|---|---|---|"]
    return lines + [f"| {name} | {task} | {metric} | {value:.3f} |" for name, task, metric, value in rows]
