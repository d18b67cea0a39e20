"""Greedy text of an export three ways: transformers on the trained torch model, ``adalora-deploy generate``'s
loop (onnxruntime), and onnxruntime-genai (og.Generator, og.Adapters for an adapter-inputs export).

    python benchmarks/compare_generate.py EXPORT_DIR [--new-tokens 48] [--no-torch]

The torch model is rebuilt from the base and adapter recorded in export.json (as ``check`` does); for an
adapter-inputs export the adapter is the export's own ``adapter.onnx_adapter``. Prints, per chat prompt,
whether the token ids are identical and the first characters of the text.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

QUESTIONS = [
    "Explain how a river forms and where its water comes from.",
    "Write a short story about a miller and his boat.",
    "What are the four seasons and how do they differ?",
    "Give three tips for learning a new language.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--no-torch", action="store_true", help="skip the transformers reference")
    args = parser.parse_args()
    import onnxruntime as ort

    from adalora_deploy.export.runtime.genai import GenaiGenerator
    from adalora_deploy.export.runtime.generation import SamplingParams, TextGenerator, collect
    from adalora_deploy.export.build.manifest import read_manifest

    ort.set_default_logger_severity(3)
    manifest = read_manifest(args.export_dir)
    ours = TextGenerator.from_export(args.export_dir)
    genai = GenaiGenerator(args.export_dir)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    prompts = [ours.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    run_options, genai_adapter, keep = None, None, None
    if manifest.adapter_inputs:
        keep = ort.LoraAdapter()
        keep.Load(str(args.export_dir / "adapter.onnx_adapter"))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(keep)
        genai_adapter = genai.load_adapter(args.export_dir / "adapter.onnx_adapter")
    loop = ours.generate(prompts, params, run_options=run_options)  # one left-padded batch
    og_out = [collect(genai.stream([p], params, adapter=genai_adapter), [p])[0] for p in prompts]
    reference = None
    if not args.no_torch:
        import torch

        from adalora_deploy.export.build.source import load_source_model

        model = load_source_model(manifest.base_path, manifest.adapter_path, quantization=manifest.quantization,
                                  double_quant=manifest.double_quant)
        reference = []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, num_beams=1,
                                     max_new_tokens=args.new_tokens, eos_token_id=sorted(ours.limits.eos_token_ids),
                                     pad_token_id=ours.limits.pad_token_id)
            reference.append(out[0, len(prompt):].tolist())
    print(f"{args.export_dir} ({manifest.mode} {manifest.weights}, tier {manifest.tier}), {args.new_tokens} greedy tokens\n")
    print("| prompt | ours == transformers | genai == ours | text (ours) |")
    print("|---|---|---|---|")
    for i, question in enumerate(QUESTIONS):
        torch_equal = "-" if reference is None else str(list(loop[i].token_ids) == reference[i])
        text = loop[i].text[:60].replace("\n", " ").replace("|", "/")
        print(f"| {question[:30]}... | {torch_equal} | {og_out[i].token_ids == loop[i].token_ids} | {text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
