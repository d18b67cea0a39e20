"""``shipped``: the graphs users get from the CLI, beside onnxruntime-genai's builder ``-p int4`` graph.

Nothing here is built by an internal function: the main job (``adalora-deploy run
configs/smollm2-sentiment.yaml``) makes the shipped graph with its defaults (``exports/separate``), and the same
job, rerun from its export stage with every documented export option in its ``export`` list, makes the others
(``--serving``, ``merged`` with each ``--weights``), checks each against the trained model (``check``: tier and
verdict) and scores each on the held-out task; the same job with each of :data:`JOBS`' ``--set`` overrides (the
other activations, fp32 down-projections, an attention-only adapter) is run in the workdir and exported the same
way. This section then times what those commands wrote: size, prefill of a 128-token prompt (plain onnxruntime,
the same harness for every graph) and greedy decode tokens/s at batch 1 in our loop (``DecoderSession``) and under
onnxruntime-genai, at each of ``--decode-threads``, runners interleaved, beside the builder's int4 graph of the
same base model under onnxruntime-genai.

The job folder is ``--run DIR`` when given, else ``runs/smollm2-sentiment`` when it holds a finished job, else the
job is run here (its wall time is then reported: a rerun with the cached base, or a fresh run on an empty cache).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import bench_fastpath
import numpy as np
import yaml
from harness import HERE, PYTHON, Suite, ratio, run_child, show, show_ratio, stats, tail
from sections.decode import graph_prefill, long_prompt
from sections.export import builder_available, export_folder

REPO = HERE.parent
CONFIG = REPO / "configs" / "smollm2-sentiment.yaml"
DEFAULT_RUN = REPO / "runs" / "smollm2-sentiment"
SHIPPED = "separate"
"""The export the default config ships (its ``export`` list)."""
FP32 = "fp32"
"""The job trained with ``--set model.activations=fp32`` (the config's other documented arithmetic)."""
FP32_DOWN = "fp32-down"
"""The job with fp32 down-projections (``--set adapter.down_weights=fp32``, the default before 8-bit ones)."""
ATTENTION = "attention"
"""The job with an attention-only adapter (``--set adapter.target_modules=[q_proj, k_proj, v_proj, o_proj]``)."""
JOBS: dict[str | None, tuple[str, ...]] = {
    None: (),  # the default config as it is
    FP32: ("model.activations=fp32", "adapter.down_weights=fp32"),
    FP32_DOWN: ("adapter.down_weights=fp32",),
    ATTENTION: ("adapter.target_modules=[q_proj, k_proj, v_proj, o_proj]",),
}
"""Each job the section times graphs of, by its ``--set`` overrides of the default config."""
VARIANTS = (
    # name, the job's export entry (= `adalora-deploy export` options), shown as, the job (None: the default)
    ("separate", {"mode": "separate"}, "--mode separate (shipped)", None),
    ("merged", {"mode": "merged"}, "--mode merged (--weights fp32)", None),
    ("merged-int4", {"mode": "merged", "weights": "int4"}, "--mode merged --weights int4", None),
    ("merged-int8", {"mode": "merged", "weights": "int8"}, "--mode merged --weights int8", None),
    ("merged-fp16", {"mode": "merged", "weights": "fp16"}, "--mode merged --weights fp16", None),
    ("fp32-separate", {"mode": "separate"}, "activations fp32: --mode separate", FP32),
    ("fp32-serving", {"mode": "separate", "serving": True}, "activations fp32: --mode separate --serving", FP32),
    ("fp32-down-separate", {"mode": "separate"}, "fp32 down-projections: --mode separate", FP32_DOWN),
    ("attention-separate", {"mode": "separate"}, "attention-only adapter: --mode separate", ATTENTION),
)
QUICK_VARIANTS = ("separate", "fp32-separate", "fp32-down-separate", "attention-separate")
SLOW_RUN_S = 20
"""A decode run slower than this (seconds) is not repeated: its warm-up run is the figure."""


def finished_job(folder: Path) -> bool:
    return (folder / "report" / "report.json").is_file() and (folder / "exports" / SHIPPED / "model.onnx").is_file()


def the_job(suite: Suite, variant: str | None = None) -> Path | None:
    """The main job's folder: ``--run``, the repository's default run, or a run made here; with ``variant``, the
    same job with that variant's ``--set`` overrides (:data:`JOBS`, run here)."""
    overrides = JOBS[variant]
    for folder in (() if variant else (suite.run_dir, DEFAULT_RUN)):
        if folder is not None and finished_job(Path(folder)):
            print(f"  the main job's folder: {folder}", flush=True)
            return Path(folder)
    folder = suite.workdir / (f"job-{variant}" if variant else "job")
    argv = [PYTHON, "-m", "adalora_deploy.cli", "run", str(CONFIG), "--output", str(folder)]
    for item in overrides:
        argv += ["--set", item]
    if variant and finished_job(folder) and same_settings(folder, overrides):
        print(f"  reusing {folder} (--workdir of an earlier run)", flush=True)
        return folder
    suite.command("shipped", argv)
    print(f"  running the main job: {' '.join(argv)}", flush=True)
    job = run_child(argv, timeout=3600)
    if job.returncode or not finished_job(folder):
        suite.skip("shipped", f"the {variant} job" if variant else "everything",
                   f"the main job failed: {tail(job.stderr)}")
        return None
    suite.results.setdefault("shipped", {})[f"job_run_{variant}" if variant else "job_run"] = {
        "wall_s": job.wall_s, "cpu_s": job.cpu_s, "peak_rss_mb": job.peak_rss_mb}
    return folder


def job_config(overrides: tuple[str, ...]) -> dict[str, Any]:
    """The default config's raw mapping with ``--set`` ``overrides`` applied (what ``run --set`` reads)."""
    from adalora_deploy.config import apply_overrides

    return apply_overrides(yaml.safe_load(CONFIG.read_text(encoding="utf-8")), list(overrides))


def same_settings(folder: Path, overrides: tuple[str, ...]) -> bool:
    """Whether the job in ``folder`` ran with the config's model, quantize, adapter and train settings and
    ``overrides`` as they are now (as its ``job.json`` recorded them)."""
    recorded = json.loads((folder / "job.json").read_text(encoding="utf-8")).get("config", {})
    wanted = job_config(overrides)
    return all(recorded.get(section, {}).get(key) == value
               for section in ("model", "quantize", "adapter", "train")
               for key, value in wanted.get(section, {}).items())


def export_variants(suite: Suite, job: Path, names: list[str], variant: str | None = None) -> Path | None:
    """Rerun the job from its export stage, in a copy, with every variant in its ``export`` list."""
    tag = f"-{variant}" if variant else ""
    folder = suite.workdir / f"variants{tag}"
    config = job_config(JOBS[variant])
    config["export"] = [{"name": name, **entry} for name, entry, _, _ in VARIANTS if name in names]
    config_file = suite.workdir / f"variants{tag}.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    argv = [PYTHON, "-m", "adalora_deploy.cli", "run", str(config_file), "--output", str(folder), "--from", "export"]
    suite.command("shipped", f"{CONFIG.name} with export: {config['export']}; {' '.join(argv)}")
    source = job / "train" / "adapter" / "adapter_model.safetensors"
    copied = folder / "train" / "adapter" / "adapter_model.safetensors"
    if (folder / "report" / "report.json").is_file() and config_file.is_file() and \
            config_file.read_text(encoding="utf-8") == text and copied.is_file() and \
            copied.read_bytes() == source.read_bytes():
        print(f"  reusing the export variants in {folder} (--workdir of an earlier run, same adapter and list)")
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(job, folder, ignore=shutil.ignore_patterns("exports", "report"))
    config_file.write_text(text, encoding="utf-8")
    print(f"  exporting, checking and scoring {len(names)} graphs: {' '.join(argv)}", flush=True)
    run = run_child(argv, timeout=5400)
    if not (folder / "report" / "report.json").is_file():
        suite.skip("shipped", "the export variants", f"the job's export stages failed: {tail(run.stderr)}")
        return None
    print(f"  export + check + evaluate of the variants: {run.wall_s:.0f} s", flush=True)
    return folder


def graph_rows(job: Path, variants: Path, names: list[str],
               shipped_variant: str = SHIPPED) -> dict[str, dict[str, Any]]:
    """Per graph, from the job's own report: size, export seconds, check verdict and tier, accuracy."""
    report = json.loads((variants / "report" / "report.json").read_text(encoding="utf-8"))
    shipped = json.loads((job / "report" / "report.json").read_text(encoding="utf-8"))
    rows = {}
    for name in names:
        export, check = report["exports"].get(name), report["checks"].get(name, {})
        if export is None:
            continue
        parity = variants / "exports" / name / "parity.json"
        kl = None
        if parity.is_file():
            source = [c for c in json.loads(parity.read_text(encoding="utf-8"))["comparisons"] if c["name"] == "source"]
            kl = source[0]["summary"].get("logits_mean_kl") if source else None
        rows[name] = {"folder": str(variants / "exports" / name), "graph_bytes": export["graph_bytes"],
                      "export_s": export["seconds"], "tier": export.get("source_tier", export["tier"]),
                      "passed": check.get("passed"),
                      "top1": check.get("source_top1"), "mean_kl": kl,
                      "verdict": check.get("verdict", "free-running"),
                      "free_running_top1": check.get("free_running_top1", check.get("source_top1")),
                      "free_running_mean_kl": check.get("free_running_mean_kl", kl),
                      "accuracy": report["scores"].get(name, {}).get("accuracy")}
    rows["_trained_accuracy"] = report["scores"]["trained (torch)"]["accuracy"]
    rows["_base_accuracy"] = report["scores"]["base"]["accuracy"]
    rows["_shipped_graph_reproduced"] = same_graph(job / "exports" / SHIPPED, variants / "exports" / shipped_variant)
    rows["_job_scores"] = shipped["scores"]
    return rows


def same_graph(a: Path, b: Path) -> bool:
    """The same nodes and the same initializer values (the external data file's layout may differ between
    versions of the exporter; the values may not)."""
    import onnx
    from onnx import numpy_helper

    first, second = onnx.load(str(a / "model.onnx")), onnx.load(str(b / "model.onnx"))
    if list(first.graph.node) != list(second.graph.node):
        return False
    values = {t.name: numpy_helper.to_array(t) for t in first.graph.initializer}
    return len(values) == len(second.graph.initializer) and all(
        t.name in values and np.array_equal(values[t.name], numpy_helper.to_array(t)) for t in second.graph.initializer)


def builder_graph(suite: Suite) -> Path | None:
    """The builder's ``-p int4`` graph of the same base model (the export section's, or built here)."""
    folder = export_folder(suite, "builder", "int4")
    if (folder / "model.onnx").is_file():
        return folder
    argv = [PYTHON, "-m", "onnxruntime_genai.models.builder", "-i", suite.model, "-o", str(folder), "-p", "int4",
            "-e", "cpu", "-c", str(suite.workdir / "builder-cache")]
    suite.command("shipped", argv)
    run = run_child(argv, timeout=1800)
    if run.returncode:
        suite.skip("shipped", "the builder's graph", f"failed: {tail(run.stderr)}")
        return None
    suite.results.setdefault("shipped", {})["builder_export"] = {"wall_s": run.wall_s, "cpu_s": run.cpu_s}
    return folder


def time_graphs(suite: Suite, tokenizer, graphs: dict[str, Path], builder: Path | None, threads: int) -> dict[str, Any]:
    """Prefill ms and decode tokens/s of every graph at ``threads``, runners interleaved."""
    from adalora_deploy.export.runtime.session import DecoderSession, create_session

    new_tokens = 32 if suite.quick else 64
    prompt_ids = tokenizer(bench_fastpath.PROMPT, add_special_tokens=False)["input_ids"]
    ids = np.asarray([prompt_ids], dtype=np.int64)
    long_ids = np.asarray([long_prompt(tokenizer, 128)], dtype=np.int64)
    decoders, prefills = {}, {}
    for name, folder in graphs.items():
        session = DecoderSession(create_session(folder / "model.onnx", intra_op_threads=threads))

        def ours_loop(session=session):
            start = time.perf_counter()
            sequence = session.generate_greedy(ids, np.ones_like(ids), new_tokens)
            return time.perf_counter() - start, sequence[0, ids.shape[1]:].tolist()

        decoders[f"{name}, our loop"] = ours_loop
        og = bench_fastpath._og_model(str(folder), threads)
        decoders[f"{name}, genai"] = lambda og=og: bench_fastpath._og_decode(og, prompt_ids, new_tokens)[::2]
        prefills[name] = graph_prefill(folder, suite.model, long_ids, threads)
    if builder is not None:
        og = bench_fastpath._og_model(str(builder), threads)
        decoders["builder -p int4, genai"] = lambda: bench_fastpath._og_decode(og, prompt_ids, new_tokens)[::2]
        prefills["builder -p int4"] = graph_prefill(builder, suite.model, long_ids, threads)
    tokens, rates = {}, {}
    for name, run in decoders.items():  # warm-up, and the tokens
        seconds, tokens[name] = run()
        rates[name] = [new_tokens / seconds]
    slow = {name for name, rate in rates.items() if new_tokens / rate[0] > SLOW_RUN_S}
    if slow:
        suite.skip("shipped", f"repeats of {sorted(slow)} at {threads} thread(s)", f"one run took over {SLOW_RUN_S} s: "
                   "its single (warm-up) run is reported")
    for name in rates:
        if name not in slow:
            rates[name] = []
    for run in prefills.values():
        run()
    latency: dict[str, list[float]] = {name: [] for name in prefills}
    for round_ in range(suite.repeats):
        # each round starts one runner later: a runner's speed depends on what ran just before it (caches, the
        # 540 MB fp32 graph), measured up to 15% on identical graphs at 1 thread; rotating spreads that over all
        for name in rotated(list(decoders), round_):
            if name not in slow:
                rates[name].append(new_tokens / decoders[name]()[0])
        for name in rotated(list(prefills), round_):
            start = time.perf_counter()
            prefills[name]()
            latency[name].append((time.perf_counter() - start) * 1000)
    return {"threads": threads, "new_tokens": new_tokens, "prompt_tokens": len(prompt_ids),
            "decode": {name: stats(values) for name, values in rates.items()},
            "prefill_ms": {name: stats(values) for name, values in latency.items()},
            "genai_tokens_equal_our_loop": {name: same_until_eos(tokens[f"{name}, our loop"], tokens[f"{name}, genai"],
                                                                 tokenizer.eos_token_id)
                                            for name in graphs}}


def same_until_eos(ours: list[int], genai: list[int], eos: int | None) -> bool:
    """Whether the two runners chose the same tokens before our loop's first EOS: the timed genai run sets
    ``min_length`` to the full length (so that both generate every token), which suppresses EOS there, while our
    loop, given no EOS, takes it like any token (measured: the shipped graph's 55th token; genai then takes the
    runner-up)."""
    stop = ours.index(eos) if eos is not None and eos in ours else len(ours)
    return [int(t) for t in ours[:stop]] == [int(t) for t in genai[:stop]]


def rotated(names: list[str], start: int) -> list[str]:
    """``names`` in a round-robin order beginning at ``start`` (modulo their number)."""
    start %= max(len(names), 1)
    return names[start:] + names[:start]


def run(suite: Suite) -> None:
    if suite.model is None:
        suite.skip("shipped", "everything", "real model missing")
        return
    why = builder_available()
    if why:
        suite.skip("shipped", "everything", why)
        return
    rows: dict[str, Any] = {}
    for variant in JOBS:
        group = [name for name, _, _, j in VARIANTS if j == variant and (not suite.quick or name in QUICK_VARIANTS)]
        job = the_job(suite, variant)
        if job is None:
            if variant is None:
                return
            continue
        variants = export_variants(suite, job, group, variant)
        if variants is None:
            if variant is None:
                return
            continue
        part = graph_rows(job, variants, group, f"{variant}-{SHIPPED}" if variant else SHIPPED)
        rows.update({(f"{key}_{variant}" if key.startswith("_") and variant else key): value
                     for key, value in part.items()})
        if variant is None:
            job_folder = job
    job = job_folder
    names = [name for name, _, _, _ in VARIANTS if name in rows]
    builder = builder_graph(suite)
    builder_bytes = bench_fastpath.graph_size(builder)["bytes"] if builder else None
    graphs = {name: Path(rows[name]["folder"]) for name in names}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(suite.model, local_files_only=True)
    timings = {threads: time_graphs(suite, tokenizer, graphs, builder, threads) for threads in suite.decode_threads}
    suite.results.setdefault("shipped", {}).update({"job": str(job), "graphs": rows, "builder_bytes": builder_bytes,
                                                    "timings": timings})
    labels = {name: label for name, _, label, _ in VARIANTS}
    table = []
    for name in names:
        r = rows[name]
        verdict = ("PASS" if r["passed"] else "FAIL") + (" (teacher-forced)" if r["verdict"] == "teacher-forced" else "")
        table.append([labels[name], f"{r['graph_bytes'] / 1e6:.1f}",
                      show_ratio(r["graph_bytes"] / builder_bytes if builder_bytes else None), f"{r['export_s']:.0f}",
                      f"{r['tier']} {verdict}",
                      f"{r['free_running_top1']:.3f}" if r["free_running_top1"] is not None else "-",
                      f"{r['free_running_mean_kl']:.1e}" if r["free_running_mean_kl"] is not None else "-",
                      f"{r['accuracy']:.3f}"])
    if builder_bytes:
        table.append(["builder -p int4", f"{builder_bytes / 1e6:.1f}", "1.00x", "-", "(not checked: no adapter)", "-",
                      "-", "-"])
    other_jobs = "".join(f"; {variant} job: trained {rows[f'_trained_accuracy_{variant}']:.3f}"
                         for variant in JOBS if variant and f"_trained_accuracy_{variant}" in rows)
    suite.print_table(f"The CLI's graphs of the main job (trained {rows['_trained_accuracy']:.3f}, base "
                      f"{rows['_base_accuracy']:.3f} held-out accuracy{other_jobs}); shipped graph rebuilt with the same "
                      f"nodes and weights by the rerun: {'yes' if rows['_shipped_graph_reproduced'] else 'NO'}; top-1 "
                      "and KL: graph vs trained model free-running, each on its own activations",
                      ["export", "MB", "vs builder", "export s", "check vs trained", "top-1", "mean KL", "accuracy"],
                      table)
    for threads, t in timings.items():
        peer = t["decode"].get("builder -p int4, genai")
        peer_prefill = t["prefill_ms"].get("builder -p int4")
        table = []
        for name in [*names, "builder -p int4"]:
            loop, og = t["decode"].get(f"{name}, our loop"), t["decode"].get(f"{name}, genai")
            prefill = t["prefill_ms"].get(name)
            table.append([labels.get(name, name), show(loop), show_ratio(ratio(loop, peer)), show(og),
                          show_ratio(ratio(og, peer)), show(prefill), show_ratio(ratio(prefill, peer_prefill))])
        suite.print_table(f"{threads} intra-op thread(s): decode tokens/s ({t['new_tokens']} greedy tokens after a "
                          f"{t['prompt_tokens']}-token prompt, batch 1) and prefill ms (128 tokens), median [min-max] "
                          f"of {suite.repeats}, runners interleaved (each round starting one runner later)",
                          ["graph", "our loop tok/s", "vs builder", "genai tok/s", "vs builder", "prefill ms",
                           "vs builder"], table)
    shipped, t_rows = rows.get(SHIPPED), []
    if shipped and builder_bytes:
        t_rows.append(["size <= 1.05x the builder's", f"{shipped['graph_bytes'] / builder_bytes:.2f}x",
                       "yes" if shipped["graph_bytes"] <= 1.05 * builder_bytes else "no"])
        for threads, t in timings.items():
            peer = t["decode"].get("builder -p int4, genai")
            for runner in ("our loop", "genai"):
                value = ratio(t["decode"].get(f"{SHIPPED}, {runner}"), peer)
                t_rows.append([f"decode >= 1.0x, {runner}, {threads} thread(s)", show_ratio(value),
                               "yes" if value and value >= 1.0 else "no"])
            value = ratio(t["prefill_ms"].get(SHIPPED), t["prefill_ms"].get("builder -p int4"))
            t_rows.append([f"prefill <= 1.0x, {threads} thread(s)", show_ratio(value),
                           "yes" if value and value <= 1.0 else "no"])
        t_rows.append(["check PASS at the exact tier vs the trained model",
                       f"{shipped['tier']} ({shipped['verdict']}), top-1 {shipped['top1']}",
                       "yes" if shipped["passed"] and shipped["tier"] == "exact" else "no"])
        suite.print_table("Issue 17's targets for the shipped graph (this run)", ["target", "measured", "met?"], t_rows)
