"""``generate`` and ``serve`` run in a process where torch, transformers, bitsandbytes, onnx, onnxscript and peft
cannot be imported (an edge box with the serve extra only), on exports made here with the full stack."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from adalora_deploy.export.runtime.generation import SamplingParams, TextGenerator

from tests.test_structure import BLOCK_HEAVY_IMPORTS

BLOCKED = {"torch", "transformers", "bitsandbytes", "onnx", "onnxscript", "peft"}
PROLOGUE = BLOCK_HEAVY_IMPORTS.format(blocked=BLOCKED) + """
import atexit
def _report():
    loaded = sorted(m for m in {blocked!r} if m in sys.modules)
    print("HEAVY_MODULES", loaded, file=sys.stderr, flush=True)
atexit.register(_report)
from adalora_deploy.cli import main
""".format(blocked=BLOCKED)
START_TIMEOUT_S = 120


def _cli(argv: list[str]) -> str:
    return PROLOGUE + f"raise SystemExit(main({argv!r}))\n"


def test_generate_without_torch(serving_exports, tmp_path):
    export = serving_exports.adapter_inputs
    argv = ["generate", str(export), "--chat", "Where does the river go?", "--adapter", "adapter", "--json",
            "--max-new-tokens", "8", "--repetition-penalty", "5"]
    result = subprocess.run([sys.executable, "-c", _cli(argv)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "HEAVY_MODULES []" in result.stderr
    got = json.loads(result.stdout)
    merged = TextGenerator.from_export(serving_exports.merged)  # the export's own adapter, baked in
    prompt = merged.tokenizer.encode_chat([{"role": "user", "content": "Where does the river go?"}])
    want = merged.generate([prompt], SamplingParams(max_new_tokens=8, repetition_penalty=5.0))[0]
    assert got["token_ids"] == list(want.token_ids) and got["text"] == want.text


def test_serve_without_torch(serving_exports, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["serve", str(serving_exports.adapter_inputs), "--port", str(port), "--adapters",
            str(serving_exports.adapters), "--api-key", "k"]
    process = subprocess.Popen([sys.executable, "-c", _cli(argv)], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()
        assert {m["id"] for m in models["data"]} == {"tiny-ai", "adapter", "second"}
        body = {"model": "second", "prompt": "In winter the", "max_tokens": 6, "temperature": 0}
        completion = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60).json()
        chat = httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=60, json={
            "model": "tiny-ai", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1
    finally:
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    assert "HEAVY_MODULES []" in stderr and "Traceback" not in stderr
    import onnxruntime as ort

    generator = TextGenerator.from_export(serving_exports.adapter_inputs)
    lora = ort.LoraAdapter()
    lora.Load(str(serving_exports.adapters / "second.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    want = generator.generate([generator.tokenizer.encode("In winter the")], SamplingParams(max_new_tokens=6),
                              run_options=options)[0]
    assert completion["choices"][0]["text"] == want.text


def test_logprobs_and_the_lm_eval_model_without_torch(serving_exports, tmp_path):
    """The log-probability code and (when lm-eval is installed) the in-process lm-eval model import and score
    without torch."""
    import importlib.util

    with_lm_eval = importlib.util.find_spec("lm_eval") is not None
    script = BLOCK_HEAVY_IMPORTS.format(blocked=BLOCKED) + f"""
from adalora_deploy.export.runtime.generation import SamplingParams, TextGenerator
from adalora_deploy.export.runtime.logprobs import CompletionLogprobs, TokenTexts
import adalora_deploy.export.runtime.server
generator = TextGenerator.from_export({str(serving_exports.merged)!r})
prompt = generator.tokenizer.encode("In winter the")
events = list(generator.stream([prompt], SamplingParams(max_new_tokens=0, prompt_logprobs=1)))
scored = CompletionLogprobs(TokenTexts(generator.tokenizer)).piece(prompt, events[0].prompt_logprobs)
assert scored["token_logprobs"][0] is None and len(scored["tokens"]) == len(prompt)
if {with_lm_eval!r}:
    from adalora_deploy.export.runtime.lm_eval_model import AdaloraDeployLM
    model = AdaloraDeployLM(export={str(serving_exports.merged)!r})
    total = model._loglikelihood_tokens([(("a", "b"), prompt[:-1], prompt[-1:])])[0][0]
    assert abs(total - scored["token_logprobs"][-1]) < 1e-5, (total, scored)
print("HEAVY_MODULES", sorted(m for m in {BLOCKED!r} if m in sys.modules))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "HEAVY_MODULES []" in result.stdout
