"""tools/plan.py against the real model: parameter counts per rank on the meta device, and memory estimates against the
bytes actually alive during training steps on CPU (tests/memtrack.py)."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run
from memtrack import measured_peak
from model import Yuan, count_params
from run.config import make_config
from distributed import Dist
from tools.plan import estimate, params_per_rank
from helpers import MPIEXEC, needs_mpiexec


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_yuan_params_per_rank(tp):
    cfg = make_config("yuan-4.7b", tp=tp)
    with torch.device("meta"):
        model = Yuan(cfg, Dist(tp=tp, tp_rank=tp - 1))
    n_rank, _ = params_per_rank(cfg, tp)
    assert sum(p.numel() for p in model.parameters()) == n_rank
    sharded = sum(p.numel() for p in model.parameters() if getattr(p, "tp_sharded", False))
    assert tp * sharded + (n_rank - sharded) == count_params(cfg) == 4_701_321_216


@pytest.mark.parametrize("dtype, extra", [("fp32", {}), ("fp32", dict(recompute="selective")),
                                          ("fp32", dict(recompute="full")), ("fp32", dict(n_embd=256, n_head=8)),
                                          ("bf16", {}), ("bf16", dict(recompute="full"))])
def test_estimate_within_10_percent_of_measured(dtype, extra):
    cfg = make_config("tiny", **{**dict(n_layer=4, n_embd=128, n_head=4, seq_len=256, vocab_size=2048,
                                        micro_batch=4, dtype=dtype), **extra})
    got = measured_peak(cfg)
    want = estimate(cfg, tp=1, dp=1, dtype=dtype)["total_bytes"]
    assert abs(want - got) / got < 0.10, f"estimate {want / 1e6:.1f} MB, measured {got / 1e6:.1f} MB"


def test_recompute_saves_what_the_plan_says():
    """The measured saving of full recomputation is real and of the size the plan predicts."""
    base = dict(n_layer=6, n_embd=128, n_head=4, seq_len=256, vocab_size=512, micro_batch=4, dtype="fp32")
    none, full = (make_config("tiny", **base, recompute=r) for r in ("none", "full"))
    saved = measured_peak(none) - measured_peak(full)
    predicted = estimate(none, dtype="fp32")["total_bytes"] - estimate(full, dtype="fp32")["total_bytes"]
    assert saved > 0.3 * measured_peak(none) and abs(saved - predicted) / saved < 0.10


@needs_mpiexec
def test_estimate_at_tp2_with_and_without_sequence_parallelism():
    """tests/mpi_plan.py: at tp = 2 on 2 ranks, estimate within 10% of the measured peak, with and without sequence
    parallelism, and the saving of sequence parallelism within 10% of the predicted one."""
    proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "tests", "mpi_plan.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("sequence parallelism saves") == 2


def test_plan_cli_and_the_issue_goals(capsys, monkeypatch):
    proc = run("train.py", "--preset", "yuan-4.7b", "--tp", 8, "--plan", "--gpus", 8, "--gpu", "H100", "--mfu", 0.4)
    assert "593,820,672" in proc.stdout and "fits" in proc.stdout and "tokens/s" in proc.stdout
    assert "of 4,701,321,216 in the model" in proc.stdout
    # The goals, in this process (the command line is the same function: tools/plan.plan_from_args -> plan).
    from tools.plan import plan
    from tools import roofline
    calls, project = [], roofline.project
    monkeypatch.setattr(roofline, "project", lambda *a, **k: calls.append((a, k, project(*a, **k))) or calls[-1][2])
    memory_goals = [("A100-40GB", 8, 8, "bf16", {}), ("V100-32GB", 4, 4, "fp16", {"recompute": "full"})]
    for gpu, gpus, tp, dtype, extra in memory_goals:
        r = plan("yuan-4.7b", {"tp": tp, **extra}, gpus=gpus, gpu=gpu, mfu=0.4, as_json=True)  # memory: no projection
        assert r["fits"] and r["dtype"] == dtype and r["tp"] == tp, r
    for gpu, gpus, tp, dtype, extra in [("H200", 1, 1, "bf16", {"recompute": "full"})]:
        r = plan("yuan-4.7b", {"tp": tp, **extra}, gpus=gpus, gpu=gpu, as_json=True)
        assert r["fits"] and r["dtype"] == dtype and r["tp"] == tp, r
        # the time uses the MFU that tools/roofline.py projects for this very layout, not a fixed figure
        assert r["mfu_source"].startswith(f"projected by tools/roofline.py for {gpu}") and 0.1 < r["mfu"] < 0.8
        assert r["hours"] == pytest.approx(1e9 / (gpus * r["peak_tflops"] * 1e12 * r["mfu"] / r["flops_per_token"])
                                           / 3600)
    # r, the H200 goal, took its MFU from the projection of that very layout
    args, kwargs, projected = calls[-1]
    assert args == ("yuan-4.7b", {"tp": 1, "recompute": "full", "dtype": "bf16"}, "H200", 1, 1)
    assert kwargs == {"accum": 512} and r["mfu"] == projected["mfu"]
    # a projection comes with its pessimistic end: the projection / roofline.PESSIMISM (bench/anchors.py)
    assert r["mfu_pessimistic"] == pytest.approx(r["mfu"] / roofline.PESSIMISM)
    assert r["hours_pessimistic"] == pytest.approx(r["hours"] * roofline.PESSIMISM)
    given = plan("yuan-4.7b", {"tp": 8}, mfu=0.3, as_json=True)
    assert given["mfu"] == 0.3 and given["mfu_source"] == "given" and given["mfu_pessimistic"] is None
    r = plan("yuan-4.7b", {"tp": 1}, gpu="H100", as_json=True)
    assert not r["fits"] and r["layouts_that_fit"] == [] and r["hours"] is None  # 4.7B with AdamW: over 75 GB
    capsys.readouterr()


def test_a_plan_that_does_not_fit_names_the_layouts_that_do():
    proc = run("train.py", "--preset", "yuan-4.7b", "--plan", "--gpus", 2, "--gpu", "H100", "--mfu", 0.4, check=False)
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout and "tokens/s" not in proc.stdout
    assert "Layouts of 2 GPUs that fit, smallest tp first:\n  --tp 1 --zero1 true" in proc.stderr
    assert "--tp 2 --sequence_parallel true " in proc.stderr and "Traceback" not in proc.stderr


def test_zero1_divides_the_optimizer_state():
    cfg = make_config("yuan-4.7b", tp=4, zero1=True)
    plain = estimate(make_config("yuan-4.7b", tp=4), tp=4, dp=2)["bytes"]
    sharded = estimate(cfg, tp=4, dp=2)["bytes"]
    assert sharded["optimizer"] * 2 == plain["optimizer"] and sharded["weights"] == plain["weights"]


@pytest.mark.parametrize("args, message", [(["--gpus", 6, "--tp", 4], "multiple of --tp"),
                                           (["--mfu", 45], "fraction"), (["--gpu_mem", "lots"], "numbers")])
def test_plan_errors(args, message):
    proc = run("train.py", "--preset", "yuan-4.7b", "--plan", *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_plan_options_need_plan(tmp_path):
    proc = run("train.py", "--preset", "tiny", "--data", tmp_path, "--out", tmp_path / "o", "--gpus", 8, check=False)
    assert proc.returncode != 0 and "--gpus belongs to --plan" in proc.stderr
