"""A new base kind is one record: this file adds one and exports it through both builders.

Everything a kind brings is written here, in the test file alone, as a kind file under
``export/build/kinds/`` would write it: a base layer type with its training backend (the base a library
would provide: int8 codes with a scale per output row), the twin module with its custom op, its
ONNX lowering (a ``contrib.PatternOp``: Cast, MatMul, Mul, Add) and its N-fusion rule, and the
:class:`ExportKind` record (arithmetic, tier, advice). No shared module (contrib, modules, the fast path,
the dynamo path) is edited: both builders find the kind through the hooks.
"""

from __future__ import annotations

from typing import Sequence

import onnx
import pytest
import torch
from torch import nn

from adalora_deploy import backends
from adalora_deploy.backends import LinearBackend, register_backend
from adalora_deploy.demo import tiny_llama
from adalora_deploy.export.build import contrib, kinds
from adalora_deploy.export.build.fastpath import build_decoder
from adalora_deploy.export.build.graph import export_decoder
from adalora_deploy.export.build.kinds import Arithmetic, ExportKind, register_kind
from adalora_deploy.export.build.modules import LowRankBranch, swap_module
from adalora_deploy.export.judge.parity import decoder_parity
from adalora_deploy.export.runtime.session import DecoderSession, create_session

# --- the base layer and its training backend (what a library and adalora_deploy/backends/ would hold) ---------


class ToyScaledLinear(nn.Module):
    """``y = x @ (codes * scale).T + bias``: int8 codes, one fp32 scale per output row."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(1) / 127
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("codes", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ (self.codes.float() * self.scale[:, None]).T
        return y if self.bias is None else y + self.bias


class ToyBackend(LinearBackend):
    name = "toy-scaled"

    def matches(self, module: nn.Module) -> bool:
        return type(module) is ToyScaledLinear

    def features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return module.codes.float() * module.scale[:, None]


# --- the kind file: custom op, lowering, twin, record ----------------------------------------------------------


@torch.library.custom_op("adalora_export::toy_scaled_matmul", mutates_args=())
def toy_scaled_matmul(x: torch.Tensor, codes_t: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``(x @ float(codes_t)) * scale + bias``, in the order the pattern computes it."""
    return torch.matmul(x, codes_t.to(x.dtype)) * scale + bias


@toy_scaled_matmul.register_fake
def _(x, codes_t, scale, bias):
    return x.new_empty((*x.shape[:-1], codes_t.shape[1]))


def toy_pattern(b: contrib.PatternBuilder, x):
    """x ─> MatMul(Cast(codes_t [K, N], fp32)) ─> Mul(scale) ─> Add(bias)"""
    weight = b.op("Cast", b.tensor("codes_t"), to=onnx.TensorProto.FLOAT)
    return b.op("Add", b.op("Mul", b.op("MatMul", x, weight), b.tensor("scale")), b.tensor("bias"))


TOY_OP = contrib.register_op(contrib.PatternOp("the toy scaled matmul", "toy_scaled_matmul",
                                               ("codes_t", "scale", "bias"), (), toy_pattern, n_axes=(1, 0, 0)))


class ToyScaledTwin(nn.Module):
    """The export twin: the codes transposed to ``[K, N]``, lowered by :data:`TOY_OP`."""

    def __init__(self, base: ToyScaledLinear) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_buffer("codes_t", base.codes.T.contiguous())
        self.register_buffer("scale", base.scale.clone())
        self.register_buffer("bias", torch.zeros(base.out_features) if base.bias is None else base.bias.clone())

    def lowering(self) -> contrib.PatternNode:
        return contrib.PatternNode(TOY_OP, (self.codes_t, self.scale, self.bias), (), float32_only=True)

    def can_fuse_with(self, others: Sequence[nn.Module]) -> bool:
        return True  # per-row scales: any siblings with the same K concatenate along N

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lowering()(x)


class ToyKind(ExportKind):
    backend_kinds = ("toy-scaled",)
    quantizations = ("toy-scaled",)
    label = "toy-scaled"
    twins = "ToyScaledTwin"

    def twin(self, module: nn.Module, *, serving: bool) -> nn.Module:
        return ToyScaledTwin(module)

    def separate(self, *, serving: bool) -> Arithmetic:
        return Arithmetic("MatMul of the int8 codes as fp32, times the row scales", "exact", "exact")

    def exact_exports(self, quantization: str) -> str:
        return "`--mode separate` (the toy codes, exactly)"


# --- the test -------------------------------------------------------------------------------------------------


@pytest.fixture
def toy_kind(monkeypatch):
    """The toy backend and kind registered for one test (the registries restored afterwards)."""
    backends.is_supported(nn.Linear(1, 1))  # load the built-in backends and kinds first
    kinds.kinds()
    monkeypatch.setattr(backends, "_registry", list(backends._registry))
    monkeypatch.setattr(kinds, "_registry", list(kinds._registry))
    register_backend(ToyBackend())
    return register_kind(ToyKind())


def test_a_kind_from_one_file_exports_through_both_builders(toy_kind, tmp_path):
    model = tiny_llama().eval()
    generator = torch.Generator().manual_seed(0)
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name.startswith("model.layers"):
            swap_module(model, name, ToyScaledLinear(module))
    # the record: advice, arithmetic table, lookup by quantization, and the twin export asks for
    assert kinds.kind_for_quantization("toy-scaled") is toy_kind
    assert "| toy-scaled |" in kinds.arithmetic_table()
    assert any("swap it for ToyScaledTwin" in problem for problem in kinds.untwinned(model))
    for name, module in list(model.named_modules()):
        if kinds.kind_for_module(module) is toy_kind:
            twin = kinds.twin_of(module, serving=False)
            if name.endswith(("q_proj", "up_proj")):  # a LoRA branch composes with the new kind
                n, k = module.out_features, module.in_features
                twin = LowRankBranch(twin, torch.randn(4, k, generator=generator) * 0.2,
                                     torch.randn(n, 4, generator=generator) * 0.2)
            swap_module(model, name, twin)
    assert kinds.untwinned(model) == []
    ids = torch.randint(0, 256, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    for builder, build in (("fast", build_decoder), ("dynamo", export_decoder)):
        result = build(model, tmp_path / builder)
        decoder = DecoderSession(create_session(result.model_path))
        report = decoder_parity(model, decoder, ids, mask, tier="exact", decode_steps=2, max_new_tokens=4)
        assert report.passed, (builder, report.failures)
        assert report.tokens_equal
        proto = onnx.load(str(result.model_path), load_external_data=False)
        assert {node.domain for node in proto.graph.node} <= {"", "com.microsoft"}  # the custom op was lowered
        if builder == "fast":  # the codes stay int8 (dynamo folds their Cast), fused along N for q/k/v and gate/up
            int8 = [i.name for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8]
            assert len(int8) == 2 * 4, int8
            assert "model.layers.0.self_attn.qkv_proj.codes_t" in int8
