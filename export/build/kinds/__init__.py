"""Base kinds on the export side: one file per kind, keyed by the training backend's kind.

Training reads a base layer through its backend (:mod:`adalora_deploy.backends`); export asks the
matching :class:`ExportKind` for the layer's ONNX twin and for what the graph then computes. A kind file
here is the whole record of a kind, and adding one touches that file and its tests, nothing else (every
module of this package whose name does not start with ``_`` is imported and registers itself):

- its :class:`ExportKind`: the twin of a base layer, the arithmetic and tier of each export mode, the
  advice ``check`` gives (:meth:`ExportKind.exact_exports`), its row in the table below;
- its twin module, whose ``lowering()`` is the one ONNX lowering both builders emit: a
  ``contrib.ContribNode`` (one ``com.microsoft`` node) or a ``contrib.PatternNode`` (standard nodes written
  once against ``contrib.PatternBuilder``); the forward calls the op's custom op through it;
- its op, when it brings one: the schema (``contrib.register_schema``), the custom op (the eager arithmetic,
  ``torch.library.custom_op("adalora_export::...")``) and the ``contrib.ContribOp`` / ``contrib.PatternOp``
  registered with ``contrib.register_op``, which generates the dynamo path's translation and adds the op to
  the ones the manifest counts as quantized (:func:`quantized_ops`);
- the twin's ``can_fuse_with(others)``: whether siblings reading the same input (q/k/v, gate/up) concatenate
  along N into one node in the fast path (without it they stay separate nodes).

The shared machinery asks the kind through these hooks and names none: ``fastpath.linear.LinearEmitter``
emits any ``ContribNode`` / ``PatternNode``, ``contrib.CUSTOM_TRANSLATION_TABLE`` holds every registered op.
A twin that reuses MatMulNBits (``modules.NBitsLinear``, shared by gptq, the bnb serving twins and the fast
path's quantized lm_head; its op is in ``contrib``) needs no op of its own. tests/export/test_new_kind.py
adds a kind from a test file alone and exports it through both builders.

    backend kind            file        twin of a base layer (separate mode)
    dense, dense-conv1d     dense.py    the layer itself (fp32 MatMul)
    bnb-4bit                bnb4.py     Bnb4Linear: MatMulBnb4 (exact) | NBitsLinear int4 (serving)
    bnb-int8                bnb8.py     Int8EmulationLinear: LLM.int8 pattern (exact) | NBitsLinear 8-bit (serving)
    gptq                    gptq.py     NBitsLinear repacked exactly (accuracy 0 | serving: 4)

:func:`arithmetic_table` renders every kind's description; the README's "Export modes" table is that
rendering (a test keeps them equal), so the arithmetic is written in one place.
"""

from __future__ import annotations

import abc
import importlib
import pkgutil
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import nn

from adalora_deploy.backends import backend_for, is_supported
from adalora_deploy.errors import ExportError

from .. import contrib

__all__ = [
    "BRANCH",
    "INT8_DOWN_BRANCH",
    "Arithmetic",
    "ExportKind",
    "SERVING_ACCURACY_LEVEL",
    "SourceTier",
    "Tier",
    "arithmetic_table",
    "kind_for_module",
    "kind_for_quantization",
    "keeping_exports",
    "kinds",
    "quantized_ops",
    "register_kind",
    "twin_of",
    "untwinned",
]

Tier = Literal["exact", "lossy"]
SourceTier = Literal["exact", "lossy"]

SERVING_ACCURACY_LEVEL = 4
"""MatMulNBits accuracy_level of serving graphs: int8 activations (5-8x faster on CPU than level 0, lossy)."""
MERGED_EXACT = "`--mode merged` (fp32, exact)"
"""The export that keeps any base's trained arithmetic (the advice when a kind has nothing better)."""
BRANCH = " + fp32 low-rank branch x·Aᵀ·Bᵀ per module with rank > 0"
"""What separate mode adds beside every base kind's matmul."""
INT8_DOWN_BRANCH = (" + low-rank branch per module with rank > 0: x·Aᵀ as an 8-bit MatMulNBits at accuracy_level 4 (A on "
                    "the 8-bit grid it was trained on, the base's activation codes), then fp32 ·Bᵀ")
"""Separate mode's branch for an adapter trained with ``adapter.down_weights: int8``."""


@dataclass(frozen=True)
class Arithmetic:
    """What one graph computes and how it is judged."""

    text: str
    """The arithmetic, in words (which torch arithmetic it reproduces)."""
    tier: Tier
    """Parity tier against the torch twin (the same conversion in torch)."""
    source_tier: SourceTier
    """Parity tier against the source model (base with its own kernels + adapter): the verdict ``check``
    gives, since the source is what was trained."""


class ExportKind(abc.ABC):
    """How base layers of one kind are exported.

    Attributes:
        backend_kinds: the training backends' ``kind`` values this plug-in exports.
        quantizations: the ``model.quantization`` values that load such bases.
        label: the base column of :func:`arithmetic_table`.
        twins: the export modules :meth:`twin` builds, for messages (empty when the layer is its own twin).
        trained_int4: the base itself is the int4 a deployment wants (GPTQ): no advice to re-quantize.
        row: the kind's place in :func:`arithmetic_table` (and in :func:`kinds`); new kinds go last by default.
    """

    backend_kinds: ClassVar[tuple[str, ...]]
    quantizations: ClassVar[tuple[str, ...]]
    label: ClassVar[str]
    twins: ClassVar[str] = ""
    trained_int4: ClassVar[bool] = False
    row: ClassVar[int] = 100

    @abc.abstractmethod
    def twin(self, module: nn.Module, *, serving: bool) -> nn.Module:
        """The export-friendly module computing what the graph will compute for this base layer."""

    @abc.abstractmethod
    def separate(self, *, serving: bool) -> Arithmetic:
        """The separate-mode graph's arithmetic for the base layer (kept in its own format; the adapter's
        branch, :data:`BRANCH`, is added beside it)."""

    def int8_trained(self, *, mode: str) -> Arithmetic:
        """The arithmetic when training computed with int8 activations (only GPTQ bases can)."""
        raise ExportError(f"{self.label}: int8 activations (model.activations: int8) exist only on GPTQ bases")

    def merged(self) -> Arithmetic:
        """The fp32 merged graph's arithmetic: ``dequant(W0) + ΔW`` in one fp32 MatMul."""
        return Arithmetic("fp32 MatMul of dequant(W0) + ΔW", "exact", "exact")

    def exact_exports(self, quantization: str) -> str:
        """The exports that keep what a model trained on this base computes (``check``'s advice)."""
        return MERGED_EXACT

    @property
    def has_serving(self) -> bool:
        """Whether ``--serving`` changes this kind's graph."""
        return self.separate(serving=True) != self.separate(serving=False)


_registry: list[ExportKind] = []
_loaded = False


def register_kind(kind: ExportKind) -> ExportKind:
    """Add an export kind (a kind file calls it when imported; its table row follows :attr:`ExportKind.row`)."""
    _registry.insert(0, kind)
    return kind


def kinds() -> tuple[ExportKind, ...]:
    """Every registered kind, in table order (:attr:`ExportKind.row`, then registration order)."""
    _ensure_loaded()
    return tuple(sorted(reversed(_registry), key=lambda kind: kind.row))


def _ensure_loaded() -> None:
    """Import every kind file of this package (each registers its kind): a new file needs no list entry."""
    global _loaded
    if not _loaded:
        _loaded = True
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")


def quantized_ops() -> frozenset[str]:
    """The ops that compute with quantized weights, as the manifest counts them: every kind's registered op
    (``contrib.quantized_op_names``) and the fast path's quantized table (GatherBlockQuantized; the lm_head's
    MatMulNBits is the shared op)."""
    _ensure_loaded()
    return contrib.quantized_op_names() | {f"{contrib.MSFT_DOMAIN}::GatherBlockQuantized"}


def kind_for_quantization(quantization: str) -> ExportKind:
    """The kind that a base loaded as ``model.quantization = quantization`` exports as.

    Raises:
        ExportError: no kind handles it.
    """
    for kind in kinds():
        if quantization in kind.quantizations:
            return kind
    known = sorted(q for kind in kinds() for q in kind.quantizations)
    raise ExportError(f"no export kind for quantization {quantization!r}; known: {', '.join(known)}")


def kind_for_module(module: nn.Module) -> ExportKind | None:
    """The kind of a base layer (by its training backend), or None for modules no backend reads."""
    if not is_supported(module):
        return None
    backend_kind = backend_for(module).kind
    for kind in kinds():
        if backend_kind in kind.backend_kinds:
            return kind
    return None


def twin_of(module: nn.Module, *, serving: bool) -> nn.Module:
    """``module``'s export twin, or ``module`` itself when no kind claims it (e.g. an already-swapped layer)."""
    kind = kind_for_module(module)
    return module if kind is None else kind.twin(module, serving=serving)


def untwinned(model: nn.Module) -> list[str]:
    """Names of base layers whose twin differs from the layer itself (they must be swapped before export)."""
    problems = []
    for name, module in model.named_modules():
        kind = kind_for_module(module)
        if kind is not None and kind.twins:
            problems.append(f"{name} ({type(module).__name__}): swap it for {kind.twins}")
    return problems


def keeping_exports(quantization: str, mode: str, weights: str, serving: bool) -> str:
    """Which exports keep what a model trained on this base computes (for a graph that changed it)."""
    kind = next((k for k in kinds() if quantization in k.quantizations), None)
    exact = kind.exact_exports(quantization) if kind is not None else MERGED_EXACT
    if kind is not None and kind.trained_int4:
        return f"exports that keep the trained model's decisions: {exact}"
    int4 = ("for int4 that keeps the task, train on a GPTQ base (`adalora-deploy quantize --method gptq`, then "
            "`model.quantization: gptq`) and export `--mode separate`")
    if mode == "merged" and weights in ("int4", "int8"):
        int4 = f"re-quantize with `--requantize gptq --calibration FILE` on text like the task's, or {int4}"
    return f"exports that keep the trained model's decisions: {exact}; {int4}"


def arithmetic_table() -> str:
    """Markdown table: base kind x export mode -> the graph's arithmetic (the README's "Export modes")."""
    rows = ["| base (`model.quantization`) | `--mode merged` | `--mode separate` (exact) | `--mode separate --serving` |",
            "|---|---|---|---|"]
    for kind in kinds():
        exact = kind.separate(serving=False).text
        serving = kind.separate(serving=True).text if kind.has_serving else "-"
        rows.append(f"| {kind.label} | {kind.merged().text} | {exact} | {serving} |")
    rows.append("")
    rows.append("Separate mode adds an fp32 low-rank branch x·Aᵀ·Bᵀ beside each adapted module with exactly its "
                "surviving rank (A = Λ'Q', B = P'·scale; an adapter trained with `adapter.down_weights: int8` has "
                "x·Aᵀ as an 8-bit MatMulNBits); a rank-0 module adds no node.")
    return "\n".join(rows)
