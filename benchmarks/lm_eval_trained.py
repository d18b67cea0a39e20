"""lm-evaluation-harness accuracy of an export beside its trained torch model: lm-eval's ``hf`` model over the
trained model (base + adapter, as ``check`` rebuilds it from export.json) and our in-process ``adalora-deploy``
model over the export, on the same tasks, tokenized the same way (no BOS, the export's tokenizer).

    python benchmarks/lm_eval_trained.py EXPORT_DIR --tasks sentiment --include_path tasks/ [--apply_chat_template]

Needs the ``lmeval`` extra and torch. Prints one row per task: both accuracies, how many items chose differently
and the largest difference of a choice's log-likelihood.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include_path", required=True, help="folder of the task YAML files")
    parser.add_argument("--apply_chat_template", action="store_true")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    import adalora_deploy.export.runtime.lm_eval_model  # noqa: F401  (registers adalora-deploy)
    from adalora_deploy.export.build.manifest import read_manifest
    from adalora_deploy.export.build.source import load_source_model

    manifest = read_manifest(args.export_dir)
    model = load_source_model(manifest.base_path, manifest.adapter_path, quantization=manifest.quantization,
                              double_quant=manifest.double_quant)
    trained = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(args.export_dir),
                   batch_size=args.batch_size, add_bos_token=False)
    tasks = args.tasks.split(",")
    common = dict(tasks=tasks, task_manager=TaskManager(include_path=args.include_path), log_samples=True,
                  apply_chat_template=args.apply_chat_template, limit=args.limit)
    results = {
        "trained": lm_eval.simple_evaluate(model=trained, **common),
        "export": lm_eval.simple_evaluate(model="adalora-deploy", model_args=f"export={args.export_dir}",
                                          batch_size=args.batch_size, **common),
    }
    print(f"{args.export_dir} ({manifest.mode} {manifest.weights}, tier {manifest.tier}) against its trained model\n")
    print("| task | items | trained acc | export acc | items choosing differently | max abs diff of a log-likelihood |")
    print("|---|---|---|---|---|---|")
    for task in tasks:
        scores = {route: {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in res["samples"][task]}
                  for route, res in results.items()}
        picks = {route: {doc: max(range(len(v)), key=v.__getitem__) for doc, v in items.items()}
                 for route, items in scores.items()}
        differ = sum(picks["trained"][doc] != picks["export"][doc] for doc in picks["trained"])
        worst = max(abs(a - b) for doc in scores["trained"]
                    for a, b in zip(scores["trained"][doc], scores["export"][doc]))
        accuracy = {route: res["results"][task]["acc,none"] for route, res in results.items()}
        print(f"| {task} | {len(scores['trained'])} | {accuracy['trained']:.2f} | {accuracy['export']:.2f} | "
              f"{differ} | {worst:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
