"""tools/plan.py's layout picker (candidates, layouts, layouts_that_fit), which `train.py --plan` and bench/layouts.py
share: every layout it offers, with exactly the flags it prints, is one train.py accepts. Issue 27: on 12 x A100-40GB
it offered tp 2 x dp 6, whose 512 micro-batches of 1 x 2048 do not split over 6 data-parallel ranks, so train.py
stopped; and --plan called that layout "fits"."""
import os
import re
import sys

import pytest

from conftest import ROOT, run
from run.config import grad_accum, make_config, parse_args
import tools.plan as planner
from runtime.accelerators import ACCELERATORS


def train_py_accepts(preset, gpus, flags):
    """Micro-batches per step of the run `train.py --preset PRESET FLAGS` on `gpus` GPUs, with the flags read back by
    train.py's own parser: the Config's layout checks (make_config), --gpus a multiple of --tp (plan), and whole
    micro-batches on every data-parallel rank (grad_accum, which open_data calls). Raises UserError where train.py
    would stop."""
    opts, _, overrides = parse_args(["--preset", preset, "--plan", "--gpus", str(gpus), *flags.split()])
    cfg = make_config(preset, **overrides)
    assert int(opts["gpus"]) % cfg.tp == 0, f"{flags} on {gpus} GPUs"
    return grad_accum(cfg, gpus // cfg.tp)


@pytest.mark.parametrize("preset", ["yuan-4.7b", "1.3b"])  # micro-batches of 1 x 2048 and of 4 x 2048
def test_every_layout_offered_is_one_train_py_runs(preset):
    """1 to 64 GPUs of every kind the planner knows: each layout that fits passes train.py's checks with the flags
    it prints; a flag --batch_tokens only where the preset's batch does not split over that dp."""
    cfg = make_config(preset)
    micro = cfg.batch_tokens // (cfg.micro_batch * cfg.seq_len)  # 512 for yuan-4.7b, 128 for 1.3b
    offered, changed = 0, 0
    for mem_gb, gpu in {row["mem_gb"]: name for name, row in ACCELERATORS}.items():  # each size once
        for gpus in range(1, 65):
            for r in planner.layouts_that_fit(preset, {}, gpu, gpus, mem_gb, rank_by_speed=False):
                accum = train_py_accepts(preset, gpus, r["flags"])
                assert accum >= 1 and re.fullmatch(r"--tp \d( --\w+ \S+)*", r["flags"]), r
                offered += 1
                if "--batch_tokens" in r["flags"]:
                    changed += 1
                    assert micro % r["dp"] and r["note"].endswith(f"do not split over dp {r['dp']}"), r
                else:
                    assert micro % r["dp"] == 0 and accum == micro // r["dp"] and not r["note"], r
    # the loop saw layouts of both kinds (yuan-4.7b: 1,161 layouts fit, 922 of them with --batch_tokens)
    assert offered > 500 and 100 < changed < offered, (offered, changed)


def test_twelve_a100_40gb_offers_layouts_with_the_batch_they_need():
    """The issue's case, as a person sees it: every layout printed, with its printed flags, passes train.py's checks."""
    proc = run("train.py", "--preset", "yuan-4.7b", "--plan", "--gpus", 12, "--gpu", "A100-40GB", "--mfu", 0.4,
               check=False)
    assert proc.returncode == 1 and "DOES NOT FIT" in proc.stdout and "Traceback" not in proc.stderr
    flags = re.findall(r"^  (--tp .*?)\s{2,}[\d.]+ GB", proc.stderr, re.M)
    assert flags[0] == "--tp 2 --sequence_parallel true --zero1 true --batch_tokens 1044480", proc.stderr
    assert len(flags) == 3 and "512 micro-batches of 1 x 2048 do not split over dp 6" in proc.stderr
    for f in flags:
        assert train_py_accepts("yuan-4.7b", 12, f) in (85, 171)  # 1,044,480 / 12,288 and 1,050,624 / 6,144


def test_a_given_layout_whose_dp_cannot_split_the_batch_is_not_called_fit():
    base = ["--preset", "yuan-4.7b", "--plan", "--gpus", 12, "--gpu", "A100-40GB", "--mfu", 0.4,
            "--tp", 2, "--sequence_parallel", "true", "--zero1", "true"]
    proc = run("train.py", *base, check=False)
    assert proc.returncode == 1 and "fits, 8.6 GB free, but train.py refuses batch_tokens 1,048,576" in proc.stdout
    assert "fits, but train.py would stop: batch_tokens = 1,048,576 is not a multiple" in proc.stderr
    assert "HINT: set --batch_tokens to a multiple, e.g. 1044480." in proc.stderr and "tokens/s" not in proc.stdout
    proc = run("train.py", *base, "--batch_tokens", 1044480)  # its HINT followed: a plan with a time
    assert "fits, 8.6 GB free\n" in proc.stdout and "tokens/s" in proc.stdout
    r = planner.plan("yuan-4.7b", {"tp": 2, "sequence_parallel": True, "zero1": True}, gpus=12, gpu="A100-40GB",
                     mfu=0.4, as_json=True)
    assert r["fits"] and not r["whole_micro_batches"] and r["batch_tokens_hint"] == 1044480 and r["hours"] is None


def test_bench_layouts_uses_the_same_picker(monkeypatch):
    """bench/layouts.py compares exactly the layouts the planner offers (the projection stubbed: only the picking)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import layouts
    monkeypatch.setattr(layouts, "project", lambda preset, over, gpu, tp, dp: dict(tp=tp, dp=dp, dtype="bf16",
                                                                                  tokens_per_s=1.0 * tp))
    rows = layouts.compare("yuan-4.7b", {}, "A100-40GB", 12)
    picked = planner.layouts("yuan-4.7b", {}, 12)
    assert sorted((r["tp"], r["dp"], r["flags"]) for r in rows) == sorted((p["tp"], p["dp"], p["flags"])
                                                                          for p in picked)
    assert [c[:2] for c in planner.candidates(make_config("yuan-4.7b"), 12)] == [(4, 3), (4, 3), (2, 6), (2, 6),
                                                                                  (1, 12), (1, 12)]
    with pytest.raises(planner.UserError, match="--gpus 0 must be at least 1"):
        layouts.compare("yuan-4.7b", {}, "A100-40GB", 0)
