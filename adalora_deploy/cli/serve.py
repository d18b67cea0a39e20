"""The ``generate`` and ``serve`` subcommands: text from an export folder with onnxruntime alone.

Neither imports torch, transformers or bitsandbytes (a test runs both where those imports fail): they need
the ``serve`` extra (onnxruntime, tokenizers, jinja2, fastapi, uvicorn) and, for ``--engine genai``,
onnxruntime-genai.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from adalora_deploy.errors import ArtifactError
from adalora_deploy.export.runtime.engine import _check_adapter
from adalora_deploy.export.runtime.genai import GenaiGenerator
from adalora_deploy.export.runtime.generation import SamplingParams, TextGenerator

__all__ = ["register", "run_generate", "run_lm_eval", "run_serve"]

API_KEY_ENV = "ADALORA_DEPLOY_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register ``generate`` and ``serve``."""
    generate = subparsers.add_parser(
        "generate", help="generate text from an export folder (streamed; greedy or sampled; onnxruntime only)",
        description="Generate from an ONNX export with onnxruntime: one prompt streams token by token; several "
                    "prompts run as one left-padded batch. Greedy unless --temperature > 0.")
    generate.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by `adalora-deploy export`")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", metavar="TEXT", help="a raw prompt (repeat for a batch)")
    source.add_argument("--chat", action="append", metavar="TEXT",
                        help="a user message rendered with the tokenizer's chat template (repeat for a batch)")
    generate.add_argument("--system", default=None, metavar="TEXT", help="system message for --chat")
    generate.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default: 128)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    generate.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1 = off)")
    generate.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty (default: 1 = off)")
    generate.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible output)")
    generate.add_argument("--stop", action="append", default=[], metavar="TEXT",
                          help="stop before this text (repeatable)")
    generate.add_argument("--adapter", default=None, metavar="NAME|FILE",
                          help="an .onnx_adapter for an --adapter-inputs export: a file, or NAME for "
                               "EXPORT_DIR/NAME.onnx_adapter")
    generate.add_argument("--engine", choices=("onnxruntime", "genai"), default="onnxruntime",
                          help="onnxruntime: our decoding loop (default, faster here); genai: onnxruntime-genai's "
                               "og.Generator (needs the genai extra)")
    generate.add_argument("--json", action="store_true",
                          help="print one JSON line per prompt (text, token ids, finish reason) instead of text")
    generate.add_argument("--stats", action="store_true", help="print time to first token and tokens/s on stderr")
    _add_runtime(generate)
    generate.set_defaults(run=run_generate)

    serve = subparsers.add_parser(
        "serve", help="serve an export folder with an OpenAI-compatible HTTP API (onnxruntime only)",
        description="An OpenAI-compatible server (POST /v1/completions, POST /v1/chat/completions, GET /v1/models, "
                    "GET /health) with continuous batching; `model` selects the adapter per request.")
    serve.add_argument("export_dir", metavar="EXPORT_DIR", help="folder written by `adalora-deploy export`")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--adapters", default=None, metavar="DIR",
                       help="folder of .onnx_adapter files, each served as model id = its file name without suffix "
                            "(the export needs --adapter-inputs)")
    serve.add_argument("--api-key", default=None,
                       help=f"require `Authorization: Bearer KEY` on /v1 (default: ${API_KEY_ENV} if set, else none)")
    serve.add_argument("--model-name", default=None, help="model id of the export itself (default: the folder name)")
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests decoded together (default: 8)")
    serve.add_argument("--max-prefill-tokens", type=int, default=128,
                       help="prompt tokens per prefill run: smaller lets the first of many simultaneous requests "
                            "stream sooner on CPU, larger batches prefills (GPU) (default: 128)")
    serve.add_argument("--max-tokens-limit", type=int, default=2048,
                       help="largest max_tokens a request may ask for (default: 2048)")
    serve.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    serve.add_argument("--max-completions", type=int, default=16,
                       help="prompts x n of one request at most (default: 16); more is refused with 400")
    serve.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds a client may take to send its body (default: 30); slower gets 408")
    _add_runtime(serve)
    serve.set_defaults(run=run_serve)
    lm_eval = subparsers.add_parser(
        "lm-eval", help="lm-evaluation-harness with --model adalora-deploy available (the lmeval extra)",
        description="Runs lm-eval's own command line with every argument after lm-eval, after registering the "
                    "in-process model `adalora-deploy` (--model_args export=EXPORT_DIR[,batch_size=N]).")
    lm_eval.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval's arguments")
    lm_eval.set_defaults(run=run_lm_eval)


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)")
    parser.add_argument("--provider", choices=("cpu", "cuda", "auto"), default="cpu", help="onnxruntime provider")


def _adapter_path(export_dir: str, value: str | None) -> Path | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path
    named = Path(export_dir) / f"{value}.onnx_adapter"
    if os.sep not in value and named.is_file():
        return named
    raise ArtifactError(f"--adapter {value}: no such file, and no {named}")


def run_generate(args: argparse.Namespace) -> int:
    """Generate; text to stdout (streamed for one prompt), statistics to stderr with --stats."""
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                            stop=tuple(args.stop))
    adapter = _adapter_path(args.export_dir, args.adapter)
    if args.engine == "genai":
        generator = GenaiGenerator(args.export_dir)
        tokenizer = generator.tokenizer
        name = generator.load_adapter(adapter) if adapter is not None else None
        stream = lambda prompts: generator.stream(prompts, params, adapter=name)  # noqa: E731
    else:
        generator = TextGenerator.from_export(args.export_dir, provider=args.provider, intra_op_threads=args.threads)
        tokenizer = generator.tokenizer
        run_options, lora = _run_options(args.export_dir, generator, adapter) if adapter is not None else (None, None)
        stream = lambda prompts: generator.stream(prompts, params, run_options=run_options)  # noqa: E731
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [tokenizer.encode_chat([*system, {"role": "user", "content": text}]) for text in args.chat]
    else:
        prompts = [tokenizer.encode(text) for text in args.prompt]
    texts, tokens = [""] * len(prompts), [[] for _ in prompts]
    single = len(prompts) == 1 and not args.json
    start, first = time.perf_counter(), None
    for event in stream(prompts):
        first = first or time.perf_counter()
        texts[event.request_id] += event.text
        if event.token_id is not None:
            tokens[event.request_id].append(event.token_id)
        if single and event.text:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        if event.finish_reason is not None:
            i = event.request_id
            if args.json:
                print(json.dumps({"index": i, "text": texts[i], "token_ids": tokens[i],
                                  "finish_reason": event.finish_reason, "prompt_tokens": event.prompt_tokens},
                                 ensure_ascii=False), flush=True)
            elif single:
                sys.stdout.write("\n")
            else:
                print(f"[{i}] {texts[i]}", flush=True)
    if args.stats:
        elapsed = time.perf_counter() - start
        generated = sum(len(t) for t in tokens)
        decode = elapsed - (first - start) if first else 0.0
        print(f"{generated} tokens for {len(prompts)} prompt(s) in {elapsed:.2f} s; time to first token "
              f"{1000 * (first - start) if first else 0:.0f} ms; decode "
              f"{(generated - len(prompts)) / decode if decode > 0 else 0:.1f} tokens/s ({args.engine})",
              file=sys.stderr)
    return 0


def _run_options(export_dir: str, generator, adapter: Path):
    """onnxruntime RunOptions with the adapter active (checked against the graph first)."""
    import onnxruntime as ort

    if not generator.decoder.adapter_names:
        raise ArtifactError(f"{export_dir} was exported without --adapter-inputs: --adapter cannot switch its adapter")
    _check_adapter(adapter, generator)
    lora = ort.LoraAdapter()
    lora.Load(str(adapter))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    return options, lora  # the caller keeps the adapter alive as long as the options


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted (Ctrl-C / SIGINT: exit status 0 after a clean shutdown)."""
    # lazy: fastapi and uvicorn; generate runs without them
    from adalora_deploy.export.runtime.server import ServerSettings, serve

    settings = ServerSettings(host=args.host, port=args.port, api_key=args.api_key or os.environ.get(API_KEY_ENV),
                              max_tokens_limit=args.max_tokens_limit, max_batch_size=args.max_batch_size,
                              max_body_bytes=args.max_body_bytes, model_name=args.model_name,
                              max_prefill_tokens=args.max_prefill_tokens,
                              max_completions_per_request=args.max_completions, body_timeout_s=args.body_timeout)
    try:
        serve(args.export_dir, settings, adapters_dir=args.adapters, intra_op_threads=args.threads,
              provider=args.provider)
    except KeyboardInterrupt:  # uvicorn shuts down on Ctrl-C, then re-raises it: that is the normal way out
        print("server stopped", file=sys.stderr)
    return 0


def run_lm_eval(args: argparse.Namespace) -> int:
    from adalora_deploy.export.runtime.lm_eval_model import main  # lazy: lm-eval, an optional extra

    forwarded = list(args.lm_eval_args)
    return main(forwarded[1:] if forwarded[:1] == ["--"] else forwarded)
