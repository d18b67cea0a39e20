"""The report of ``adalora-deploy run``: report.md, report.json and four PNG plots a reader needs no code for.

    loss.png       training loss per optimizer step (and its moving average), held-out loss where measured
    budget.png     the global rank budget b(t) of the cubic schedule and the triplets alive, with the phases
    ranks.png      surviving rank per layer (rows) and module (columns), as in the AdaLoRA paper's Figure 3
    accuracy.png   task accuracy (or held-out loss) of the base, the trained model and every exported graph
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from adalora_deploy.artifacts import atomic_file, write_json
from adalora_deploy.config import RunConfig
from adalora_deploy.errors import require
from adalora_deploy.job.lm_eval_stage import report_lines
from adalora_deploy.job.stages import STAGES
from adalora_deploy.peft_format import read_rank_pattern

__all__ = ["write_report"]

PLOTS = ("loss.png", "budget.png", "ranks.png", "accuracy.png")


def _metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _rank_grid(adapter: Path, order: Sequence[str] = ()) -> tuple[list[int], list[str], dict[tuple[int, str], int], int]:
    """``(layers, modules, rank per (layer, module), init_r)`` of an adapter.

    A module's layer is the first number in its name (``model.layers.3.self_attn.q_proj``: layer 3,
    module ``q_proj``); modules outside numbered layers have no row. Modules come in ``order`` (the run
    config's target_modules, as the user listed them: adapter files store names sorted), others after it
    alphabetically.
    """
    config, masks = read_rank_pattern(adapter)
    ranks: dict[tuple[int, str], int] = {}
    for name, mask in masks.items():
        parts = name.split(".")
        layer = next((int(part) for part in parts if part.isdigit()), None)
        if layer is not None:
            ranks[(layer, parts[-1])] = sum(mask)
    layers = sorted({layer for layer, _ in ranks})
    order = [name.rsplit(".", 1)[-1] for name in order]
    modules = sorted({module for _, module in ranks},
                     key=lambda m: (order.index(m) if m in order else len(order), m))
    return layers, modules, ranks, config.init_r


def _plot(run: RunConfig, stages: dict[str, dict[str, Any]], folder: Path) -> None:
    matplotlib = require("matplotlib", "train", "the run report's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metrics = _metrics(Path(stages["train"]["metrics"]))
    steps = [m["step"] for m in metrics]
    adapter = run.adapter
    final = adapter.total_step - max(adapter.tfinal, 1)

    def save(figure, name: str) -> None:
        figure.tight_layout()
        with atomic_file(folder / name) as temp:
            figure.savefig(temp, format="png", dpi=120)
        plt.close(figure)

    # loss
    figure, axis = plt.subplots(figsize=(7, 4))
    losses = np.array([m["loss"] for m in metrics])
    axis.plot(steps, losses, color="0.7", linewidth=1, label="training loss (per step)")
    window = max(1, len(losses) // 10)
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        axis.plot(steps[window - 1:], smooth, color="tab:blue", linewidth=2, label=f"training loss ({window}-step mean)")
    held = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if held:
        axis.plot(*zip(*held), "o-", color="tab:orange", label="held-out loss")
    axis.set(xlabel="optimizer step", ylabel="loss (nats per trained token)", title="Training and held-out loss")
    axis.legend()
    save(figure, "loss.png")

    # budget
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(steps, [m["budget"] for m in metrics], color="tab:blue", linewidth=2, label="budget b(t) (cubic schedule)")
    axis.plot(steps, [m["live_ranks"] for m in metrics], ".", color="tab:green", markersize=4, label="triplets alive")
    axis.axvline(adapter.tinit, color="0.5", linestyle="--", linewidth=1)
    axis.axvline(final, color="0.5", linestyle=":", linewidth=1)
    axis.text(adapter.tinit, axis.get_ylim()[1], " warm-up ends", va="top", fontsize=8)
    axis.text(final, axis.get_ylim()[1], " rank pattern frozen", va="top", fontsize=8)
    axis.set(xlabel="optimizer step", ylabel="rank triplets (all layers)",
             title=f"Rank budget: {adapter.init_r} -> {adapter.target_r} per adapted module on average")
    axis.legend(loc="center right")
    save(figure, "budget.png")

    # ranks heatmap
    targets = adapter.target_modules if isinstance(adapter.target_modules, list) else ()
    layers, modules, ranks, init_r = _rank_grid(Path(stages["train"]["adapter"]), targets)
    grid = np.array([[ranks.get((layer, module), 0) for module in modules] for layer in layers])
    figure, axis = plt.subplots(figsize=(1.1 * len(modules) + 2.5, 0.28 * len(layers) + 1.8))
    image = axis.imshow(grid, cmap="viridis", vmin=0, vmax=init_r, aspect="auto")
    axis.set_xticks(range(len(modules)), modules, rotation=30, ha="right")
    axis.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    for (i, j), value in np.ndenumerate(grid):
        axis.text(j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value < init_r / 2 else "black")
    axis.set(xlabel="module", ylabel="layer", title=f"Surviving rank per layer and module (of init_r {init_r})")
    figure.colorbar(image, ax=axis, label="rank")
    save(figure, "ranks.png")

    # accuracy (or held-out loss without a task)
    rows = _score_rows(stages)
    key = "accuracy" if all(r["accuracy"] is not None for r in rows) else "loss"
    figure, axis = plt.subplots(figsize=(max(5, 1.3 * len(rows) + 2), 4))
    colors = ["0.6", "tab:blue"] + ["tab:green"] * (len(rows) - 2)
    bars = axis.bar([r["label"] for r in rows], [r[key] for r in rows], color=colors)
    axis.bar_label(bars, fmt="%.3f")
    if key == "accuracy":
        axis.set_ylim(0, 1.05)
    axis.set(ylabel="held-out accuracy" if key == "accuracy" else "held-out loss",
             title="Before training, after training, and deployed" if key == "accuracy" else "Held-out loss")
    axis.tick_params(axis="x", rotation=20)
    save(figure, "accuracy.png")


def _score_rows(stages: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = [dict(stages["evaluate-base"], label="base"), dict(stages["evaluate-trained"], label="trained (torch)")]
    for name, result in stages.get("evaluate-exports", {}).get("scores", {}).items():
        rows.append(dict(result, label=name))
    return rows


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def answer_agreement(trained: dict[str, Any], row: dict[str, Any]) -> dict[str, int] | None:
    """How often a model chose the trained model's answer on the held-out examples, and where they part which one
    was right; ``None`` without per-example answers (no choices, or a job recorded before they were kept).

    With int8 activations a graph and the trained model each round their own activations, so a few borderline
    examples can go either way and equal accuracies can hide answers that differ. ``p_value`` is McNemar's exact
    test on the examples where one of them is right: how likely a split at least that uneven is when neither is
    better (a graph that computes the trained model, rounding apart, gives a large one)."""
    mine, theirs = row.get("answers"), trained.get("answers")
    if not mine or not theirs or len(mine) != len(theirs):
        return None
    labels = trained.get("labels")
    same = sum(a == b for a, b in zip(mine, theirs))
    result = {"same": same, "examples": len(mine)}
    if labels and len(labels) == len(mine):
        result["only_graph_right"] = sum(a == y != b for a, b, y in zip(mine, theirs, labels))
        result["only_trained_right"] = sum(b == y != a for a, b, y in zip(mine, theirs, labels))
        result["p_value"] = mcnemar_exact(result["only_graph_right"], result["only_trained_right"])
    return result


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of ``b`` against ``c`` discordant pairs (binomial, n = b + c, p = 1/2)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def write_report(run: RunConfig, output: Path, stages: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Write ``output/report/`` (report.md, report.json, plots); returns the report.json content."""
    folder = output / "report"
    folder.mkdir(parents=True, exist_ok=True)
    _plot(run, stages, folder)
    rows = _score_rows(stages)
    checks = stages.get("check", {}).get("checks", {})
    exports = stages.get("export", {}).get("exports", {})
    base, trained = rows[0], rows[1]
    ranks = stages["train"]["live_ranks"]
    kept, total = sum(ranks.values()), run.adapter.init_r * len(ranks)
    title = f"{Path(run.source).stem if run.source else 'run'}: AdaLoRA on {stages['prepare']['model_folder']}"
    lines = [f"# {title}", "",
             f"Base loaded as **{run.model.quantization}** ({stages['prepare']['base_folder']}); "
             f"{stages['prepare']['train_examples']} training examples ({stages['prepare']['format']}), "
             f"{base['examples']} held out. AdaLoRA on {len(ranks)} modules, init_r {run.adapter.init_r} -> "
             f"target_r {run.adapter.target_r}, {run.train.steps} steps: {kept} of {total} rank triplets survive.",
             "", "| model | held-out accuracy | held-out loss | perplexity | graph MB | check vs trained |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        export = exports.get(row["label"], {})
        check = checks.get(row["label"])
        verdict = "-" if check is None else ("PASS" if check["passed"] else "FAIL") + (
            f" (teacher-forced; free-running top-1 {check['free_running_top1']:.3f})"
            if check.get("verdict") == "teacher-forced" else
            f" (top-1 {check['source_top1']:.3f})" if check.get("source_top1") is not None else "")
        size = _fmt(export["graph_bytes"] / 1e6, 1) if export else "-"
        lines.append(f"| {row['label']} | {_fmt(row['accuracy'])} | {_fmt(row['loss'])} | {_fmt(row['perplexity'], 2)} "
                     f"| {size} | {verdict} |")
    agreement = {row["label"]: answer_agreement(trained, row) for row in rows[2:]}
    if base["accuracy"] is not None:
        lines += ["", f"Training moved held-out accuracy from {base['accuracy']:.3f} to {trained['accuracy']:.3f} "
                      f"({100 * (trained['accuracy'] - base['accuracy']):+.1f} points)."]
        for row in rows[2:]:
            same = agreement[row["label"]]
            agree = "" if same is None else (
                f"; it gives the trained model's answer on {same['same']} of {same['examples']} examples"
                + (f", and of the {same['examples'] - same['same']} others it is right on {same['only_graph_right']}"
                   f" (McNemar's exact p = {same['p_value']:.2f}: "
                   + ("a split this even is what rounding alone gives" if same["p_value"] >= 0.05
                      else "more uneven than rounding alone gives") + ")"
                   if "only_graph_right" in same and same["same"] < same["examples"] else ""))
            lines.append(f"- `{row['label']}` under onnxruntime: {row['accuracy']:.3f} "
                         f"({100 * (row['accuracy'] - trained['accuracy']):+.1f} points against the trained model)"
                         f"{agree}.")
    lines += report_lines(stages.get("evaluate-exports", {}).get("scores", {}))
    if exports:
        lines += ["", "| export | what the graph computes | nodes | export s |", "|---|---|---|---|"]
        for name, export in exports.items():
            lines.append(f"| {name} | {export['arithmetic']} | {export['nodes']} | {_fmt(export['seconds'], 1)} |")
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {_fmt(stages[name].get('stage_seconds'), 1)} |" for name in STAGES if name in stages]
    lines += ["", "![training and held-out loss](loss.png)", "", "![rank budget](budget.png)", "",
              "![surviving ranks](ranks.png)", "", "![accuracy](accuracy.png)", ""]
    with atomic_file(folder / "report.md") as temp:
        temp.write_text("\n".join(lines), encoding="utf-8")
    report = {"config": run.to_dict(), "scores": {row["label"]: {k: row.get(k) for k in ("accuracy", "loss", "perplexity",
                                                                                          "examples")}
                                                  | ({"lm_eval": row["lm_eval"]} if "lm_eval" in row else {})
                                                  | ({"agreement": agreement[row["label"]]}
                                                     if agreement.get(row["label"]) else {})
                                                  for row in rows},
              "checks": checks, "exports": exports, "ranks": ranks, "stages": {n: r.get("stage_seconds") for n, r in stages.items()},
              "plots": list(PLOTS)}
    write_json(folder / "report.json", report)
    return {"folder": str(folder), "files": ["report.md", "report.json", *PLOTS]}
