"""Decode tokens/s and time to first token of an export: our decoding loop vs onnxruntime-genai, 1 and 8 requests
at once, and the HTTP server with the official openai client at 1 and 8 concurrent streaming clients.

    python benchmarks/bench_serve.py EXPORT_DIR [--new-tokens 128] [--repeats 3] [--threads 1] [--clients 1 8]

Every engine decodes exactly ``--new-tokens`` greedy tokens per request (EOS ignored: our loop runs with an
empty EOS set, genai with ``min_length``), so tokens/s compare like for like; the greedy tokens of both
runtimes are compared as well. Engines run back to back in each repeat and the median is printed, because
the machine may be shared: compare ratios within one run rather than absolute numbers across runs.

Columns: TTFT = time from submission to the request's first token (mean over requests); decode tok/s = per
request, (tokens - 1) / (last token - first token), mean over requests; total tok/s = all tokens / wall time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

QUESTIONS = [
    "Explain how a river forms and where its water comes from.",
    "Write a short story about a miller and his boat.",
    "What are the four seasons and how do they differ?",
    "Describe a small town by the sea in a few sentences.",
    "Give three tips for learning a new language.",
    "Why is the sky blue? Answer for a child.",
    "List some uses of a water mill in the past.",
    "What makes bread rise when it is baked?",
]


@dataclasses.dataclass
class Timing:
    submitted: float
    tokens: list[int] = dataclasses.field(default_factory=list)
    times: list[float] = dataclasses.field(default_factory=list)

    def add(self, token: int) -> None:
        self.tokens.append(token)
        self.times.append(time.perf_counter())


def summarize(timings: list[Timing], wall: float) -> dict[str, float]:
    ttft = [t.times[0] - t.submitted for t in timings]
    decode = [(len(t.times) - 1) / (t.times[-1] - t.times[0]) for t in timings if len(t.times) > 1]
    return {"ttft_ms": 1000 * statistics.mean(ttft), "ttft_max_ms": 1000 * max(ttft),
            "decode_tok_s": statistics.mean(decode), "total_tok_s": sum(len(t.tokens) for t in timings) / wall}


def prompts_for(tokenizer, count: int) -> list[list[int]]:
    return [tokenizer.encode_chat([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(count)]


# --- our loop ------------------------------------------------------------------------------------------------


THREADS: int | None = None
"""onnxruntime intra-op threads for every engine (``--threads``; ``None``: each runtime's default)."""


def og_model(export_dir: Path, engine: dict | None = None):
    """``og.Model`` with the benchmark's thread count (and engine settings) overlaid on genai_config.json."""
    import onnxruntime_genai as og

    config = og.Config(str(export_dir))
    overlay: dict = {}
    if THREADS is not None:
        overlay["model"] = {"decoder": {"session_options": {"intra_op_num_threads": THREADS}}}
    if engine is not None:
        overlay["engine"] = engine
    if overlay:
        config.overlay(json.dumps(overlay))
    return og.Model(config)


def ours(export_dir: Path, clients: int, new_tokens: int, max_prefill_tokens: int | None = None) -> tuple[dict, list[list[int]]]:
    from adalora_deploy.export.runtime.engine import Engine, served_models
    from adalora_deploy.export.runtime.generation import GenerationRequest, SamplingParams, TextGenerator

    generator = TextGenerator.from_export(export_dir, intra_op_threads=THREADS)
    generator.limits = dataclasses.replace(generator.limits, eos_token_ids=frozenset())
    extra = {} if max_prefill_tokens is None else {"max_prefill_tokens": max_prefill_tokens}
    engine = Engine(generator, served_models(export_dir, generator), max_batch_size=max(clients, 1), **extra)
    engine.start()
    model = next(iter(engine.models))
    prompts = prompts_for(generator.tokenizer, clients)
    timings = [Timing(0.0) for _ in prompts]
    done = threading.Semaphore(0)

    def sink(timing: Timing):
        def on_event(event):
            if event.token_id is not None:
                timing.add(event.token_id)
            if event.finish_reason is not None:
                done.release()
        return on_event

    start = time.perf_counter()
    for prompt, timing in zip(prompts, timings):  # all at once, each its own request
        timing.submitted = time.perf_counter()
        engine.submit(model, [GenerationRequest(tuple(prompt), SamplingParams(max_new_tokens=new_tokens))], sink(timing))
    for _ in prompts:
        done.acquire()
    wall = time.perf_counter() - start
    engine.stop()
    return summarize(timings, wall), [t.tokens for t in timings]


# --- onnxruntime-genai ----------------------------------------------------------------------------------------


def genai_generator(export_dir: Path, clients: int, new_tokens: int) -> tuple[dict, list[list[int]]]:
    """og.Generator, one per request (concurrent requests in threads; og batches only equal-length prompts)."""
    import onnxruntime_genai as og

    from adalora_deploy.export.runtime.tokenizer import TextTokenizer

    model = og_model(export_dir)
    prompts = prompts_for(TextTokenizer.from_folder(export_dir), clients)
    timings = [Timing(0.0) for _ in prompts]

    def run(i: int) -> None:
        params = og.GeneratorParams(model)
        length = len(prompts[i]) + new_tokens
        params.set_search_options(max_length=length, min_length=length, do_sample=False)
        generator = og.Generator(model, params)
        timings[i].submitted = time.perf_counter()
        generator.append_tokens(np.array([prompts[i]], dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            timings[i].add(int(generator.get_next_tokens()[0]))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    return summarize(timings, time.perf_counter() - start), [t.tokens for t in timings]


def genai_engine(export_dir: Path, clients: int, new_tokens: int) -> tuple[dict, list[list[int]]]:
    """og.Engine (genai's own scheduler, static batching of up to ``clients`` requests)."""
    import onnxruntime_genai as og

    from adalora_deploy.export.runtime.tokenizer import TextTokenizer

    engine = og.Engine(og_model(export_dir, {"static_batching": {"max_batch_size": max(clients, 1)}}))
    prompts = prompts_for(TextTokenizer.from_folder(export_dir), clients)
    timings, requests = {}, []
    start = time.perf_counter()
    for prompt in prompts:
        request = engine.create_request()
        options = og.TurnOptions(request)
        options.set_temperature(0.0)
        options.set_max_generated_tokens(new_tokens)
        options.set_min_generated_tokens(new_tokens)
        timing = Timing(time.perf_counter())
        request.begin_turn(np.array(prompt, dtype=np.int32), options)
        requests.append(request)
        timings[id(request)] = timing
    buffer = engine.create_event_buffer(256)
    order = [id(r) for r in requests]
    while engine.has_pending_requests():
        for event in engine.run(buffer):
            if int(event.flags.value) & int(og.EngineEventFlags.TOKEN.value):
                timings[id(event.request)].add(int(event.token))
    wall = time.perf_counter() - start
    ordered = [timings[k] for k in order]
    return summarize(ordered, wall), [t.tokens for t in ordered]


# --- the HTTP server --------------------------------------------------------------------------------------------


def http(export_dir: Path, clients: int, new_tokens: int) -> tuple[dict, list[list[int]]]:
    """Our server (uvicorn in a thread) and the official openai client, streaming chat completions."""
    import openai
    import uvicorn

    from adalora_deploy.export.runtime.server import ServerSettings, build_service, create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    service = build_service(export_dir, ServerSettings(port=port, max_batch_size=max(clients, 1)),
                            intra_op_threads=THREADS)
    service.engine.generator.limits = dataclasses.replace(service.limits, eos_token_ids=frozenset())
    server = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    model = next(iter(service.engine.models))
    timings = [Timing(0.0) for _ in range(clients)]

    def run(i: int) -> None:
        timings[i].submitted = time.perf_counter()
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], max_tokens=new_tokens,
            temperature=0, stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                timings[i].add(0)  # a content chunk (one or more tokens of text)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run, range(clients)))
    wall = time.perf_counter() - start
    server.should_exit = True
    thread.join(timeout=30)
    service.engine.stop()
    result = summarize(timings, wall)
    result["total_tok_s"] = clients * new_tokens / wall  # chunks may hold several tokens: count tokens asked
    return result, []


def ours_one_prefill(export_dir: Path, clients: int, new_tokens: int) -> tuple[dict, list[list[int]]]:
    """Our engine with every simultaneous prompt in one prefill run (no max_prefill_tokens split)."""
    return ours(export_dir, clients, new_tokens, max_prefill_tokens=1 << 30)


ENGINES = {"ours": ours, "ours-one-prefill": ours_one_prefill, "genai-generator": genai_generator, "genai-engine": genai_engine, "http-ours": http}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--engines", nargs="+", default=["ours", "genai-generator", "genai-engine", "http-ours"],
                        choices=list(ENGINES))
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of every engine")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    results: dict[tuple[str, int], list[dict]] = {}
    tokens: dict[tuple[str, int], list[list[int]]] = {}
    for _ in range(args.repeats):
        for clients in args.clients:
            for name in args.engines:
                result, generated = ENGINES[name](args.export_dir, clients, args.new_tokens)
                results.setdefault((name, clients), []).append(result)
                if generated:
                    tokens[(name, clients)] = generated
                print(f"  {name:16s} clients={clients}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()),
                      file=sys.stderr, flush=True)
    print(f"\n{args.export_dir} ({args.new_tokens} new tokens per request, median of {args.repeats}, "
          f"threads {args.threads or 'default'})\n")
    print("| engine | clients | TTFT mean (ms) | TTFT max (ms) | decode tok/s per request | total tok/s |")
    print("|---|---|---|---|---|---|")
    for (name, clients), runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {name} | {clients} | {med['ttft_ms']:.0f} | {med['ttft_max_ms']:.0f} | {med['decode_tok_s']:.1f} "
              f"| {med['total_tok_s']:.1f} |")
    print()
    for clients in args.clients:
        reference = tokens.get(("ours", clients))
        for name in ("genai-generator", "genai-engine"):
            other = tokens.get((name, clients))
            if reference and other:
                same = sum(a == b for a, b in zip(reference, other))
                print(f"greedy tokens, ours vs {name}, {clients} request(s): {same}/{len(reference)} identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
