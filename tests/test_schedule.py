"""The lr schedule fitted to the run (issue 28): a preset's warm-up longer than --max_steps is scaled to the run
unless the user set it, and train.py says so in one line."""
import pytest

from conftest import SMALL, read_metrics, run
from run.config import WARMUP_FRACTION, fit_schedule, make_config
from train import lr_at


def test_quick_start_schedule_is_fitted():
    """The README's quick start: the tiny preset's 50 warm-up steps in a 40-step run. Before issue 28 it ended at
    lr 1.6e-3, still warming up."""
    cfg = make_config("tiny", max_steps=40)
    line = fit_schedule(cfg, {"max_steps": 40})
    assert cfg.warmup_steps == round(WARMUP_FRACTION * 40) == 4 and cfg.lr_decay_steps == 0
    assert "warmup_steps 50 -> 4" in line and "cosine decay to step 40" in line
    assert lr_at(4, cfg) == pytest.approx(cfg.lr)  # the peak at the end of warm-up
    assert lr_at(40, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)  # decayed to the floor at the last step


def test_schedule_left_alone():
    cfg = make_config("tiny")  # 1000 steps: the preset's own warm-up fits
    assert fit_schedule(cfg, {}) == "" and cfg.warmup_steps == 50
    cfg = make_config("tiny", max_steps=40, warmup_steps=45)  # set on the command line: the user's choice
    assert fit_schedule(cfg, {"max_steps": 40, "warmup_steps": 45}) == "" and cfg.warmup_steps == 45
    cfg = make_config("tiny", max_steps=3)
    fit_schedule(cfg, {"max_steps": 3})
    assert cfg.warmup_steps == 1  # at least one step


def test_decay_longer_than_the_run():
    cfg = make_config("tiny", max_steps=100, lr_decay_steps=500)
    assert fit_schedule(cfg, {"max_steps": 100, "lr_decay_steps": 500}) == ""  # the user's: kept
    cfg = make_config("tiny", max_steps=100)
    cfg.lr_decay_steps = 500  # as a preset might set it
    line = fit_schedule(cfg, {"max_steps": 100})
    assert cfg.lr_decay_steps == 0 and cfg.warmup_steps == 50 and "(was 500)" in line
    assert lr_at(100, cfg) == pytest.approx(cfg.lr * cfg.min_lr_ratio)


def test_fitted_schedule_is_printed_and_used(prepared, tmp_path):
    """The line on the console, and the lr of the run's metrics follows the fitted schedule. SMALL sets
    --warmup_steps, so it is dropped here to let the preset's 50 steps meet a 6-step run."""
    small = [a for i, a in enumerate(SMALL) if "--warmup_steps" not in SMALL[max(i - 1, 0):i + 1]]
    proc = run("train.py", *small, "--data", prepared, "--out", tmp_path / "run", "--max_steps", 6)
    assert proc.stdout.count("schedule fitted to --max_steps 6: warmup_steps 50 -> 1") == 1
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run") if "lr" in r]
    assert lrs[0] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-4)  # peak after 1 step, then the floor

