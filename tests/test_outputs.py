"""What people look at during and after a run (run_dir.py, plot.py): plain log lines when stdout is not a
terminal, TensorBoard events equal to metrics.jsonl, the loss plot."""
import os

import pytest

from conftest import SMALL, read_metrics, run


@pytest.fixture(scope="module")
def logged(prepared, tmp_path_factory):
    """A 12-step run with stdout and stderr captured (pipes, as in a batch log), stopped at 8 and resumed."""
    out = tmp_path_factory.mktemp("logged") / "run"
    first = run("train.py", *SMALL, "--data", prepared, "--out", out, "--max_steps", 8, "--ckpt_interval", 4)
    second = run("train.py", *SMALL, "--data", prepared, "--out", out, "--max_steps", 12, "--ckpt_interval", 4,
                 "--resume")
    return out, first, second


def test_batch_log_has_plain_lines(logged):
    _, first, second = logged
    for proc in (first, second):
        assert "\r" not in proc.stdout and "\r" not in proc.stderr  # no progress bar redraws
    lines = first.stdout.splitlines()
    assert any(line.startswith("step 1/8 | loss ") and "| ETA " in line for line in lines)
    assert any(line.startswith("step 8/8 | loss ") and "tok/s | MFU n/a | elapsed" in line for line in lines)
    assert any(line.startswith("step 9/12 | loss ") for line in second.stdout.splitlines())  # resumed


def test_tensorboard_events_equal_metrics(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out, _, _ = logged
    events = EventAccumulator(os.path.join(out, "tensorboard")).Reload()
    rows = read_metrics(out)
    for key, tag in (("loss", "loss/train"), ("val_loss", "loss/val"), ("lr", "lr"), ("grad_norm", "grad_norm"),
                     ("tokens_per_s", "speed/tokens_per_s"), ("skipped", "skipped"), ("loss_scale", "loss_scale")):
        want = [(r["step"], float(r[key])) for r in rows if key in r]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(s, pytest.approx(v, rel=1e-6)) for s, v in want], tag
    assert [e.step for e in events.Scalars("loss/train")] == list(range(1, 13))  # 1-8, then 9-12 after the resume


def test_tensorboard_off(prepared, tmp_path):
    run("train.py", *SMALL, "--data", prepared, "--out", tmp_path / "r", "--max_steps", 2, "--tensorboard", "false")
    assert not os.path.exists(tmp_path / "r" / "tensorboard")


def test_plot_two_runs(logged, prepared, tmp_path):
    out, _, _ = logged
    png = tmp_path / "loss.png"
    proc = run("plot.py", out, os.path.join(out, "metrics.jsonl"), "--png", png, "--title", "two")
    assert "2 run(s)" in proc.stdout
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
