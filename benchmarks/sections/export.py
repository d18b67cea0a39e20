"""``export``: wall time, CPU time and peak RSS of a whole export process, our fast path
(``bench_fastpath.py export``) vs onnxruntime-genai's model builder, runs interleaved; graph sizes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bench_fastpath
from harness import HERE, PYTHON, ChildRun, Suite, last_json, ratio, run_child, show, show_ratio, stats, tail


EXPORT_KINDS = {
    # kind: (bench_fastpath variant, builder precision); int4-tables-sym = the builder's precision choices
    # (symmetric round-to-nearest block 32, int4 embedding and tied lm_head, accuracy_level 4)
    "int4": ("int4-tables-sym", "int4"),
    "fp32": ("fp32", "fp32"),
}


def export_kinds(suite: Suite) -> list[str]:
    return ["int4"] if suite.quick else ["int4", "fp32"]


def export_folder(suite: Suite, who: str, kind: str) -> Path:
    return suite.workdir / "graphs" / f"{who}-{kind}"


def builder_available() -> str | None:
    """None when onnxruntime-genai's model builder can run, else why not."""
    try:
        import onnxruntime_genai
        import onnxruntime_genai.models.builder  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return f"onnxruntime-genai's model builder cannot be imported ({error}); pip install onnxruntime-genai"
    return None


def run(suite: Suite) -> None:
    if suite.model is None:
        suite.skip("export", "everything", "real model missing (and the builder needs a real tokenizer)")
        return
    why = builder_available()
    if why:
        suite.skip("export", "the builder's side", why)
    repeats = 2 if suite.quick else 3
    results: dict[str, Any] = {}
    for kind in export_kinds(suite):
        variant, precision = EXPORT_KINDS[kind]
        ours_dir, builder_dir = export_folder(suite, "ours", kind), export_folder(suite, "builder", kind)
        ours_argv = [PYTHON, str(HERE / "bench_fastpath.py"), "--model", suite.model, "export", "--variant", variant,
                     "--path", "fast", "--out", str(ours_dir)]
        builder_argv = [PYTHON, "-m", "onnxruntime_genai.models.builder", "-i", suite.model, "-o", str(builder_dir),
                        "-p", precision, "-e", "cpu", "-c", str(suite.workdir / "builder-cache")]
        suite.command("export", ours_argv)
        suite.command("export", builder_argv)
        runs: dict[str, list[ChildRun]] = {"ours": [], "builder": []}
        phases = []
        for _ in range(repeats):  # interleaved, so that load on the machine hits both sides alike
            for who, argv in (("ours", ours_argv), ("builder", builder_argv)):
                if who == "builder" and why:
                    continue
                run = run_child(argv, timeout=1200)
                if run.returncode:
                    suite.skip("export", f"{who} {kind}", f"failed: {tail(run.stderr)}")
                    continue
                runs[who].append(run)
                if who == "ours":
                    phases.append(last_json(run.stdout))
                print(f"  export {kind} {who}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} s CPU, "
                      f"{run.peak_rss_mb:.0f} MB", flush=True)
        if runs["ours"] and not why:
            bench_fastpath.add_genai_config(ours_dir, suite.model)
        results[kind] = {
            who: {"wall_s": stats([r.wall_s for r in rs]), "cpu_s": stats([r.cpu_s for r in rs]),
                  "peak_rss_mb": stats([r.peak_rss_mb for r in rs]),
                  "size": bench_fastpath.graph_size(export_folder(suite, who, kind))}
            for who, rs in runs.items() if rs}
        if phases:
            results[kind]["ours"]["phases_s"] = {k: stats([p[k] for p in phases])
                                                 for k in ("load_s", "convert_s", "build_s")}
    suite.results["export"] = results
    rows = []
    for kind, sides in results.items():
        ours, peer = sides.get("ours"), sides.get("builder")
        for label, key, fmt in (("wall s", "wall_s", ".1f"), ("CPU s", "cpu_s", ".1f"),
                                ("peak RSS MB", "peak_rss_mb", ".0f")):
            rows.append([kind, label, show(ours and ours[key], fmt), show(peer and peer[key], fmt),
                         show_ratio(ratio(ours and ours[key], peer and peer[key]))])
        if ours and peer:
            rows.append([kind, "graph MB", f"{ours['size']['bytes'] / 1e6:.1f}", f"{peer['size']['bytes'] / 1e6:.1f}",
                         show_ratio(ours["size"]["bytes"] / peer["size"]["bytes"])])
            rows.append([kind, "nodes", str(ours["size"]["nodes"]), str(peer["size"]["nodes"]),
                         show_ratio(ours["size"]["nodes"] / peer["size"]["nodes"])])
    suite.print_table(f"Export of SmolLM2-135M, whole process (python start to graph on disk), median [min-max] of "
                      f"{repeats} interleaved runs", ["kind", "what", "ours (fast path)", "genai builder", "ours/builder"],
                      rows)

