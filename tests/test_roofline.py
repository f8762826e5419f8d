"""tools/roofline.py: the recorded FLOPs and bytes of a tiny step against hand-computed values, the categories
against the total, the collectives of a tp 2 and a dp 2 fake layout, and the refusals of bad options."""
import functools
import math
import os
import sys

import pytest

from conftest import ROOT, run
from runtime.errors import UserError
from model import count_params, flops_per_token
from run.config import make_config

from tools import roofline

sys.path.insert(0, os.path.join(ROOT, "bench"))  # the calibration scripts of bench/ that these tests run

# One layer with sizes that share no factor by accident: h = 3 heads x 16, FFN 80, T = 24, V = 256, B = 2.
B, T, H, NH, F, V = 2, 24, 48, 3, 80, 256
TINY = dict(n_layer=1, n_head=NH, n_embd=H, ffn_hidden=F, seq_len=T, vocab_size=V, micro_batch=B, dtype="fp32")


def project(accum=2, tp=1, dp=1, **extra):
    ops = []
    r = roofline.project("tiny", {**TINY, **extra}, "H100", tp=tp, dp=dp, accum=accum, ops_out=ops)
    return r, ops


def test_flops_and_bytes_by_hand():
    r, ops = project(accum=2)
    m = B * T  # tokens per micro-batch
    forward = 2 * m * (H * 3 * H + H * H + H * F + F * H + H * V)  # qkv, proj, fc, proj, tied head
    matmul = sum(op["flops"] for op in ops if op["cat"] == "matmul")
    assert matmul == 2 * 3 * forward  # two micro-batches; backward = input and weight gradients = 2 x forward
    attention = sum(op["flops"] for op in ops if op["cat"] == "attention")
    assert attention == 2 * (4 + 8) * B * NH * T * T * (H // NH)
    assert matmul + attention == r["step_flops_per_rank"] == flops_per_token(make_config("tiny", **TINY)) * 2 * m
    first = {op["name"]: op for op in reversed(ops) if op["phase"] == 0 and not op["backward"]}  # first of each
    assert first["embedding"]["bytes"] == 8 * B * T + 2 * 4 * B * T * H  # ids, the rows read, the rows written
    assert first["native_layer_norm"]["bytes"] == 4 * (2 * B * T * H + 2 * H + 2 * B * T)  # x, w, b -> y, mean, rstd
    assert first["gelu"]["bytes"] == 2 * 4 * B * T * F
    head = [op for op in ops if op["name"] == "mm" and op["shapes"] == str([[m, H], [H, V]])]
    assert len(head) == 2 and head[0]["bytes"] == 4 * (m * H + H * V + m * V)
    assert not [op for op in ops if op["name"] in ("view", "t", "transpose", "_unsafe_view", "detach")]
    # the last micro-batch adds every parameter's gradient into its accumulator (.grad or main_grad) exactly once:
    # by an add (category grad_accum) or by a weight-gradient GEMM writing into main_grad (category matmul)
    n = count_params(make_config("tiny", **TINY))
    assert sum(op.get("accumulates", 0) for op in ops if op["phase"] == 1) == n
    adds = [op for op in ops if op["cat"] == "grad_accum"]
    assert adds and all(op["name"] in ("add_", "add") and op["backward"] for op in adds)
    if all(op["phase"] == 1 for op in adds):  # fp32 .grad += fp32 gradient, all of them: read two, write one
        assert sum(op["bytes"] for op in adds) == 3 * 4 * n


def test_categories_sum_to_the_step_and_micro_batches_extrapolate():
    r2, _ = project(accum=2)
    r5, _ = project(accum=5)  # records first, middle, last; the middle one stands for three
    for r in (r2, r5):
        assert sum(r["seconds_by_category"].values()) == pytest.approx(r["step_s"], rel=1e-12)
        assert r["seconds_by_category"]["grad_accum"] > 0 and r["seconds_by_category"]["optimizer"] > 0
    assert r5["recorded_micro_batches"] == 3
    assert r5["step_flops_per_rank"] == pytest.approx(2.5 * r2["step_flops_per_rank"], rel=1e-12)
    once = r2["step_s"] - 2 * r2["micro_batch_s"]  # clipping and AdamW, whatever the number of micro-batches
    assert r5["step_s"] == pytest.approx(once + 5 * r2["micro_batch_s"], rel=1e-9)


def test_tp2_collectives():
    r, ops = project(accum=2, tp=2, n_head=6)  # 3 heads per rank
    comm = [op for op in ops if op["cat"] == "communication"]
    assert {op["name"] for op in comm} == {"allreduce_"} and {op["group"] for op in comm} == {"tp"}
    act = 4 * B * T * H  # one fp32 [B, T, h] activation
    for micro in (0, 1):
        fwd = sorted(op["bytes"] for op in comm if op["phase"] == micro and not op["backward"])
        # embedding, attention and MLP row-parallel outputs; the loss's max, target logit and sum of exp per token
        assert fwd == [4 * B * T] * 3 + [act] * 3
        bwd = [op for op in comm if op["phase"] == micro and op["backward"]]
        # the input gradients of the column-parallel qkv, fc and tied head, asynchronous
        assert sorted(op["bytes"] for op in bwd) == [act] * 3 and all(op["async_op"] for op in bwd)
        assert all(op["ring_bytes"] == op["bytes"] for op in bwd)  # 2 (n - 1) / n = 1 at n = 2
        assert all(op["exposed"] <= op["s"] for op in bwd)
    assert [op["bytes"] for op in comm if op["phase"] == "step"] == [4]  # clipping: the sharded squared norm
    assert r["step_flops_per_rank"] * 2 == flops_per_token(make_config("tiny", **TINY)) * 2 * B * T


@pytest.mark.parametrize("zero1", [False, True])
def test_dp2_gradient_reduction(zero1):
    _, ops = project(accum=2, dp=2, zero1=zero1)
    comm = [op for op in ops if op["cat"] == "communication"]
    assert {op["group"] for op in comm} == {"dp"} and all(op["phase"] in (1, "step") for op in comm)
    n = count_params(make_config("tiny", **TINY))
    during = [op for op in comm if op["phase"] == 1]
    assert all(op["backward"] for op in during)
    if zero1:  # reduce-scatter during backward, all-gather after AdamW: flat buffers padded to a multiple of dp
        assert {op["name"] for op in during} == {"_reduce_scatter_base_"}
        gathered = [op for op in comm if op["phase"] == "step" and op["name"] == "_allgather_base_"]
        assert sum(op["bytes"] for op in during) == sum(op["bytes"] for op in gathered) >= 4 * n
    else:  # every fp32 gradient once, in buckets
        assert {op["name"] for op in during} == {"allreduce_"} and sum(op["bytes"] for op in during) == 4 * n


def test_bad_options_are_refused():
    with pytest.raises(UserError, match="Known: H100, H200"):
        roofline.project("tiny", TINY, "B200")
    with pytest.raises(UserError, match="no bf16"):
        roofline.project("tiny", {**TINY, "dtype": "bf16"}, "V100-32GB")
    for args, message in [(["--gpu", "TPU"], "unknown --gpu"), (["--n_layers", "2"], "unknown option --n_layers"),
                          (["--gpus", "6", "--tp", "4"], "--gpus 6 must equal"), (["--accum", "two"], "cannot read")]:
        proc = run("tools/roofline.py", "--preset", "tiny", *args, check=False)
        assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_bf16_every_gemm_in_bf16_and_every_gradient_accumulated():
    """In bf16, whatever the mixed-precision scheme (autocast over fp32 weights, or bf16 working weights with fp32
    main_grad filled by the weight-gradient GEMM), the GEMMs run on bf16 operands and the FLOPs stay the model's."""
    r, ops = project(accum=2, dtype="bf16")
    gemms = [op for op in ops if op["cat"] == "matmul"]
    assert {op["dtype"] for op in gemms} == {roofline.torch.bfloat16}
    assert r["step_flops_per_rank"] == flops_per_token(make_config("tiny", **TINY)) * 2 * B * T
    assert sum(op.get("accumulates", 0) for op in ops if op["phase"] == 1) == count_params(make_config("tiny", **TINY))


def test_compile_prices_fused_runs():
    eager, _ = project(accum=2)
    fused, ops = project(accum=2, compile=True)
    assert fused["step_flops_per_rank"] == eager["step_flops_per_rank"] and fused["compile"]
    runs = [op for op in ops if op["name"].startswith("fused(") and "+" in op["name"]]
    assert runs and fused["assumes"].startswith("fused")
    assert fused["bytes_per_token_outside_matmul_attention"] < 0.8 * eager["bytes_per_token_outside_matmul_attention"]


def test_gemm_efficiency_by_hand():
    """Tile and wave quantization (tools/roofline.py, TILES and SPLIT_K_MIN), on a GPU of 4 or 8 SMs; then each
    tile's fixed cost, GEMM_K0 more of K per slice."""
    eff = functools.partial(roofline.gemm_efficiency, k0=0)
    # 256 x 640 on 4 SMs: 256x128 tiles: 5 tiles, 2 waves of 4 -> 5/8; 128x256: 6 tiles, padding 640/768, 2 waves
    # -> 5/6 x 6/8 = 5/8; 128x128: 10 tiles, no padding, 3 waves -> 10/12, the best
    assert eff(1, 256, 640, 256, 4) == pytest.approx(10 / 12)
    assert eff(1, 256, 128 * 8, 4096, 4) == 1.0  # 8 tiles of 256x128: two full waves
    # one 128x128 tile on 8 SMs: K = 4096 splits 8 ways (4096 / 8 = 512 = SPLIT_K_MIN each): all SMs busy; with
    # K = 1024 only 2 ways: 2 of 8 SMs
    assert eff(1, 128, 128, 4096, 8) == 1.0 and eff(1, 128, 128, 1024, 8) == pytest.approx(2 / 8)
    assert eff(3, 100, 128, 64, 8) == pytest.approx(3 * 100 / (3 * 128) * 3 / 8)  # batched, padded, one part-wave
    # with K0 = 80: two full waves at K = 4096 pay 4096 / 4176; split 8 ways, each slice of 512 pays 512 / 592
    assert roofline.GEMM_K0 == 80
    assert roofline.gemm_efficiency(1, 256, 128 * 8, 4096, 4) == pytest.approx(4096 / 4176)
    assert roofline.gemm_efficiency(1, 128, 128, 4096, 8) == pytest.approx(512 / 592)


def test_gemm_fixed_costs_are_the_fit_to_measured_gemms():
    """GEMM_K0 and GEMM_FIXED_S are the least-squares pair on bench/gemm_fit.py's grid against OpenXLA's measured
    H100 bf16 GEMMs (tests/data/xla_sm90_matmul.csv): quantization alone misprices the table by a factor of 2.4,
    the fitted terms by 1.14."""
    import gemm_fit
    shapes = gemm_fit.measured()
    assert len(shapes) == 375 and {s[:4] for s in shapes} == {(b, m, n, k) for b in (1, 2, 4)
                                                              for m in gemm_fit.SIZES for n in gemm_fit.SIZES
                                                              for k in gemm_fit.SIZES}
    err, k0, t0 = gemm_fit.fit(shapes)
    assert (k0, t0) == (roofline.GEMM_K0, pytest.approx(roofline.GEMM_FIXED_S))
    assert math.exp(err) < 1.15 < 2.3 < math.exp(gemm_fit.rms_log_error(shapes, 0, 0))


def test_attention_at_flashattention2s_published_speed():
    """attention_seconds (tools/roofline.py, FA2): a published point, and one between four of them."""
    A100 = roofline.FA2["A100"]
    f = 3e12  # recorded FLOPs of a forward and its backward: 3 x the forward's 4 B h T^2 hd
    # causal, head dim 64, T = 1024: 119 TFLOP/s over the figure's FLOPs, 3.5 x forward / 2 = f x 3.5 / 3 / 2
    assert roofline.attention_seconds(f, 64, 1024, True, A100) == pytest.approx(f * 3.5 / 3 / 2 / 119e12)
    assert roofline.attention_seconds(f, 64, 1024, False, A100) == pytest.approx(f * 3.5 / 3 / 153e12)
    # head dim 96, T = 2^10.5: halfway in both: (119 + 140) / 2 at 64, (133 + 155) / 2 at 128, then their mean
    rate = ((119 + 140) / 2 + (133 + 155) / 2) / 2
    assert roofline.attention_seconds(f, 96, 2 ** 10.5, True, A100) == pytest.approx(f * 3.5 / 6 / (rate * 1e12))
    assert roofline.attention_seconds(f, 256, 1 << 20, True, A100) == pytest.approx(f * 3.5 / 6 / 189e12)  # clamped
    # in the price: a bf16 step on H100 times its attention ops so (fp32 has no published figure: the fraction)
    r, ops = project(accum=2, dtype="bf16")
    attn = [op for op in ops if op["cat"] == "attention"]
    assert attn and all(op["attn"] == (H // NH, T, True) for op in attn)
    for op in attn:
        want = roofline.attention_seconds(op["flops"], *op["attn"], roofline.FA2["H100"])
        assert op["s"] == pytest.approx(max(want, op["bytes"] / (3350e9 * 0.85), roofline.LAUNCH_S))


def test_gemm_efficiency_and_launch_in_the_price():
    """Each matmul's time is its FLOPs at peak x mm x gemm_efficiency (or its bytes, whichever is longer) plus
    GEMM_FIXED_S; no kernel is shorter than LAUNCH_S; the CPU (no SMs) is priced without either."""
    r, ops = project(accum=2)
    spec = roofline.GPUS["H100"]
    for op in ops:
        if op["cat"] == "communication":
            continue
        assert op["s"] >= roofline.LAUNCH_S
        if op["cat"] == "matmul":
            compute = op["flops"] / (spec["fp32"] * 1e12 * spec["mm"] * roofline.gemm_efficiency(*op["mnk"], 132))
            want = max(compute, op["bytes"] / (spec["hbm"] * 1e9 * 0.85)) + roofline.GEMM_FIXED_S
            assert op["s"] == pytest.approx(max(want, roofline.LAUNCH_S))
    tiny_ops = [op for op in ops if op["cat"] == "elementwise" and op["bytes"] < 1000]
    assert tiny_ops and all(op["s"] == roofline.LAUNCH_S for op in tiny_ops)  # launch-bound
    launches = sum(1 for op in ops if op["cat"] != "communication")
    assert r["step_s"] >= launches * roofline.LAUNCH_S
    cpu = dict(fp32=1.0, hbm=10.0, nvlink=1.0, ib=1.0, mm=1.0, attn=1.0, mem=1.0, launch_s=2e-6)
    priced = roofline.price([dict(op, s=0) for op in ops if op["cat"] == "matmul"][:1], cpu, 1, 1)[0]
    assert priced["s"] == pytest.approx(max(priced["flops"] / 1e12, priced["bytes"] / 1e10, 2e-6))


def test_pessimism_is_the_largest_excess_over_a_published_measurement():
    """PESSIMISM is the largest projected / measured of bench/anchors.py's anchors, as recorded when it was set
    (tests/data/anchors.json: `bench/anchors.py --json`, bench/RESULTS.md); each anchor's configuration builds."""
    import json
    import anchors
    with open(os.path.join(ROOT, "tests", "data", "anchors.json")) as f:
        rows = json.load(f)
    assert [r["anchor"] for r in rows] == [a["name"] for a in anchors.ANCHORS]
    assert roofline.PESSIMISM == round(max(r["projected_over_measured"] for r in rows), 2)
    for a in anchors.ANCHORS:
        cfg = make_config("small", **a["overrides"], tp=a["tp"])
        assert cfg.batch_tokens and a["gpu"] in roofline.GPUS and ("measured_step_s" in a) != ("measured_mfu" in a)


def test_layouts_pick_the_fastest_that_fits():
    """bench/layouts.py: every split of 4 GPUs (tp 4, 2, 1; ZeRO-1 off and on where dp > 1), fastest first among
    those that fit; with too little memory per GPU, none fits; ZeRO-1 is what lets a layout fit in between."""
    import layouts
    over = dict(n_layer=2, n_head=4, n_embd=64, seq_len=32, vocab_size=256, micro_batch=2, batch_tokens=256)
    rows = layouts.compare("tiny", over, "H100", 4)
    assert sorted((r["tp"], r["dp"], r["zero1"]) for r in rows) == [(1, 4, False), (1, 4, True), (2, 2, False),
                                                                    (2, 2, True), (4, 1, False)]
    assert all(r["fits"] for r in rows) and rows[0]["tokens_per_s"] == max(r["tokens_per_s"] for r in rows)
    assert all(r["sequence_parallel"] == (r["tp"] > 1) for r in rows)
    assert not any(r["fits"] for r in layouts.compare("tiny", over, "H100", 4, gpu_mem=1e-3))
    dp4 = {r["zero1"]: r["memory_gb"] for r in rows if r["dp"] == 4}
    squeezed = layouts.compare("tiny", over, "H100", 4, gpu_mem=(dp4[True] + dp4[False]) / 2 + 2.0)
    assert [(r["tp"], r["zero1"]) for r in squeezed if r["dp"] == 4 and r["fits"]] == [(1, True)]
    with pytest.raises(UserError, match="unknown --gpu"):
        layouts.compare("tiny", over, "H300", 4)


def test_anchors_priced_as_there():
    """bench/anchors.py prices an anchor's own attention kernel from the same figure's other bars (a hand case:
    FlashAttention version 1, causal, head dimension 64, T 1024: 70 TFLOP/s), and each "then" names what it uses."""
    import anchors
    f = 3e12
    v1 = anchors.ATTENTION_THEN["FlashAttention"]
    assert roofline.attention_seconds(f, 64, 1024, True, v1) == pytest.approx(f * 3.5 / 3 / 2 / 70e12)
    assert all(set(t) == set(roofline.FA2["A100"]) and all(len(r) == 6 for r in t.values())
               for t in anchors.ATTENTION_THEN.values())
    for a in anchors.ANCHORS:
        then = a.get("then", {})
        assert set(then) <= {"attention", "hide", "speedup"}
        assert then.get("attention", "Pytorch") in anchors.ATTENTION_THEN


# The two shortcuts that keep `train.py --plan` to seconds (issue 28), each held against what it stands for, on every
# precision, tp, dp and ZeRO-1 setting: the whole projection must come out the same, to the last bit.
SHORTCUT_CASES = [dict(dtype=d, tp=tp, dp=dp, zero1=z) for d in ("fp32", "bf16", "fp16") for tp in (1, 2)
                  for dp in (1, 2) for z in ((False, True) if dp > 1 else (False,))]


def _projection(case, **how):
    ops = []
    r = roofline.project("tiny", {**TINY, "n_head": 6, "dtype": case["dtype"], "zero1": case["zero1"],
                                  "sequence_parallel": case["tp"] > 1}, "H100", tp=case["tp"], dp=case["dp"],
                         accum=4, ops_out=ops, **how)
    r.pop("record_s"), r.pop("recorded_micro_batches")
    return r, [{k: v for k, v in op.items() if k not in ("ins", "outs")} for op in ops]


@pytest.mark.parametrize("case", SHORTCUT_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_plan_shortcuts_change_no_projection(case):
    """warm_up (one AdamW step on zero gradients) leaves what a whole step leaves, as far as the next step's ops go;
    and under master weights every micro-batch but the last runs the last one's ops without the data-parallel
    collectives (alike), so one recorded micro-batch stands for all four."""
    fast, fast_ops = _projection(case)
    slow, slow_ops = _projection(case, full_warm_up=True, record_each=True)
    assert fast_ops == slow_ops
    assert fast == slow
