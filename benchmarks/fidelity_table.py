"""One markdown row per checked export folder: kind, graph size, agreement with the trained model, accuracy, verdict.

    python benchmarks/fidelity_table.py runs/x-gptq-separate runs/x-gptq-serving ...

Reads ``export.json`` (what was exported, sizes, the agreement measured at export time) and ``parity.json``
(what ``adalora-deploy check [--eval FILE]`` measured and decided) of each folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _kind(manifest: dict) -> str:
    if manifest["mode"] == "merged":
        method = (manifest.get("requantization") or {}).get("method")
        return f"merged {manifest['weights']}" + (f" ({method})" if method else "")
    return "separate" + (" --serving" if manifest["serving"] else " (exact)")


def row(folder: Path) -> str:
    manifest = json.loads((folder / "export.json").read_text())
    parity = json.loads((folder / "parity.json").read_text())
    source = next(c for c in parity["comparisons"] if c["name"] == "source")
    summary = source["summary"]
    evaluation = next((c["evaluation"] for c in parity["comparisons"] if c["name"] == "eval"), None)
    accuracy = perplexity = "-"
    if evaluation is not None:
        ref, got = evaluation["reference"], evaluation["candidate"]
        if got["accuracy"] is not None:
            accuracy = f"{got['accuracy']:.3f} (trained {ref['accuracy']:.3f})"
        perplexity = f"{got['perplexity']:.3f} (trained {ref['perplexity']:.3f})"
    size = sum(v for k, v in manifest["sizes"].items() if k.startswith("model.onnx")) / 1e6
    ops = ", ".join(f"{k.split('::')[-1]} x{v}" for k, v in manifest["quantized_ops"].items()) or "MatMul fp32"
    return (f"| {manifest['quantization']} | {_kind(manifest)} | {ops} | {size:.1f} MB | {source['tier']} | "
            f"{summary['logits_top1']:.3f} | {summary['logits_mean_kl']:.3g} | {summary['logits_max_abs']:.3g} | "
            f"{accuracy} | {perplexity} | {'PASS' if parity['passed'] else 'FAIL'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args()
    print("| base | export | quantized ops | graph | tier | top-1 vs trained | mean KL | max abs | accuracy | "
          "perplexity | check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for folder in args.folders:
        print(row(folder))


if __name__ == "__main__":
    main()
