"""onnxruntime sessions and generation with the KV-cache decoding graph: numpy and onnxruntime only.

This module never imports torch, transformers or bitsandbytes, so serving runs on a machine that has
only onnxruntime (a test imports it in a process where those imports fail). The torch references for
parity live in :mod:`adalora_deploy.export.judge.parity`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from adalora_deploy.errors import MissingDependencyError, ProviderError

from ..contract import ATTENTION_MASK, INPUT_IDS, KV_SHARE_BUFFER_METADATA, PAST_PREFIX, present_for_past

__all__ = [
    "DecoderSession",
    "StepOutput",
    "adapter_feeds",
    "as_float32",
    "create_session",
    "execution_providers",
]

logger = logging.getLogger(__name__)

Provider = Literal["cpu", "cuda", "auto"]



def _ort():
    try:
        import onnxruntime
    except ImportError as error:
        raise MissingDependencyError(f"running ONNX models needs onnxruntime ({error}): pip install onnxruntime "
                                     "(or onnxruntime-gpu for CUDA)") from None
    return onnxruntime


def execution_providers(provider: Provider = "cpu") -> list[str]:
    """onnxruntime's provider list for ``provider`` (``cpu``, ``cuda`` or ``auto``); call it early to fail fast.

    Raises:
        ProviderError: an unknown provider, or CUDA asked for on an onnxruntime build without it.
    """
    available = _ort().get_available_providers()
    if provider not in ("cpu", "cuda", "auto"):
        raise ProviderError(f"--provider {provider!r}: choose cpu, cuda or auto")
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise ProviderError(
            f"--provider cuda: this onnxruntime offers only {', '.join(available)}; install the CUDA build "
            "(pip install 'adalora-deploy[gpu]', i.e. onnxruntime-gpu, instead of onnxruntime) or use --provider cpu"
        )
    use_cuda = provider == "cuda" or (provider == "auto" and "CUDAExecutionProvider" in available)
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]


def create_session(
    model_path: str | os.PathLike,
    *,
    provider: Provider = "cpu",
    intra_op_threads: int | None = None,
    qdq_matmulnbits_accuracy_level: int | None = 0,
    optimization: Literal["disable", "basic", "extended", "all"] = "all",
):
    """An ``onnxruntime.InferenceSession`` for an exported model.

    Args:
        model_path: the ``.onnx`` file (its ``.data`` file beside it).
        provider: ``"cpu"``; ``"cuda"`` (error if onnxruntime has no CUDA provider); ``"auto"`` (CUDA when
            available, else CPU).
        intra_op_threads: onnxruntime intra-op threads (``None``: onnxruntime's default).
        qdq_matmulnbits_accuracy_level: value of session option ``session.qdq_matmulnbits_accuracy_level``.
            At default optimization onnxruntime fuses blocked DequantizeLinear + MatMul into MatMulNBits
            with accuracy level 4 (~0.02 error per op); 0 keeps such fusions exact. ``None`` leaves the
            option unset. It does not change MatMulNBits nodes already in the graph (their own attribute).
        optimization: graph optimization level.

    Raises:
        ProviderError: CUDA was asked for and this onnxruntime build has no CUDA provider.
    """
    ort = _ort()
    options = ort.SessionOptions()
    # warnings off: adapter-input graphs give their inputs rank-0 default initializers on purpose (that is what
    # lets an .onnx_adapter override them), and onnxruntime warns about each one at every session start
    options.log_severity_level = 3
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    if qdq_matmulnbits_accuracy_level is not None:
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(qdq_matmulnbits_accuracy_level))
    providers = execution_providers(provider)
    logger.info("onnxruntime session for %s on %s", model_path, providers[0])
    return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)


def as_float32(value: Any) -> np.ndarray:
    """A numpy array or a torch tensor (any device/dtype, duck-typed: torch is not imported) as float32."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, dtype=np.float32)


def adapter_feeds(factors: Mapping[str, tuple[Any, Any]]) -> dict[str, np.ndarray]:
    """Graph feeds for adapter-input branches from PEFT-oriented factors.

    Args:
        factors: module name -> ``(A [r, in], B [out, r])`` (numpy arrays or torch tensors) with scaling
            folded in (rank 0 switches a module's adapter off).

    Returns:
        ``{"<module>.lora_A": A.T [in, r], "<module>.lora_B": B.T [r, out]}`` as contiguous fp32 arrays.
    """
    feeds: dict[str, np.ndarray] = {}
    for name, (a, b) in factors.items():
        feeds[f"{name}.lora_A"] = np.ascontiguousarray(as_float32(a).T)
        feeds[f"{name}.lora_B"] = np.ascontiguousarray(as_float32(b).T)
    return feeds


@dataclass(frozen=True)
class StepOutput:
    """One run of the decoding graph."""

    logits: np.ndarray
    """[batch, seq, vocab]."""
    present: tuple[np.ndarray, ...]
    """(key_0, value_0, key_1, ...) each [batch, kv_heads, total_seq, head_dim]."""


class DecoderSession:
    """A KV-cache decoding graph (``export.build.graph`` interface) in onnxruntime.

    Args:
        session: an ``onnxruntime.InferenceSession`` of an exported decoder (see :func:`create_session`).
    """

    def __init__(self, session) -> None:
        self.session = session
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = tuple(n for n in inputs if n.startswith(PAST_PREFIX))
        # adapter inputs with a default (rank-0) initializer are "overridable initializers" in onnxruntime:
        # optional per run, and what an .onnx_adapter activated through RunOptions replaces
        defaults = tuple(i.name for i in session.get_overridable_initializers()
                         if i.name.endswith((".lora_A", ".lora_B")))
        self.adapter_names = tuple(n for n in inputs if n.endswith((".lora_A", ".lora_B"))) + defaults
        self.adapter_optional = bool(defaults) and len(defaults) == len(self.adapter_names)
        """True when every adapter input has a default: feeding none runs the base (or RunOptions' adapter)."""
        self.output_names = tuple(o.name for o in session.get_outputs())
        if INPUT_IDS not in inputs or ATTENTION_MASK not in inputs or not self.past_names:
            raise ValueError(f"not a KV-cache decoding graph: inputs {sorted(inputs)}")
        shape = inputs[self.past_names[0]].shape
        self.num_layers = len(self.past_names) // 2
        self.num_kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.past_dtype = np.float16 if "float16" in inputs[self.past_names[0]].type else np.float32
        metadata = session.get_modelmeta().custom_metadata_map
        self.shares_kv_buffer = metadata.get(KV_SHARE_BUFFER_METADATA) == "1"
        """The graph can update its KV cache in place (see :meth:`generate_greedy`)."""

    def empty_past(self, batch: int) -> tuple[np.ndarray, ...]:
        """Zero-length past tensors for a prompt."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        return tuple(np.zeros(shape, self.past_dtype) for _ in self.past_names)

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: Sequence[np.ndarray] | None = None,
        adapter: Mapping[str, np.ndarray] | None = None,
        run_options=None,
    ) -> StepOutput:
        """Run the graph once.

        Args:
            input_ids: int64 [batch, seq].
            attention_mask: int64 [batch, past_seq + seq].
            past: the previous step's ``present`` (``None``: empty, i.e. a prompt).
            adapter: feeds for the adapter inputs (see :func:`adapter_feeds`); required iff the graph has them
                without defaults (:attr:`adapter_optional`).
            run_options: ``onnxruntime.RunOptions`` (e.g. with an active ``LoraAdapter``).
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        past = self.empty_past(input_ids.shape[0]) if past is None else past
        feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: np.asarray(attention_mask, dtype=np.int64)}
        feeds.update(zip(self.past_names, past))
        adapter = dict(adapter or {})
        if set(adapter) != set(self.adapter_names) and not (self.adapter_optional and not adapter):
            raise ValueError(
                f"adapter feeds {sorted(adapter)} do not match the graph's adapter inputs {sorted(self.adapter_names)}"
            )
        feeds.update(adapter)
        outputs = self.session.run(list(self.output_names), feeds, run_options)
        return StepOutput(logits=outputs[0], present=tuple(outputs[1:]))

    def generate_greedy(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        max_new_tokens: int,
        *,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        adapter: Mapping[str, np.ndarray] | None = None,
        run_options=None,
        share_kv_buffer: bool | None = None,
    ) -> np.ndarray:
        """Greedy decoding with the KV cache, batch with left padding, as transformers' ``generate`` does
        (finished rows are filled with ``pad_token_id``; stops when all rows finished). ``adapter`` and
        ``run_options`` are passed to every step.

        ``share_kv_buffer`` (default: when the graph supports it, :attr:`shares_kv_buffer`): bind one
        preallocated ``[batch, kv_heads, prompt + max_new_tokens, head_dim]`` buffer per past tensor as both
        the past input and the present output (onnxruntime IOBinding), so GroupQueryAttention appends the new
        keys/values in place instead of copying the whole cache into fresh outputs every step (what
        onnxruntime-genai's ``past_present_share_buffer`` does). Same tokens either way.

        Returns:
            int64 [batch, prompt + generated] (prompt included).
        """
        if eos_token_id is not None and pad_token_id is None:
            raise ValueError("generate_greedy: eos_token_id needs a pad_token_id for finished rows")
        sequences = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        batch = sequences.shape[0]
        if share_kv_buffer is None:
            # onnxruntime 1.32's IOBinding neither binds adapter inputs that have defaults (overridable
            # initializers: "Failed to find NodeArg") nor applies an adapter activated through RunOptions (the
            # first generated token came from the base model), so adapter runs take the plain path
            share_kv_buffer = self.shares_kv_buffer and run_options is None and not adapter
        elif share_kv_buffer and not self.shares_kv_buffer:
            raise ValueError("generate_greedy: this graph cannot update its KV cache in place (no GroupQueryAttention "
                             f"metadata {KV_SHARE_BUFFER_METADATA!r})")
        step = self._shared_buffer_steps(batch, sequences.shape[1] + max_new_tokens) if share_kv_buffer else None
        finished = np.zeros(batch, dtype=bool)
        current, past = sequences, None
        for _ in range(max_new_tokens):
            if step is not None:
                logits = step(current, mask, adapter, run_options)
            else:
                out = self.step(current, mask, past, adapter, run_options)
                logits, past = out.logits, out.present
            next_tokens = logits[:, -1].argmax(-1).astype(np.int64)
            if eos_token_id is not None:
                next_tokens = np.where(finished, pad_token_id, next_tokens)
                finished |= next_tokens == eos_token_id
            sequences = np.concatenate([sequences, next_tokens[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
            current = next_tokens[:, None]
            if finished.all():
                break
        return sequences

    def _shared_buffer_steps(self, batch: int, capacity: int):
        """A step function ``(input_ids, attention_mask, adapter, run_options) -> logits`` over in-place KV
        buffers of ``capacity`` positions (only the first ``attention_mask.shape[1]`` hold the cache).

        The logits go to preallocated OrtValues (one per sequence length seen: the prompt's, then 1), read
        directly: ``IOBinding.get_outputs()`` would wrap all 2L + 1 outputs every step (~0.7 ms a step on
        SmolLM2, 4% of an int4 decode step).
        """
        ort = _ort()
        shape = [batch, self.num_kv_heads, capacity, self.head_dim]
        buffers = [ort.OrtValue.ortvalue_from_shape_and_type(shape, self.past_dtype, "cpu", 0) for _ in self.past_names]
        present_names = [present_for_past(name) for name in self.past_names]
        vocab = self.session.get_outputs()[0].shape[-1]
        logits_name = self.output_names[0]
        binding = self.session.io_binding()
        if not isinstance(vocab, int):  # bound first, so that it is get_outputs()[0]
            binding.bind_output(logits_name, "cpu")
        for past_name, present_name, buffer in zip(self.past_names, present_names, buffers):
            binding.bind_ortvalue_input(past_name, buffer)
            binding.bind_ortvalue_output(present_name, buffer)
        logits_buffers: dict[int, object] = {}

        def step(input_ids, attention_mask, adapter, run_options) -> np.ndarray:
            if attention_mask.shape[1] > capacity:
                raise ValueError(f"shared KV buffer holds {capacity} positions, the mask has {attention_mask.shape[1]}")
            adapter = dict(adapter or {})
            if set(adapter) != set(self.adapter_names) and not (self.adapter_optional and not adapter):
                raise ValueError(f"adapter feeds {sorted(adapter)} do not match the graph's adapter inputs "
                                 f"{sorted(self.adapter_names)}")
            binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(input_ids, dtype=np.int64))
            binding.bind_cpu_input(ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
            for name, value in adapter.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            seq = input_ids.shape[1]
            if not isinstance(vocab, int):  # symbolic vocab: let onnxruntime allocate, read it back
                binding.bind_output(logits_name, "cpu")
                self.session.run_with_iobinding(binding, run_options)
                return binding.get_outputs()[0].numpy()
            if seq not in logits_buffers:
                logits_buffers[seq] = ort.OrtValue.ortvalue_from_shape_and_type([batch, seq, vocab], np.float32, "cpu", 0)
            binding.bind_ortvalue_output(logits_name, logits_buffers[seq])
            self.session.run_with_iobinding(binding, run_options)
            return logits_buffers[seq].numpy()

        return step


