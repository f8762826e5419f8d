"""Where tools/roofline.py's GEMM_K0 and GEMM_FIXED_S come from: the least-squares fit to measured GEMMs (issue 20).

    python bench/gemm_fit.py

tests/data/xla_sm90_matmul.csv is OpenXLA's measured bf16 matmul throughput on H100 (375 shapes: b 1, 2, 4 and m, n,
k 256 ... 4096). Each shape is priced as the roofline prices a compute-bound GEMM, FLOPs / (peak x mm x
gemm_efficiency(k0)) + t0, and (k0, t0) is the pair on a grid that minimizes the RMS of log(priced / measured)
rate. The rate of a large GEMM (peak x mm) is the roofline's own, not fitted.

Then a check on A100, which the table does not cover: EleutherAI's measured forward of Megatron's MLP block (h -> 4h
GEMM, fused bias + GeLU, 4h -> h GEMM; fp16, 8192 tokens; TFLOP/s of the two GEMMs' FLOPs, 16 tokens h^2, over the
block's time) by hidden size, EleutherAI/cookbook branch sizing, commit 27dff48, sizing/results/transformer_data/
h_sweep_tp.out at tp 1. The file does not name its GPU; its rates (240 at h 8192) fit an A100 and nothing else
there. Priced as an A100 80GB, with and without the fitted terms.
"""
import csv
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import roofline  # noqa: E402

TABLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                     "xla_sm90_matmul.csv")
SIZES = (256, 512, 1024, 2048, 4096)  # b 1, 2, 4 and every m, n, k of these: the table's 375 shapes
K0S = range(0, 321, 16)
T0S = [i * 0.5e-6 for i in range(0, 17)]  # 0 ... 8 us


def measured(path=TABLE):
    """[(b, m, n, k, bf16 FLOP/s)] from the table."""
    with open(path) as f:
        rows = csv.DictReader(line for line in f if not line.startswith("#"))
        return [(int(r["b"]), int(r["m"]), int(r["n"]), int(r["k"]), float(r["bf16_flops"])) for r in rows]


def rms_log_error(shapes, k0, t0, gpu=roofline.GPUS["H100"]):
    """RMS over the shapes of log(priced rate / measured rate)."""
    rate = gpu["bf16"] * roofline.T * gpu["mm"]
    errs = []
    for b, m, n, k, flops_per_s in shapes:
        flops = 2 * b * m * n * k
        seconds = flops / (rate * roofline.gemm_efficiency(b, m, n, k, gpu["sms"], k0)) + t0
        errs.append(math.log(flops / seconds / flops_per_s))
    return math.sqrt(sum(e * e for e in errs) / len(errs))


def fit(shapes):
    """(error, k0, t0) of the best pair on the grid K0S x T0S."""
    return min((rms_log_error(shapes, k0, t0), k0, t0) for k0 in K0S for t0 in T0S)


MLP_A100 = {768: 153.8, 1024: 178.1, 1536: 186.3, 2048: 206.7, 3072: 211.6, 4096: 224.7, 8192: 239.8}


def mlp_tflops(h, k0, t0, tokens=8192, gpu=roofline.GPUS["A100-80GB"]):
    """The MLP block's forward as the roofline prices it: two GEMMs and one pass over the 4h activations (bias +
    GeLU, read and written in fp16), in the measurement's unit."""
    rate = gpu["fp16"] * roofline.T * gpu["mm"]
    gemm = sum(2 * tokens * k * n / (rate * roofline.gemm_efficiency(1, tokens, n, k, gpu["sms"], k0)) + t0
               for k, n in ((h, 4 * h), (4 * h, h)))
    gelu = max(2 * tokens * 4 * h * 2 / (gpu["hbm"] * roofline.G * roofline.FRACTIONS["mem"]), roofline.LAUNCH_S)
    return 16 * tokens * h * h / (gemm + gelu) / roofline.T


def main():
    shapes = measured()
    err, k0, t0 = fit(shapes)
    print(f"{len(shapes)} measured shapes (H100, bf16); RMS error of the priced rate, as a factor:")
    print(f"  quantization only (k0 = 0, t0 = 0):       {math.exp(rms_log_error(shapes, 0, 0)):.3f}")
    print(f"  best t0 alone (k0 = 0):                   {math.exp(min(rms_log_error(shapes, 0, t) for t in T0S)):.3f}")
    print(f"  best fit: k0 = {k0}, t0 = {t0 * 1e6:.1f} us:        {math.exp(err):.3f}")
    print(f"  tools/roofline.py: GEMM_K0 = {roofline.GEMM_K0}, GEMM_FIXED_S = {roofline.GEMM_FIXED_S * 1e6:.1f} us: "
          f"{math.exp(rms_log_error(shapes, roofline.GEMM_K0, roofline.GEMM_FIXED_S)):.3f}")

    print("A100, EleutherAI's MLP forward (8192 tokens, fp16), TFLOP/s: measured; priced with quantization only; "
          "with the fitted terms")
    for h, tflops in MLP_A100.items():
        print(f"  h {h:5d}: {tflops:6.1f}  {mlp_tflops(h, 0, 0):6.1f}  "
              f"{mlp_tflops(h, roofline.GEMM_K0, roofline.GEMM_FIXED_S):6.1f}")


if __name__ == "__main__":
    main()
