"""Benchmark our GPTQ layer on CPU: quantization time, forward/backward time and weight memory.

For linear layers of realistic sizes, prints one table comparing:

* quantization time per layer: the GPTQ solver (4-bit, group 128, with the Hessian of 1024 calibration
  tokens already accumulated) and round-to-nearest, plus GPTQ's output error relative to RTN's;
* forward and forward+backward (gradient to the input, as adapter training needs) for a batch of
  128 tokens: our ``QuantLinear`` vs bitsandbytes ``Linear4bit`` (NF4, fp32 compute) vs ``nn.Linear``;
* weight memory of the three.

Run: ``python benchmarks/bench_gptq.py [--threads 2] [--sizes 576x576,4096x4096]``. A few minutes on
2 cores. Results depend heavily on the CPU; read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

from adalora_deploy.gptq.solver import HessianAccumulator, gptq_quantize, rtn_quantize
from adalora_deploy.metrics import relative_output_error

DEFAULT_SIZES = "576x576,576x1536,2048x2048,4096x4096"
TOKENS = 128
CALIBRATION_TOKENS = 1024


def _time_ms(fn, min_seconds: float = 0.5, min_repeats: int = 3) -> float:
    fn()  # warm-up: first-call allocations and kernel selection
    repeats, started = 0, time.perf_counter()
    while repeats < min_repeats or time.perf_counter() - started < min_seconds:
        fn()
        repeats += 1
    return (time.perf_counter() - started) / repeats * 1000


def _forward(layer: nn.Module, x: torch.Tensor):
    def run():
        with torch.no_grad():
            layer(x)

    return run


def _forward_backward(layer: nn.Module, x: torch.Tensor):
    x = x.clone().requires_grad_()

    def run():
        x.grad = None
        layer(x).sum().backward()

    return run


def _bnb_nf4(weight: torch.Tensor) -> nn.Module | None:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4").to("cpu")
    return layer


def _bnb_bytes(layer: nn.Module) -> int:
    state = layer.weight.quant_state
    total = layer.weight.data.nbytes + state.absmax.nbytes
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += nested.absmax.nbytes + nested.code.nbytes
    return total


def _buffer_bytes(layer: nn.Module) -> int:
    return sum(t.nbytes for t in layer.buffers()) + sum(p.nbytes for p in layer.parameters())


def bench(in_features: int, out_features: int, seed: int = 0) -> dict[str, float]:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    rank = max(in_features // 4, 1)
    mixing = torch.randn(rank, in_features, generator=generator) / rank**0.5
    calib = torch.randn(CALIBRATION_TOKENS, rank, generator=generator) @ mixing
    calib += 0.1 * torch.randn(CALIBRATION_TOKENS, in_features, generator=generator)
    accumulator = HessianAccumulator(in_features)
    accumulator.add(calib)
    hessian = accumulator.hessian

    started = time.perf_counter()
    gptq = gptq_quantize(weight, hessian, bits=4, group_size=128, sym=True)
    gptq_s = time.perf_counter() - started
    started = time.perf_counter()
    rtn = rtn_quantize(weight, bits=4, group_size=128, sym=True)
    rtn_s = time.perf_counter() - started
    ratio = relative_output_error(weight, gptq.dequantize(), hessian) / relative_output_error(
        weight, rtn.dequantize(), hessian
    )

    ours = gptq.to_module()
    dense = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(weight)
    dense.requires_grad_(False)
    nf4 = _bnb_nf4(weight)
    x = torch.randn(1, TOKENS, in_features, generator=generator)

    row = {
        "gptq_s": gptq_s,
        "rtn_s": rtn_s,
        "err_ratio": ratio,
        "ours_fwd": _time_ms(_forward(ours, x)),
        "dense_fwd": _time_ms(_forward(dense, x)),
        "ours_bwd": _time_ms(_forward_backward(ours, x)),
        "dense_bwd": _time_ms(_forward_backward(dense, x)),
        "ours_mb": _buffer_bytes(ours) / 2**20,
        "dense_mb": weight.nbytes / 2**20,
    }
    if nf4 is not None:
        row.update(
            nf4_fwd=_time_ms(_forward(nf4, x)),
            nf4_bwd=_time_ms(_forward_backward(nf4, x)),
            nf4_mb=_bnb_bytes(nf4) / 2**20,
        )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma-separated INxOUT (default: {DEFAULT_SIZES})")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    bench(128, 128)  # warm-up: the first LAPACK call and allocator growth would land on the first row
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; 4-bit, group 128, sym; "
        f"{CALIBRATION_TOKENS} calibration tokens; forward on {TOKENS} tokens, fp32 activations"
    )
    header = (
        f"{'in x out':>11} | {'GPTQ s':>7} {'RTN s':>6} {'err G/R':>7} | {'fwd ms ours':>11} {'nf4':>7} {'dense':>7} | "
        f"{'fwd+bwd ours':>12} {'nf4':>7} {'dense':>7} | {'MB ours':>7} {'nf4':>6} {'dense':>7}"
    )
    print(header)
    print("-" * len(header))
    for in_features, out_features in sizes:
        r = bench(in_features, out_features)

        def nf4(key: str, fmt: str, r: dict[str, float] = r) -> str:
            return format(r[key], fmt) if key in r else "n/a"

        print(
            f"{in_features:>5}x{out_features:<5} | {r['gptq_s']:>7.2f} {r['rtn_s']:>6.3f} {r['err_ratio']:>7.2f} | "
            f"{r['ours_fwd']:>11.1f} {nf4('nf4_fwd', '7.1f'):>7} {r['dense_fwd']:>7.1f} | "
            f"{r['ours_bwd']:>12.1f} {nf4('nf4_bwd', '7.1f'):>7} {r['dense_bwd']:>7.1f} | "
            f"{r['ours_mb']:>7.2f} {nf4('nf4_mb', '6.2f'):>6} {r['dense_mb']:>7.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
