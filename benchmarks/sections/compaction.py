"""``compaction``: an int4 base with a rank-12 AdaLoRA branch on every projection, the graph at init_r (pruned
ranks kept as zeros) vs the graph at the surviving ranks (size, prefill, decode).
"""

from __future__ import annotations

import copy
import time

import bench_fastpath
import numpy as np
from harness import PYTHON, Suite, ratio, show, show_ratio, stats
from sections.decode import long_prompt


INIT_R, SURVIVING_AVERAGE = 12, 4


def surviving_ranks(names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """A synthetic AdaLoRA outcome: a budget of ``SURVIVING_AVERAGE`` x modules triplets kept out of ``INIT_R`` each,
    the triplets with the largest seeded random importance (some modules keep none)."""
    rng = np.random.default_rng(seed)
    scores = rng.gamma(0.5, size=(len(names), INIT_R)) * rng.gamma(2.0, size=(len(names), 1))
    threshold = np.sort(scores.ravel())[-SURVIVING_AVERAGE * len(names)]
    return {name: scores[i] >= threshold for i, name in enumerate(names)}


def run(suite: Suite) -> None:
    if suite.model is None:
        suite.skip("compaction", "everything", "real model missing")
        return
    if suite.quick:
        suite.skip("compaction", "everything", "not in --quick (two more exports and decode runs); run without it")
        return
    import torch
    from adalora_deploy.export.build.fastpath import build_decoder
    from adalora_deploy.export.build.modules import LowRankBranch, swap_module
    from adalora_deploy.export.runtime.session import DecoderSession, create_session

    base = bench_fastpath.load(suite.model)
    with torch.no_grad():
        bench_fastpath.convert(base, "int4-tables-sym")
    names = [n for n, _ in base.named_modules() if n.rsplit(".", 1)[-1] in bench_fastpath.PROJECTIONS]
    keep = surviving_ranks(names)
    generator = torch.Generator().manual_seed(0)
    folders = {}
    for label in ("init_r", "surviving"):
        model = copy.deepcopy(base)
        for name in names:
            module = model.get_submodule(name)
            n, k = module.out_features, module.in_features
            A = torch.randn(INIT_R, k, generator=generator) * 0.01
            B = torch.randn(n, INIT_R, generator=generator) * 0.01
            mask = torch.from_numpy(keep[name])
            if label == "init_r":  # an adapter exported as trained: pruned triplets are zeros in the factors
                swap_module(model, name, LowRankBranch(module, A * mask[:, None], B))
            elif mask.any():
                swap_module(model, name, LowRankBranch(module, A[mask], B[:, mask]))
        folders[label] = suite.workdir / "graphs" / f"compaction-{label}"
        with torch.no_grad():
            build_decoder(model, folders[label], quantize_embeddings="int4", quantize_lm_head="int4",
                          table_symmetric=True)
        generator = torch.Generator().manual_seed(0)  # the same factors for both graphs
    del base, model
    sessions = {label: DecoderSession(create_session(folder / "model.onnx", intra_op_threads=suite.threads))
                for label, folder in folders.items()}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(suite.model, local_files_only=True)
    ids = np.asarray([tokenizer(bench_fastpath.PROMPT, add_special_tokens=False)["input_ids"]], dtype=np.int64)
    long_ids = np.asarray([long_prompt(tokenizer, 128)], dtype=np.int64)
    logits = {label: s.step(ids, np.ones_like(ids)).logits for label, s in sessions.items()}
    new_tokens = 64
    rates = {label: [] for label in sessions}
    latency = {label: [] for label in sessions}
    for label, s in sessions.items():
        s.generate_greedy(ids, np.ones_like(ids), 4)
    for _ in range(suite.repeats):
        for label, s in sessions.items():
            start = time.perf_counter()
            s.generate_greedy(ids, np.ones_like(ids), new_tokens)
            rates[label].append(new_tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            s.step(long_ids, np.ones_like(long_ids))
            latency[label].append((time.perf_counter() - start) * 1000)
    live = sum(int(m.sum()) for m in keep.values())
    results = {
        "modules": len(names), "init_r": INIT_R, "surviving_triplets": live, "rank0_modules":
        sum(1 for m in keep.values() if not m.any()),
        "max_abs_logit_difference": float(np.abs(logits["init_r"] - logits["surviving"]).max()),
        **{label: {"size": bench_fastpath.graph_size(folder), "tokens_per_s": stats(rates[label]),
                   "prefill_ms": stats(latency[label])} for label, folder in folders.items()}}
    suite.results["compaction"] = results
    suite.command("compaction", f"{PYTHON} benchmarks/run_all.py --sections compaction")
    s, i = results["surviving"], results["init_r"]
    rows = [["graph MB", f"{s['size']['bytes'] / 1e6:.1f}", f"{i['size']['bytes'] / 1e6:.1f}",
             show_ratio(s["size"]["bytes"] / i["size"]["bytes"])],
            ["nodes", str(s["size"]["nodes"]), str(i["size"]["nodes"]), show_ratio(s["size"]["nodes"] / i["size"]["nodes"])],
            ["decode tokens/s", show(s["tokens_per_s"]), show(i["tokens_per_s"]), show_ratio(ratio(s["tokens_per_s"], i["tokens_per_s"]))],
            ["prefill 128 tokens ms", show(s["prefill_ms"]), show(i["prefill_ms"]), show_ratio(ratio(s["prefill_ms"], i["prefill_ms"]))]]
    suite.print_table(f"Compaction: int4 base + branches on {len(names)} projections, {live} of {INIT_R * len(names)} "
                      f"triplets surviving (synthetic), {results['rank0_modules']} modules at rank 0; same logits "
                      f"(max abs difference {results['max_abs_logit_difference']:.1e})",
                      ["what", "surviving ranks", f"init_r {INIT_R}", "surviving/init_r"], rows)

