"""Shared test helpers: a reference GPTQ round-to-nearest packer and a one-module exporter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import helper
import torch
from adalora_deploy.export.build.manifest import sha256_file
from adalora_deploy.export.contract import MANIFEST_FILE
from adalora_deploy.export.build.contrib import CUSTOM_TRANSLATION_TABLE
from adalora_deploy.export.runtime.session import create_session

OPSET = 20


def gptq_rtn(
    weight: torch.Tensor,
    *,
    bits: int,
    group_size: int,
    act_order: bool = False,
    checkpoint_format: str = "gptq",
    seed: int = 0,
) -> dict:
    """Round-to-nearest GPTQ tensors for ``weight`` [out, in] in the checkpoint layout of docs/QUANT.md.

    Symmetric (zero = 2**(bits-1), scale = 2 max|w| / maxq, both per group and output). With ``act_order``
    the groups are formed over a random column order (as GPTQ's desc_act visit order does), so ``g_idx``
    is non-monotone and qweight rows stay in the original order.

    Returns:
        dict with qweight int32 [in*bits/32, out], qzeros int32 [G, out*bits/32], scales fp16 [G, out],
        g_idx int32 [in], and ``dequantized`` fp32 [out, in] (the format's own dequantization formula).
    """
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    maxq = (1 << bits) - 1
    if act_order:
        order = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
    else:
        order = torch.arange(in_features)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(in_features) // group).to(torch.int32)
    groups = int(g_idx.max()) + 1
    w = weight.detach().float()
    scales = torch.empty(groups, out_features)
    for g in range(groups):
        cols = w[:, g_idx == g]
        scales[g] = (2 * cols.abs().amax(1) / maxq).clamp(min=1e-8)
    scales = scales.half()
    zero = 1 << (bits - 1)
    s = scales.float()[g_idx.long()].T  # [out, in]
    q = torch.clamp(torch.round(w / s) + zero, 0, maxq).to(torch.int64)  # [out, in]
    zeros = torch.full((groups, out_features), zero, dtype=torch.int64)
    stored = (zeros - 1) & maxq if checkpoint_format == "gptq" else zeros
    per_word = 32 // bits

    def pack(values: np.ndarray) -> np.ndarray:  # pack along axis 0, least significant first
        values = values.reshape(-1, per_word, values.shape[-1]).astype(np.uint64)
        shifts = (np.arange(per_word, dtype=np.uint64) * bits)[None, :, None]
        return (values << shifts).sum(1).astype(np.uint32).view(np.int32)

    qweight = torch.from_numpy(pack(q.T.numpy()))
    qzeros = torch.from_numpy(pack(stored.T.numpy()).T.copy())
    dequantized = s * (q.float() - zeros.float()[g_idx.long()].T)
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx, "dequantized": dequantized}


def export_module(module: torch.nn.Module, x: torch.Tensor, path: Path) -> onnx.ModelProto:
    """Export ``module(x)`` with a dynamic leading axis; returns the saved model."""
    module.eval()
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        module, (x,), dynamo=True, opset_version=OPSET, input_names=["x"], output_names=["y"],
        dynamic_shapes=({0: batch},), custom_translation_table=CUSTOM_TRANSLATION_TABLE, verbose=False,
    )
    program.save(str(path))
    return onnx.load(str(path))


def run_module(path: Path, x: torch.Tensor) -> np.ndarray:
    """onnxruntime output of a module exported with :func:`export_module`."""
    return create_session(path).run(None, {"x": x.numpy()})[0]


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def set_accuracy_level(folder, level: int) -> None:
    """Rewrite every MatMulNBits' accuracy_level (and the manifest's hashes): a graph that computes otherwise."""
    path = folder / "model.onnx"
    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in node.attribute:
                if attribute.name == "accuracy_level":
                    attribute.CopyFrom(helper.make_attribute("accuracy_level", level))
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    for name in ("model.onnx", "model.onnx.data"):
        if name in manifest["files"]:
            manifest["files"][name], manifest["sizes"][name] = sha256_file(folder / name), (folder / name).stat().st_size
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
