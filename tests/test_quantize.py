"""GPTQ solver and round-to-nearest, model-level quantization and the ``quantize`` CLI."""

from __future__ import annotations

import argparse

import pytest
import torch
import torch.nn.functional as F

from adalora_deploy.artifacts import ArtifactError
from adalora_deploy.gptq.linear import QuantLinear
from adalora_deploy.cli.quantize import register
from adalora_deploy.data import token_blocks
from adalora_deploy.demo import (
    SAMPLE_TEXT,
    byte_tokenizer,
    tiny_llama,
    write_tiny_llama,
)
from adalora_deploy.errors import QuantizationError
from adalora_deploy.gptq.checkpoint import load_gptq_model
from adalora_deploy.gptq.driver import QuantizationReport, quantize_model
from adalora_deploy.gptq.solver import HessianAccumulator, gptq_quantize, rtn_quantize
from adalora_deploy.metrics import relative_output_error

GPTQ_VS_RTN_MAX_RATIO = 0.3
"""GPTQ's output error over RTN's on correlated inputs (4-bit sym, group 32). Measured 0.14-0.18 over
seeds 0-5 (docs/QUANT.md reports ~4.7x lower error on real layers); a broken solver lands near or above 1."""

ACT_ORDER_VS_RTN_MAX_RATIO = 0.1
"""Same with act-order, which quantizes the large-scale channels first: measured 0.032-0.036."""

TINY_LLAMA_MIN_COSINE = {4: 0.995, 3: 0.99}
"""Cosine similarity of quantized vs float logits of the tiny Llama on 4 calibration blocks (16 blocks
of 64 tokens to calibrate). Measured: 0.9992 (GPTQ 4-bit sym, group 32), 0.9976 (GPTQ 3-bit asym,
one group, act-order)."""

CLI_MIN_COSINE = 0.99
"""The CLI test calibrates on only 8 blocks and compares on bytes 0-39 (control characters, unlike the
calibration text). Measured 0.9947 (GPTQ 4-bit asym, group 32, act-order)."""

RTN_MIN_SQNR_DB_8BIT = 35.0
"""8-bit round-to-nearest of a Gaussian weight: each extra bit adds ~6 dB; measured ~44 dB per layer."""


def _correlated_layer(seed: int, in_features: int = 128, out_features: int = 64, tokens: int = 2048):
    """Weight and inputs ``X = (Z @ M + 0.1 noise) * s``: a rank-``in/4`` random mixing of latent factors,
    a little isotropic noise and per-channel scales, so input channels are strongly correlated and of
    unequal size (the regime of LLM activations, where GPTQ's error compensation pays off; with white
    inputs H ~ I and GPTQ reduces to RTN)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator)
    rank = in_features // 4
    mixing = torch.randn(rank, in_features, generator=generator) / rank**0.5
    noise = 0.1 * torch.randn(tokens, in_features, generator=generator)
    scales = torch.rand(in_features, generator=generator) * 2 + 0.1
    x = (torch.randn(tokens, rank, generator=generator) @ mixing + noise) * scales
    accumulator = HessianAccumulator(in_features)
    for chunk in x.split(500):
        accumulator.add(chunk)
    return weight, x, accumulator.hessian


def _output_error(weight, dequantized, x):
    return float(((x @ (weight - dequantized).t()) ** 2).sum() / ((x @ weight.t()) ** 2).sum())


def test_hessian_accumulator_is_2_xtx_over_n():
    x = torch.randn(300, 16, dtype=torch.float64)
    accumulator = HessianAccumulator(16)
    for chunk in x.split(70):
        accumulator.add(chunk.float())
    torch.testing.assert_close(accumulator.hessian.double(), 2 * x.t() @ x / 300, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(seed, desc_act):
    weight, x, hessian = _correlated_layer(seed)
    rtn = rtn_quantize(weight, bits=4, group_size=32, sym=True)
    gptq = gptq_quantize(weight, hessian, bits=4, group_size=32, sym=True, desc_act=desc_act)
    rtn_error = _output_error(weight, rtn.dequantize(), x)
    gptq_error = _output_error(weight, gptq.dequantize(), x)
    assert gptq_error / rtn_error < (ACT_ORDER_VS_RTN_MAX_RATIO if desc_act else GPTQ_VS_RTN_MAX_RATIO)
    # The Hessian form of the error is the same quantity.
    assert relative_output_error(weight, gptq.dequantize(), hessian) == pytest.approx(gptq_error, rel=1e-3)


def test_act_order_g_idx_and_packing():
    weight, x, hessian = _correlated_layer(3, in_features=104)  # 104 = 3 * 32 + 8: a partial last group
    result = gptq_quantize(weight, hessian, bits=4, group_size=32, sym=False, desc_act=True)
    assert result.scales.shape == (4, 64) and result.zeros.shape == (4, 64)
    counts = torch.bincount(result.g_idx.long(), minlength=4)
    assert counts.tolist() == [32, 32, 32, 8]
    # Groups follow decreasing diag(H), not channel order.
    order = torch.argsort(torch.diag(hessian), descending=True)
    assert result.g_idx[order].tolist() == sorted(result.g_idx.tolist())
    assert result.g_idx.tolist() != sorted(result.g_idx.tolist())
    layer = result.to_module()
    assert torch.equal(layer.dequantize_weight(), result.dequantize())
    # qweight rows stay in channel order: each dequantized column approximates its own float column
    # (measured worst relative error 0.06; a column holding another channel's weights would give ~2).
    per_column = ((layer.dequantize_weight() - weight) ** 2).mean(0) / (weight**2).mean(0)
    assert float(per_column.max()) < 0.5


@pytest.mark.parametrize("bits,sym,group_size", [(2, True, 16), (3, False, -1), (8, False, 24), (4, True, 200)])
def test_gptq_settings_shapes(bits, sym, group_size):
    weight, x, hessian = _correlated_layer(4, in_features=96, out_features=32)
    result = gptq_quantize(weight, hessian, bits=bits, group_size=group_size, sym=sym, block_size=32)
    groups = 1 if group_size == -1 else -(-96 // group_size)
    assert result.scales.shape == (groups, 32)
    assert int(result.q.min()) >= 0 and int(result.q.max()) <= 2**bits - 1
    if sym:
        assert bool((result.zeros == 2 ** (bits - 1)).all())
    rtn = rtn_quantize(weight, bits=bits, group_size=group_size, sym=sym)
    assert _output_error(weight, result.dequantize(), x) < _output_error(weight, rtn.dequantize(), x)


def test_dead_columns_and_flat_groups():
    weight, x, _ = _correlated_layer(5, in_features=64)
    x[:, :8] = 0  # inputs that never fire: H has zero rows, their weights cannot matter
    weight[:, 32:64] = 0  # an all-zero group
    accumulator = HessianAccumulator(64)
    accumulator.add(x)
    dequantized = gptq_quantize(weight, accumulator.hessian, bits=4, group_size=32).dequantize()
    assert torch.isfinite(dequantized).all()
    assert bool((dequantized[:, :8] == 0).all())
    rtn = rtn_quantize(weight, bits=4, group_size=32, sym=False)
    assert torch.isfinite(rtn.scales).all() and bool((rtn.scales > 0).all())
    assert bool((rtn.dequantize()[:, 32:] == 0).all())


def test_rtn_8bit_is_accurate_and_errors_are_value_errors():
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    result = rtn_quantize(weight, bits=8, group_size=64, sym=False)
    rel = float(((result.dequantize() - weight) ** 2).sum() / (weight**2).sum())
    assert -10 * torch.log10(torch.tensor(rel)) > RTN_MIN_SQNR_DB_8BIT
    with pytest.raises(QuantizationError, match="bits"):
        rtn_quantize(weight, bits=5)
    with pytest.raises(QuantizationError, match="hessian"):
        gptq_quantize(weight, torch.eye(3), bits=4)
    assert issubclass(QuantizationError, ValueError)


# ---------------------------------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibration():
    return token_blocks(SAMPLE_TEXT, byte_tokenizer(), 64)[:16]


@pytest.mark.parametrize("bits,sym,group_size,desc_act", [(4, True, 32, False), (3, False, -1, True)])
def test_quantize_model_tiny_llama(calibration, bits, sym, group_size, desc_act):
    reference = tiny_llama()
    model = tiny_llama()
    calls: list[str] = []
    for index, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(lambda *_, i=index: calls.append(f"layer{i}"))
    report = quantize_model(
        model, calibration, method="gptq", bits=bits, group_size=group_size, sym=sym, desc_act=desc_act
    )

    assert isinstance(report, QuantizationReport)
    names = [layer.name for layer in report.layers]
    assert names[:7] == [
        f"model.layers.0.{n}"
        for n in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    assert len(names) == 14 and all(layer.sqnr_db > 10 for layer in report.layers)
    # Layer by layer: layer 1 only runs once layer 0 has been fully quantized and run for its outputs.
    first_layer1 = calls.index("layer1")
    assert "layer1" not in calls[:first_layer1] and "layer0" not in calls[first_layer1:]
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 14
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.embed_tokens) is torch.nn.Embedding
    with torch.no_grad():
        expected = reference(calibration[:4]).logits
        logits = model(calibration[:4]).logits
    cosine = F.cosine_similarity(expected.flatten(), logits.flatten(), dim=0)
    assert float(cosine) > TINY_LLAMA_MIN_COSINE[bits]
    assert not torch.equal(expected, logits)


def test_quantize_model_rtn_is_worse_than_gptq(calibration):
    gptq = quantize_model(tiny_llama(), calibration, method="gptq", bits=3, group_size=32)
    rtn = quantize_model(tiny_llama(), calibration, method="rtn", bits=3, group_size=32)
    mean = lambda report: sum(layer.relative_mse for layer in report.layers) / len(report.layers)  # noqa: E731
    assert mean(gptq) < mean(rtn)
    assert "model.layers.1.mlp.down_proj" in rtn.format_table()


def test_quantize_model_rejects_bad_input(calibration):
    with pytest.raises(QuantizationError, match="model_type None, which is not supported"):
        quantize_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), calibration)
    with pytest.raises(QuantizationError, match="int64"):
        quantize_model(tiny_llama(), calibration.float())
    with pytest.raises(QuantizationError, match="gptq_v2"):
        quantize_model(tiny_llama(), calibration, sym=False, checkpoint_format="gptq")
    with pytest.raises(QuantizationError, match="multiple of 32"):
        quantize_model(tiny_llama(hidden_size=48, num_attention_heads=4, num_key_value_heads=2), calibration, bits=3)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def _parse(argv):
    parser = argparse.ArgumentParser(prog="adalora-deploy")
    register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_quantize_writes_loadable_folder(tmp_path, capsys):
    source = write_tiny_llama(tmp_path / "float")
    output = tmp_path / "gptq"
    args = _parse(
        [
            "quantize",
            str(source),
            "--method",
            "gptq",
            "--bits",
            "4",
            "--group-size",
            "32",
            "--asym",
            "--desc-act",
            "--calibration",
            str(SAMPLE_TEXT),
            "--seq-len",
            "64",
            "--samples",
            "8",
            "--output",
            str(output),
        ]
    )
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "SQNR" in printed
    loaded = load_gptq_model(output)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantLinear) and layer.checkpoint_format == "gptq_v2" and layer.desc_act
    ids = torch.arange(40).view(1, 40)
    with torch.no_grad():
        cosine = F.cosine_similarity(tiny_llama()(ids).logits.flatten(), loaded(ids).logits.flatten(), dim=0)
    assert float(cosine) > CLI_MIN_COSINE
    assert (output / "tokenizer.json").is_file()


def test_cli_bad_input(tmp_path):
    args = _parse(
        ["quantize", str(tmp_path / "nowhere"), "--calibration", str(SAMPLE_TEXT), "--output", str(tmp_path / "o")]
    )
    with pytest.raises(QuantizationError, match="config.json"):
        args.run(args)
    source = write_tiny_llama(tmp_path / "float")
    args = _parse(["quantize", str(source), "--calibration", str(SAMPLE_TEXT), "--output", str(source)])
    with pytest.raises(ArtifactError, match="--overwrite"):
        args.run(args)
    with pytest.raises(SystemExit):
        _parse(["quantize", str(source), "--bits", "5", "--calibration", "x", "--output", "y"])


def test_lazy_batch_blocks_do_not_change_the_result():
    """Section 4's lazy batch updates are a reordering of the same arithmetic: the codes do not depend on the
    block size beyond fp32 summation order, which can move a weight sitting on a rounding boundary by one code
    (measured: identical codes for block sizes 1, 32 and 128 on one CPU; on an AVX-512 EPYC block 128 changed
    3 of 8192 codes by one and 1 of 256 fp16 group scales by 0.23%)."""
    weight, _, hessian = _correlated_layer(6)
    reference = gptq_quantize(weight, hessian, bits=4, group_size=32, block_size=1)
    for block_size in (32, 128):
        result = gptq_quantize(weight, hessian, bits=4, group_size=32, block_size=block_size)
        moved = (result.q.int() - reference.q.int()).abs()
        assert int(moved.max()) <= 1 and int((moved > 0).sum()) <= moved.numel() // 1000, (block_size, moved.sum())
        ratio = result.scales.float() / reference.scales.float()
        changed = ratio != 1  # fp16 scales: a changed one moves by an fp16 ulp or two (<= 0.2% measured)
        assert float((ratio - 1).abs().max()) < 5e-3 and int(changed.sum()) <= max(1, changed.numel() // 100)


GPTQ_VS_REFERENCE_MAX_RATIO = 1.1
"""Our solver's output error over that of the paper's reference code (IST-DASLab/gptq ``fasterquant``,
transcribed below). They differ only in that we round scales to fp16 before quantizing (what the
checkpoint stores), which flips a few codes. Measured for the cases below (seed 7): 0.993, 0.989, 0.997;
over seeds 0-2 with group 32 as well: 0.98-1.05."""


def _reference_fasterquant(weight, hessian, bits, sym, groupsize, actorder, blocksize=128, percdamp=0.01):
    """IST-DASLab/gptq ``GPTQ.fasterquant`` + ``Quantizer.find_params`` (arXiv:2210.17323 code), condensed."""
    maxq = 2**bits - 1

    def find_params(x):
        xmin = torch.clamp(x.min(1).values, max=0)
        xmax = torch.clamp(x.max(1).values, min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = torch.where(xmin < 0, -xmax, xmin)
        flat = (xmin == 0) & (xmax == 0)
        xmin[flat], xmax[flat] = -1, 1
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
        return scale.unsqueeze(1), zero.unsqueeze(1)

    W, H = weight.clone().float(), hessian.clone()
    columns = W.shape[1]
    scale, zero = find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    H[range(columns), range(columns)] += percdamp * torch.mean(torch.diag(H))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                scale, zero = find_params(W[:, i1 + i : i1 + i + groupsize])
            w = W1[:, i]
            q = (scale * (torch.clamp(torch.round(w.unsqueeze(1) / scale) + zero, 0, maxq) - zero)).flatten()
            Q[:, i1 + i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)] if actorder else Q


@pytest.mark.parametrize("group_size,desc_act,sym", [(128, False, True), (128, True, False), (-1, False, True)])
def test_gptq_matches_reference_implementation(group_size, desc_act, sym):
    weight, x, hessian = _correlated_layer(7, in_features=256)
    reference = _reference_fasterquant(weight, hessian, 4, sym, group_size, desc_act)
    ours = gptq_quantize(weight, hessian, bits=4, group_size=group_size, sym=sym, desc_act=desc_act)
    ratio = _output_error(weight, ours.dequantize(), x) / _output_error(weight, reference, x)
    assert 1 / GPTQ_VS_REFERENCE_MAX_RATIO < ratio < GPTQ_VS_REFERENCE_MAX_RATIO


# ---------------------------------------------------------------------------------------------------
# Fast paths: no calibration for RTN, stacked solves, replayed passes, group-aware order
# ---------------------------------------------------------------------------------------------------


def test_rtn_without_calibration_runs_no_forward():
    model = tiny_llama()
    reference = tiny_llama()
    calls = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
    report = quantize_model(model, method="rtn", bits=4, group_size=32)
    assert calls == []
    assert report.error_basis == "weights" and report.num_samples == 0 and len(report.layers) == 14
    assert report.timings is not None and report.timings.forwards == 0.0
    q_proj = model.model.layers[1].self_attn.q_proj
    expected = rtn_quantize(reference.model.layers[1].self_attn.q_proj.weight, bits=4, group_size=32)
    assert torch.equal(q_proj.dequantize_weight(), expected.dequantize())
    weight = reference.model.layers[1].self_attn.q_proj.weight.detach()
    rel = float(((weight - expected.dequantize()) ** 2).sum() / (weight**2).sum())
    assert report.layers[7].relative_mse == pytest.approx(rel, rel=1e-6)
    with pytest.raises(QuantizationError, match="calibration"):
        quantize_model(tiny_llama(), method="gptq")


def test_stacked_rows_are_solved_independently():
    """The driver solves q/k/v (and gate/up) as one stacked weight: GPTQ must treat rows independently."""
    weight, _, hessian = _correlated_layer(8, in_features=96, out_features=48)
    stacked = gptq_quantize(weight, hessian, bits=4, group_size=32)
    top = gptq_quantize(weight[:20], hessian, bits=4, group_size=32)
    bottom = gptq_quantize(weight[20:], hessian, bits=4, group_size=32)
    assert torch.equal(stacked.q, torch.cat([top.q, bottom.q]))
    assert torch.equal(stacked.scales, torch.cat([top.scales, bottom.scales], dim=1))


GAR_VS_NATURAL_MAX_RATIO = 0.95
"""Group-aware reordering's output error over natural order (4-bit, group 32, correlated inputs with
unequal channel scales). Measured 0.73-0.83 over seeds 0-3; act-order (which needs g_idx) 0.21-0.25."""


@pytest.mark.parametrize("seed", [0, 1])
def test_act_group_aware_keeps_natural_groups_and_helps(seed):
    weight, x, hessian = _correlated_layer(seed, in_features=104)  # a partial last group of 8
    natural = gptq_quantize(weight, hessian, bits=4, group_size=32)
    gar = gptq_quantize(weight, hessian, bits=4, group_size=32, act_group_aware=True)
    assert gar.g_idx.tolist() == [i // 32 for i in range(104)] and not gar.desc_act
    layer = gar.to_module()
    assert torch.equal(layer.dequantize_weight(), gar.dequantize())
    assert _output_error(weight, gar.dequantize(), x) < GAR_VS_NATURAL_MAX_RATIO * _output_error(
        weight, natural.dequantize(), x
    )
    # Each group's grid is that of its own channels: RTN with the same grid reproduces bounded codes.
    per_column = ((gar.dequantize() - weight) ** 2).mean(0) / (weight**2).mean(0)
    assert float(per_column.max()) < 0.5


def _naive_true_sequential(model, calibration, batch_size, **options):
    """The plain layer-by-layer loop: a full forward of the layer per group of linears (Hessians from
    hooks), one more full forward for the next layer's inputs. No replay, no early stop, no shortcut."""
    captured = []
    layers = model.model.layers

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append([hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}])
        raise RuntimeError("stop")

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        for batch in calibration.split(batch_size):
            try:
                model(input_ids=batch, use_cache=False)
            except RuntimeError:
                pass
    handle.remove()
    groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    with torch.no_grad():
        for layer in layers:
            for group in groups:
                first = layer.get_submodule(group[0])
                accumulator = HessianAccumulator(first.in_features)
                handle = first.register_forward_pre_hook(lambda _m, a, _acc=accumulator: _acc.add(a[0]))
                for hidden, kwargs in captured:
                    layer(hidden, **kwargs)
                handle.remove()
                for name in group:
                    module = layer.get_submodule(name)
                    quantized = gptq_quantize(module.weight, accumulator.hessian, **options)
                    layer.set_submodule(name, quantized.to_module(checkpoint_format="gptq_v2"))
            for entry in captured:
                output = layer(entry[0], **entry[1])
                entry[0] = output[0] if isinstance(output, tuple) else output
    return model


@pytest.mark.parametrize("act_group_aware", [False, True])
def test_driver_shortcuts_give_the_naive_result(calibration, act_group_aware):
    """Replayed outputs, early-stopped passes, stacked solves and the residual shortcut for the next
    layer's inputs change the cost, not the arithmetic: the codes equal those of the naive loop."""
    options = {"bits": 4, "group_size": 32, "sym": True, "act_group_aware": act_group_aware}
    ours = tiny_llama()
    quantize_model(ours, calibration[:12], batch_size=4, **options)
    naive = _naive_true_sequential(tiny_llama(), calibration[:12], 4, **options)
    for (name, a), (_, b) in zip(ours.named_modules(), naive.named_modules()):
        if isinstance(a, QuantLinear):
            assert torch.equal(a.int_weight(), b.int_weight()), name
            assert torch.equal(a.scales, b.scales), name


def test_quantize_model_reports_the_time_split(calibration):
    report = quantize_model(tiny_llama(), calibration, bits=4, group_size=32, true_sequential=False)
    timings = report.timings
    parts = (timings.capture, timings.forwards, timings.hessians, timings.solve, timings.pack, timings.error)
    assert all(part >= 0 for part in parts) and timings.forwards > 0 and timings.solve > 0
    assert timings.total == report.seconds and timings.other >= -1e-3
    assert "forwards" in timings.format()


def test_cli_rtn_needs_no_calibration(tmp_path, capsys):
    source = write_tiny_llama(tmp_path / "float")
    output = tmp_path / "rtn"
    args = _parse(["quantize", str(source), "--method", "rtn", "--group-size", "32", "--output", str(output)])
    assert args.run(args) == 0
    printed = capsys.readouterr().out
    assert "no calibration" in printed and "weight MSE" in printed and "time: load" in printed
    assert isinstance(load_gptq_model(output).model.layers[0].mlp.down_proj, QuantLinear)
    args = _parse(["quantize", str(source), "--output", str(tmp_path / "g")])
    with pytest.raises(QuantizationError, match="--calibration"):
        args.run(args)
