"""``decode``: prefill latency (a 128-token prompt) and greedy decode tokens/s (batch 1) of the graphs just
exported: our graph under our loop and under onnxruntime-genai, the builder's graph under onnxruntime-genai,
and torch eager (fp32), runners interleaved; each as a fraction of the memory-bandwidth roofline
(bandwidth from a numpy copy; bytes read per token = the graph's weight bytes).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_fastpath
import numpy as np
from harness import PYTHON, Suite, ratio, show, show_ratio, stats
from sections.export import builder_available, export_folder, export_kinds


def memory_bandwidth(megabytes: int = 512, repeats: int = 7) -> dict[str, Any]:
    """Bytes per second of a single-threaded numpy copy of a large array (read + write counted)."""
    source = np.ones(megabytes << 17, dtype=np.float64)  # megabytes MiB
    target = np.empty_like(source)
    np.copyto(target, source)  # fault the pages in
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(target, source)
        rates.append(2 * source.nbytes / (time.perf_counter() - start) / 1e9)
    return stats(rates)


def long_prompt(tokenizer, length: int) -> list[int]:
    text = " ".join(bench_fastpath.QUALITY_PROMPTS) * 4
    return tokenizer(text, add_special_tokens=False)["input_ids"][:length]


@dataclasses.dataclass(frozen=True)
class Eager:
    """The transformers model in torch (fp32): prefill, greedy decode with its KV cache, and its weight bytes."""

    prefill: Callable[[np.ndarray], None]
    decode: Callable[[list[int], int], tuple[float, list[int]]]
    weight_bytes: int


def eager_runners(model, threads: int) -> Eager:
    """Prefill and greedy decode of the transformers model in torch (fp32), with its KV cache."""
    import torch

    torch.set_num_threads(threads)

    def prefill(ids: np.ndarray) -> None:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(ids), use_cache=True)

    def decode(prompt_ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
        tokens = []
        start = time.perf_counter()
        with torch.no_grad():
            out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
            for _ in range(new_tokens):
                token = int(out.logits[0, -1].argmax())
                tokens.append(token)
                out = model(input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
        return time.perf_counter() - start, tokens

    return Eager(prefill, decode, parameter_bytes(model))


def parameter_bytes(model) -> int:
    """Bytes of the model's parameters, a tied table counted once."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel() * parameter.element_size()
    return total


def graph_prefill(folder: Path, model_dir: str, ids: np.ndarray, threads: int) -> Callable[[], None]:
    """One prompt run of any decoding graph of ``model_dir`` with our input names (the builder's have them too),
    in plain onnxruntime: the same harness for both graphs."""
    import onnxruntime as ort

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    heads = config.get("num_key_value_heads", config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for item in session.get_inputs():
        if item.name.startswith("past_key_values."):
            dtype = np.float16 if item.type == "tensor(float16)" else np.float32
            feeds[item.name] = np.zeros((ids.shape[0], heads, 0, head_dim), dtype)
    return lambda: session.run(["logits"], feeds)


def decode_kind(suite: Suite, kind: str, eager: Eager, tokenizer, bandwidth: float, new_tokens: int,
                prefill_tokens: int) -> dict[str, Any]:
    """Interleaved prefill and decode runs of one export kind: our graph (our loop, genai), the builder's, eager."""
    from adalora_deploy.export.runtime.session import DecoderSession, create_session

    ours_dir, builder_dir = export_folder(suite, "ours", kind), export_folder(suite, "builder", kind)
    have_builder = (builder_dir / "model.onnx").exists()
    have_genai = builder_available() is None
    prompt_ids = tokenizer(bench_fastpath.PROMPT, add_special_tokens=False)["input_ids"]
    ids = np.asarray([prompt_ids], dtype=np.int64)
    long_ids = np.asarray([long_prompt(tokenizer, prefill_tokens)], dtype=np.int64)
    ours = DecoderSession(create_session(ours_dir / "model.onnx", intra_op_threads=suite.threads))
    prefills = {"ours graph": graph_prefill(ours_dir, suite.model, long_ids, suite.threads)}
    if have_builder:
        prefills["builder graph"] = graph_prefill(builder_dir, suite.model, long_ids, suite.threads)
    prefills["torch eager fp32"] = lambda: eager.prefill(long_ids)

    def ours_loop():
        start = time.perf_counter()
        sequence = ours.generate_greedy(ids, np.ones_like(ids), new_tokens)
        return time.perf_counter() - start, sequence[0, ids.shape[1]:].tolist()

    decoders: dict[str, Callable[[], tuple[float, list[int]]]] = {"ours graph, our loop": ours_loop}
    if have_genai:
        ours_og = bench_fastpath._og_model(str(ours_dir), suite.threads, share_buffer=True)
        decoders["ours graph, genai"] = lambda: bench_fastpath._og_decode(ours_og, prompt_ids, new_tokens)[::2]
        if have_builder:
            builder_og = bench_fastpath._og_model(str(builder_dir), suite.threads)
            decoders["builder graph, genai"] = lambda: bench_fastpath._og_decode(builder_og, prompt_ids,
                                                                                 new_tokens)[::2]
    decoders["torch eager fp32"] = lambda: eager.decode(prompt_ids, new_tokens)

    tokens = {name: run()[1] for name, run in decoders.items()}  # warm-up, and the tokens
    for run in prefills.values():
        run()
    rates: dict[str, list[float]] = {name: [] for name in decoders}
    latency: dict[str, list[float]] = {name: [] for name in prefills}
    for _ in range(suite.repeats):
        for name, run in decoders.items():
            rates[name].append(new_tokens / run()[0])
        for name, run in prefills.items():
            start = time.perf_counter()
            run()
            latency[name].append((time.perf_counter() - start) * 1000)
    weight_bytes = {"ours graph": bench_fastpath.graph_size(ours_dir)["bytes"],
                    "torch eager fp32": eager.weight_bytes}
    if have_builder:
        weight_bytes["builder graph"] = bench_fastpath.graph_size(builder_dir)["bytes"]

    def graph_of(name: str) -> str:
        return "torch eager fp32" if name.startswith("torch") else name.split(",")[0]

    decode = {}
    for name, values in rates.items():
        s = stats(values)
        roofline = bandwidth * 1e9 / weight_bytes[graph_of(name)]
        decode[name] = {"tokens_per_s": s, "roofline_tokens_per_s": roofline, "fraction_of_roofline":
                        s["median"] / roofline, "same_tokens_as_ours_loop": tokens[name] == tokens["ours graph, our loop"]}
    return {"prompt_tokens": len(prompt_ids), "new_tokens": new_tokens, "prefill_tokens": int(long_ids.shape[1]),
            "weight_bytes": weight_bytes, "decode": decode,
            "prefill_ms": {name: stats(values) for name, values in latency.items()},
            "text": {name: tokenizer.decode(t) for name, t in tokens.items()}}


def run(suite: Suite) -> None:
    if suite.model is None:
        suite.skip("decode", "everything", "real model missing")
        return
    kinds = [k for k in export_kinds(suite) if (export_folder(suite, "ours", k) / "model.onnx").exists()]
    if not kinds:
        suite.skip("decode", "everything", "no graph of ours was exported (see the export section)")
        return
    why = builder_available()
    if why:
        suite.skip("decode", "genai runners and the builder's graph", why)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(suite.model, local_files_only=True)
    model = bench_fastpath.load(suite.model)
    eager = eager_runners(model, suite.threads)
    bandwidth = memory_bandwidth()
    print(f"  memory bandwidth (numpy copy, 1 thread): {show(bandwidth, '.2f')} GB/s", flush=True)
    new_tokens, prefill_tokens = (32, 128) if suite.quick else (64, 128)
    results = {"bandwidth_GBps": bandwidth, "threads": suite.threads}
    for kind in kinds:
        results[kind] = decode_kind(suite, kind, eager, tokenizer, bandwidth["median"], new_tokens, prefill_tokens)
    suite.results["decode"] = results
    suite.command("decode", f"{PYTHON} benchmarks/run_all.py --sections export,decode" + (" --quick" if suite.quick else ""))
    suite.command("decode", f"{PYTHON} benchmarks/bench_fastpath.py decode --ours OURS_DIR --builder BUILDER_DIR --ours-og")
    rows = []
    for kind in kinds:
        r = results[kind]
        peer = r["decode"].get("builder graph, genai")
        for name, d in r["decode"].items():
            rows.append([kind, name, show(d["tokens_per_s"]), show_ratio(ratio(d["tokens_per_s"], peer and peer["tokens_per_s"])),
                         f"{d['roofline_tokens_per_s']:.1f}", f"{100 * d['fraction_of_roofline']:.0f}%",
                         "yes" if d["same_tokens_as_ours_loop"] else "no"])
    suite.print_table(f"Decode, batch 1, {new_tokens} greedy tokens after a {r['prompt_tokens']}-token prompt, "
                      f"{suite.threads} intra-op thread(s), tokens/s: median [min-max] of {suite.repeats}; roofline = "
                      f"{bandwidth['median']:.1f} GB/s / weight bytes",
                      ["kind", "runner", "tokens/s", "vs builder graph", "roofline tok/s", "of roofline",
                       "same tokens"], rows)
    rows = []
    for kind in kinds:
        r = results[kind]
        peer = r["prefill_ms"].get("builder graph")
        for name, s in r["prefill_ms"].items():
            rows.append([kind, name, show(s), show_ratio(ratio(s, peer)),
                         f"{r['weight_bytes'][name] / 1e6:.1f}"])
    suite.print_table(f"Prefill of a {prefill_tokens}-token prompt, batch 1, ms: median [min-max] of {suite.repeats}",
                      ["kind", "graph", "ms", "vs builder graph", "weights MB"], rows)

