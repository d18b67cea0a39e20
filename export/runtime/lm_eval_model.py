"""An lm-evaluation-harness model over an export folder, in process (no HTTP): onnxruntime only, no torch.

Registered in lm-eval's model registry as ``adalora-deploy`` when this module is imported. lm-eval 0.4.13 has no
plugin discovery (its registry lists its own models only), so ``adalora-deploy lm-eval ARGS`` imports this
module and then runs lm-eval's own command line with ``ARGS``::

    adalora-deploy lm-eval --model adalora-deploy --model_args export=runs/smollm2-sentiment/exports/separate \\
        --tasks my_task --include_path tasks/

and from Python, ``import adalora_deploy.export.runtime.lm_eval_model`` before ``lm_eval.simple_evaluate(model=
"adalora-deploy", model_args="export=DIR")``.

How requests are scored, the same way as through the server (``--model local-completions``) and as lm-eval's
``hf`` model scores a torch model:

- ``loglikelihood``: context + continuation run as one prompt that is only scored (``max_new_tokens`` 0, the
  server's ``echo`` with ``max_tokens: 0``): one prefill per batch, no decoding; the continuation's
  log-probabilities (:mod:`.logprobs`) are summed; greedy = every continuation token is the argmax;
- ``loglikelihood_rolling``: lm-eval's rolling windows over the context length, scored the same way;
- ``generate_until``: greedy decoding (or sampling with ``temperature``) with ``until`` as stop strings.

Tokenization follows lm-eval's API models: no special tokens added unless ``add_bos_token=True`` (pass the
same to ``hf`` to compare).
"""

from __future__ import annotations

import logging
from typing import Any

from adalora_deploy.errors import require

from .generation import GenerationRequest, SamplingParams, TextGenerator, TokenEvent

__all__ = ["MODEL_NAME", "AdaloraDeployLM", "main"]

logger = logging.getLogger(__name__)

require("lm_eval", "lmeval", "evaluating with lm-evaluation-harness")
from lm_eval import utils as lm_utils  # noqa: E402
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import model_registry  # noqa: E402

MODEL_NAME = "adalora-deploy"
"""The name ``--model`` takes."""
DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's default for ``generate_until`` (as its API models)."""


class AdaloraDeployLM(TemplateLM):
    """lm-eval's model interface over :class:`~.generation.TextGenerator`.

    Args:
        export: the export folder (``model.onnx``, tokenizer, config).
        batch_size: rows per prefill / generation batch (lm-eval's ``--batch_size``; ``auto`` means 8).
        max_gen_toks: default ``max_gen_toks`` of ``generate_until``.
        add_bos_token: add the tokenizer's special tokens (BOS) when encoding.
        provider: onnxruntime provider (``cpu``, ``cuda``, ``auto``).
    """

    def __init__(self, export: str, batch_size: int | str = 8, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 add_bos_token: bool = False, provider: str = "cpu", **ignored: Any) -> None:
        super().__init__()
        for key in ignored:
            if key not in ("device", "max_batch_size", "trust_remote_code"):
                raise ValueError(f"--model_args {key}: unknown for {MODEL_NAME}; use export, batch_size, max_gen_toks, "
                                 "add_bos_token, provider")
        self.generator = TextGenerator.from_export(export, provider=provider)
        self.text_tokenizer = self.generator.tokenizer
        self.limits = self.generator.limits
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = str(add_bos_token).lower() in ("true", "1")
        self.export = str(export)

    # --- tokens -------------------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return min(self.limits.eos_token_ids, default=self.limits.pad_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.text_tokenizer.special_tokens.get("bos_token")
        bos_id = self.text_tokenizer.token_id(bos) if bos else None
        return bos_id if bos_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.limits.context_length

    @property
    def tokenizer_name(self) -> str:
        return self.export

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else bool(add_special_tokens)
        return self.text_tokenizer.encode(string, add_special_tokens=special)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.text_tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.text_tokenizer.render_chat(chat_history, add_generation_prompt=add_generation_prompt)

    # --- scoring ------------------------------------------------------------------------------------------

    def _score(self, sequences: list[list[int]], scored: list[int]) -> list[tuple[float, bool]]:
        """(sum of the log-probabilities of the last ``scored[i]`` tokens of ``sequences[i]``, all of them argmax)."""
        results: list[tuple[float, bool] | None] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            events: list[TokenEvent] = []
            requests = [GenerationRequest(tuple(sequences[i]), SamplingParams(max_new_tokens=0, prompt_logprobs=1), n)
                        for n, i in enumerate(chunk)]
            self.generator.batch().add(requests, events.append)
            for event in events:
                i = chunk[event.request_id]
                entries = (event.prompt_logprobs or ())[len(sequences[i]) - scored[i]:]
                results[i] = (sum(e.logprob for e in entries), all(e.top[0][0] == e.token_id for e in entries))
        return results  # type: ignore[return-value]

    def _fit(self, tokens: list[int]) -> list[int]:
        """The last tokens that fit the context (a prompt leaves one position free)."""
        return tokens[-(self.limits.context_length - 1):]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        sequences = [self._fit(list(context) + list(continuation)) for _, context, continuation in requests]
        results = self._score(sequences, [len(continuation) for _, _, continuation in requests])
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for (string,) in [request.args for request in requests]:
            windows = [lm_utils.make_disjoint_window(window) for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.limits.context_length - 1, context_len=1)]
            scores = self._score([list(context) + list(target) for context, target in windows],
                                 [len(target) for _, target in windows])
            total = sum(score for score, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results = []
        for start in range(0, len(requests), self.batch_size):
            chunk = [request.args for request in requests[start:start + self.batch_size]]
            prompts, params = [], []
            for context, gen_kwargs in chunk:
                kwargs = dict(gen_kwargs or {})
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                max_gen = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
                temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
                if not kwargs.pop("do_sample", temperature > 0):
                    temperature = 0.0
                prompt = self.tok_encode(context)[-(self.limits.context_length - max_gen):]
                prompts.append(prompt)
                params.append(SamplingParams(max_new_tokens=max_gen, temperature=temperature,
                                             top_p=float(kwargs.pop("top_p", 1.0) or 1.0), stop=tuple(until),
                                             seed=kwargs.pop("seed", None)))
            for (context, gen_kwargs), completion in zip(chunk, self.generator.generate(prompts, params)):
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), completion.text)
                results.append(completion.text)
        return results


import lm_eval.models  # noqa: E402,F401  (lm-eval's own models, registered lazily: an empty registry would
# otherwise hold only ours, and lm-eval fills it only when it finds it empty)

if MODEL_NAME not in model_registry:
    model_registry.register(MODEL_NAME)(AdaloraDeployLM)


def main(argv: list[str]) -> int:
    """lm-eval's command line with ``--model adalora-deploy`` available (``adalora-deploy lm-eval ARGS``)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
