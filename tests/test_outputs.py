"""What people look at during and after a run (runtime/run_dir.py, tools/plot.py): plain log lines when stdout is not a
terminal, TensorBoard events equal to metrics.jsonl, the loss plot, the score line (--target_loss)."""
import json
import os
import types

import pytest

from conftest import SMALL, read_metrics, run
from runtime.run_dir import Console, Score


@pytest.fixture(scope="module")
def logged(prepared, tmp_path_factory):
    """A 12-step run with stdout and stderr captured (pipes, as in a batch log), stopped at 8 and resumed."""
    out = tmp_path_factory.mktemp("logged") / "run"
    common = [*SMALL, "--data", prepared, "--out", out, "--ckpt_interval", 4, "--target_loss", 100]
    first = run("train.py", *common, "--max_steps", 8)
    second = run("train.py", *common, "--max_steps", 12, "--resume")
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
    proc = run("tools/plot.py", out, os.path.join(out, "metrics.jsonl"), "--png", png, "--title", "two")
    assert "2 run(s)" in proc.stdout
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000


def test_score_line_across_a_resume(logged):
    """--target_loss 100: met at the first evaluation (step 5 of SMALL), recorded once, and still reported by the
    resumed run; the wall time (elapsed_s) runs on across the resume."""
    out, first, second = logged
    rows = read_metrics(out)
    met = [r for r in rows if "target_met" in r]
    assert [(r["step"], r["target_met"], r["tokens"]) for r in met] == [(5, 100, 5 * 256)]
    elapsed = [r["elapsed_s"] for r in rows if "loss" in r]
    assert len(elapsed) == 12 and elapsed == sorted(elapsed) and elapsed[8] >= elapsed[7]
    for proc, steps in ((first, 8), (second, 12)):
        final = [r["val_loss"] for r in rows if "val_loss" in r and r["step"] == steps][0]
        line = next(line for line in proc.stdout.splitlines() if line.startswith(f"{steps * 256:,} tokens in "))
        assert f"final validation loss {final:.4f}; target 100 met at step 5 (1,280 tokens, " in line, line


def test_score_not_met(tmp_path):
    class Quiet:
        def log(self, **row):
            self.row = row

        def write(self, text):
            pass
    score, metrics = Score(2.5, tmp_path, enabled=True), Quiet()
    score.evaluated(10, 1000, 2.6, metrics, Quiet())
    assert score.met is None and "; target 2.5 not met" in score.summary(1000, 2.6)
    score.evaluated(20, 2000, 2.5, metrics, Quiet())  # at the target counts
    assert metrics.row["step"] == 20 and "target 2.5 met at step 20 (2,000 tokens, " in score.summary(3000, 2.4)
    assert "target" not in Score(0.0, tmp_path, enabled=True).summary(1000, 2.6)


def test_console_clock_runs_on_across_a_resume(tmp_path, capsys):
    """A resumed run's log lines show the run's wall time, as the score line and elapsed_s count it (issue 28): the
    checkpointed run's 1:02:05 plus this process's seconds, not a clock restarted at 0:00:00."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps(dict(step=8, loss=3.0, elapsed_s=3725.0)) + "\n")
    cfg = types.SimpleNamespace(max_steps=12, log_interval=1)
    score = Score(0.0, tmp_path, enabled=True)
    Console(cfg, 8, enabled=True, elapsed=score.elapsed).step(9, 2.9, 1e-3, 0.5, 1e4, None)
    Console(cfg, 8, enabled=True).step(9, 2.9, 1e-3, 0.5, 1e4, None)  # no Score: this process's clock
    resumed, alone = capsys.readouterr().out.splitlines()
    assert resumed.startswith("step 9/12 | loss 2.9000") and "| elapsed 1:02:05 | ETA 0:00:0" in resumed, resumed
    assert "| elapsed 0:00:00 | ETA 0:00:0" in alone, alone


def test_sample_speed_line_reads_plainly():
    """sample.py's last line says what was generated, how fast, and how much of it was printed (issue 28: it read
    "8 steps x 2 samples ... (10 before the end-of-document token)")."""
    from sample import speed_line
    assert speed_line(2, 8, 10, 0.125, False) == ("# 2 samples x 8 new tokens = 16 tokens in 0.12 s, 128.0 tokens/s "
                                                  "(with the KV cache); 10 printed: each sample is cut at its first "
                                                  "end-of-document token")
    assert speed_line(1, 8, 8, 0.5, True).endswith("= 8 tokens in 0.50 s, 16.0 tokens/s (no cache); all 8 printed")
