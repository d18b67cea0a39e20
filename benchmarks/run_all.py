"""The benchmark suite: every figure ours vs the peer, measured side by side in one run, on SmolLM2-135M.

    python benchmarks/run_all.py [--quick] [--json FILE] [--sections training,export,decode,shipped,compaction,quantize]
                                 [--workdir DIR] [--threads 1]
                                 [--decode-threads 1,2] [--repeats N] [--run JOB_DIR]

Sections (one module each in ``benchmarks/sections/``, on the harness in ``benchmarks/harness.py``; each prints
a table; ``--json`` gets every sample, the spread and the commands):

- ``training``: one AdaLoRA training step (forward, backward, optimizer, allocator) and its peak memory,
  ours vs PEFT's AdaLoRA on the same base kind (dense fp32, bnb NF4), all seven projections, init_r 12.
  Each side runs in its own process (``run_all.py train-step ...``) so that its peak RSS is its own.
- ``export``: wall time, CPU time and peak RSS of a whole export process, our fast path
  (``bench_fastpath.py export``) vs onnxruntime-genai's model builder, runs interleaved; graph sizes.
- ``decode``: prefill latency (a 128-token prompt) and greedy decode tokens/s (batch 1) of the graphs just
  exported: our graph under our loop and under onnxruntime-genai, the builder's graph under onnxruntime-genai,
  and torch eager (fp32), runners interleaved; each as a fraction of the memory-bandwidth roofline
  (bandwidth from a numpy copy; bytes read per token = the graph's weight bytes).
- ``shipped``: the graphs the CLI writes: the main job's shipped graph (its defaults) and the same job's
  export stage rerun with every documented export option; size, check verdict, accuracy, prefill and decode
  (our loop and onnxruntime-genai, at 1 and 2 threads) beside the builder's ``-p int4`` graph.
- ``compaction``: an int4 base with a rank-12 AdaLoRA branch on every projection, the graph at init_r (pruned
  ranks kept as zeros) vs the graph at the surviving ranks (size, prefill, decode).
- ``quantize``: ``adalora-deploy quantize`` of the whole model, round-to-nearest and GPTQ (gptqmodel when
  it is installed).

The machine may be shared: compare the ratios, which were measured side by side, not absolute numbers
across runs. Everything the suite could not run is listed with the reason.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from harness import PYTHON, Suite, machine, resolve_model  # first: puts the repository on sys.path
from sections import SECTIONS
from sections import training

RUNNERS = {name: importlib.import_module(f"sections.{name}").run for name in SECTIONS}
"""Each section's ``run(suite)``, imported up front so that a broken section fails before any measurement."""


def main() -> int:
    if sys.argv[1:2] == ["train-step"]:
        training.train_step_main(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens, int4 only (< 10 min on 2 cores)")
    parser.add_argument("--json", type=Path, help="write every result, the skipped parts and the commands here")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--workdir", type=Path, help="graphs and checkpoints (default: a temporary folder, removed)")
    parser.add_argument("--threads", type=int, default=1, help="threads of torch (training, eager decode) and "
                        "onnxruntime's intra-op pool (default 1: steadier on a shared machine)")
    parser.add_argument("--decode-threads", default="1,2", help="shipped section: the intra-op thread counts its "
                        "graphs are timed at (default 1,2)")
    parser.add_argument("--repeats", type=int, help="timed runs per runner, interleaved, reported as median [min-max] "
                        "(default 5, --quick 3; more for steadier ratios on a shared machine)")
    parser.add_argument("--run", type=Path, help="shipped section: a finished main job's folder (default: "
                        "runs/smollm2-sentiment when it holds one, else the job is run in the workdir)")
    parser.add_argument("--gptqmodel-python", type=Path, help="quantize section: a python with gptqmodel installed "
                        "(e.g. a separate venv's bin/python; default: ours, when gptqmodel imports)")
    args = parser.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    with tempfile.TemporaryDirectory(prefix="run_all-") as temp:
        workdir = args.workdir or Path(temp)
        workdir.mkdir(parents=True, exist_ok=True)
        suite = Suite(quick=args.quick, workdir=workdir, threads=args.threads, run_dir=args.run, gptqmodel_python=args.gptqmodel_python,
                      decode_threads=tuple(int(n) for n in args.decode_threads.split(",")),
                      repeats_override=args.repeats)
        started = time.perf_counter()
        info = machine()
        print(f"benchmark suite ({'quick' if args.quick else 'full'}): {info}", flush=True)
        resolve_model(suite)
        for name in sections:
            section_start = time.perf_counter()
            try:
                RUNNERS[name](suite)
            except Exception as error:  # noqa: BLE001  (one broken section must not lose the others)
                import traceback

                traceback.print_exc()
                suite.skip(name, "the rest of the section", f"{type(error).__name__}: {error}")
            suite.results.setdefault("section_seconds", {})[name] = round(time.perf_counter() - section_start, 1)
        info["load_average_after"] = os.getloadavg()
        elapsed = time.perf_counter() - started
        print(f"\nsuite took {elapsed:.0f} s; load average before {info['load_average']}, after "
              f"{info['load_average_after']}")
        if suite.skipped:
            print("skipped:")
            for item in suite.skipped:
                print(f"  [{item['section']}] {item['what']}: {item['why']}")
        if args.json:
            report = {"quick": args.quick, "seconds": round(elapsed, 1), "machine": info, "model": suite.model_note,
                      "results": suite.results, "skipped": suite.skipped, "commands": suite.commands,
                      "reproduce": shlex.join([PYTHON, "benchmarks/run_all.py", *sys.argv[1:]]),
                      "tables": suite.tables}
            args.json.write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
