import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch

from conftest import ROOT, SMALL, read_metrics, run
from model import ModelConfig, UserError, Yuan
from run.config import Config
from distributed import Dist
from data_parallel import clip_grad_norm
from mixed_precision import LossScaler
from run.config import parse_args
from train import lr_at

EXACT = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss", "loss_scale", "skipped")


def exact_fields(rows):
    return [{k: r[k] for k in EXACT if k in r} for r in rows]


# --- pieces -------------------------------------------------------------------------------------------------------

def test_loss_scaler_skips_inf_and_recovers():
    torch.manual_seed(0)
    model = Yuan(Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, seq_len=8))
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = LossScaler(enabled=True, scale=1024.0, growth_interval=2)
    x = torch.randint(0, 128, (2, 9))

    def backward():
        _, loss = model(x[:, :-1], x[:, 1:])
        (loss * scaler.scale).backward()

    def unscale_and_clip():  # as step.train_step does
        scaler.unscale(params)
        norm = clip_grad_norm(params, 1.0, Dist())
        return norm, math.isfinite(norm)

    backward()
    params[3].grad[0] = float("inf")  # an fp16 overflow somewhere in the backward
    before = [p.detach().clone() for p in params]
    norm, finite = unscale_and_clip()
    assert not finite and not torch.isfinite(torch.tensor(norm))
    scaler.update(finite)
    opt.zero_grad()
    assert scaler.scale == 512.0 and all(p.equal(b) for p, b in zip(params, before))
    for expected_scale in (512.0, 1024.0):  # two clean steps -> the scale grows back (growth_interval=2)
        backward()
        norm, finite = unscale_and_clip()
        assert finite and norm > 0
        opt.step()
        scaler.update(finite)
        opt.zero_grad()
    assert scaler.scale == 1024.0 and not params[3].equal(before[3])


def test_help_lists_every_field():
    proc = run("train.py", "--help")
    for f in ("--preset", "--resume", *(f"--{f.name} " for f in fields(Config))):
        assert f in proc.stdout
    assert "transformer blocks" in proc.stdout  # the field's comment from model.py
    assert proc.stdout.index("ModelConfig:") < proc.stdout.index("--n_layer") < proc.stdout.index("TrainConfig:") \
        < proc.stdout.index("--max_steps")  # the model's fields, then the run's


def test_lr_schedule():
    cfg = Config(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(5, cfg) == pytest.approx(0.5) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)


def test_cli_types_and_dashes():
    opts, flags, over = parse_args(["--preset", "tiny", "--data", "d", "--out", "o", "--max-steps", "7",
                                    "--lr=0.5", "--dtype", "fp16", "--resume"])
    assert over == {"max_steps": 7, "lr": 0.5, "dtype": "fp16"} and flags["resume"] and opts["out"] == "o"
    with pytest.raises(UserError, match="Did you mean --max_steps"):
        parse_args(["--preset", "tiny", "--data", "d", "--out", "o", "--max_step", "7"])
    with pytest.raises(UserError, match="expects int, got 'many'"):
        parse_args(["--preset", "tiny", "--data", "d", "--out", "o", "--max_steps", "many"])


# --- the command line, end to end (every bad value and option: tests/test_bad_inputs.py) -------------------------


def test_train_metrics_checkpoint_and_sample(prepared, tmp_path):
    out = tmp_path / "run"
    run("train.py", *SMALL, "--data", prepared, "--out", out, "--max_steps", 10, "--ckpt_interval", 4,
        "--keep_ckpts", 2)
    rows = read_metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 11)) and [r["step"] for r in eval_rows] == [5, 10]
    for r in train_rows:
        assert isinstance(r["loss"], float) and r["lr"] > 0 and r["grad_norm"] > 0 and r["tokens_per_s"] > 0
        assert r["tokens"] == r["step"] * 256 and r["mfu"] is None  # no known peak on a CPU
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    assert sorted(os.listdir(out)) == [".lock", "ckpt_0000008.pt", "ckpt_0000010.pt", "config.json", "metrics.jsonl",
                                       "tensorboard", "tokenizer.json", "tokenizer.tiktoken"]
    ckpt = torch.load(out / "ckpt_0000010.pt", weights_only=True)
    assert ckpt["step"] == 10 and ckpt["data_position"] == {"seed": 1234, "next_step": 11}
    assert set(ckpt) >= {"model", "optimizer", "scaler", "rng", "model_config", "run_config", "tokenizer"}
    assert list(ckpt["model_config"]) == [f.name for f in fields(ModelConfig)]  # what rebuilds the network
    assert ckpt["run_config"]["max_steps"] == 10 and "n_layer" not in ckpt["run_config"]
    proc = run("sample.py", "--out", out, "--prompt", "曹操", "--max-new-tokens", 8, "--num-samples", 1)
    assert "曹操" in proc.stdout and "step 10" in proc.stdout


def test_fp16_and_bf16_run(prepared, tmp_path):
    for dtype in ("fp16", "bf16"):
        run("train.py", *SMALL, "--data", prepared, "--out", tmp_path / dtype, "--max_steps", 3, "--dtype", dtype)
        rows = [r for r in read_metrics(tmp_path / dtype) if "loss" in r]
        assert len(rows) == 3 and all(r["loss"] == r["loss"] for r in rows)  # no NaN
        assert rows[0]["loss_scale"] == (65536.0 if dtype == "fp16" else 1.0)


def test_resume_is_exact(prepared, tmp_path):
    """20 steps straight == 10 steps, stop, resume for 10 more: bitwise in fp32 on CPU, from checkpoints in the
    format of earlier versions (one flat config)."""
    common = [*SMALL, "--data", prepared, "--lr_decay_steps", 20, "--ckpt_interval", 5, "--dropout", 0.1]
    run("train.py", *common, "--out", tmp_path / "a", "--max_steps", 20)
    run("train.py", *common, "--out", tmp_path / "b", "--max_steps", 10)
    for path in (tmp_path / "b").glob("ckpt_*.pt"):  # as written before the Config was split: one flat "config"
        ckpt = torch.load(path, weights_only=True)
        ckpt["config"] = {**ckpt.pop("model_config"), **ckpt.pop("run_config"), "tp": 1}
        torch.save(ckpt, path)
    proc = run("train.py", *common, "--out", tmp_path / "b", "--max_steps", 20, "--resume")
    assert "resumed from" in proc.stdout and "step 10" in proc.stdout
    assert exact_fields(read_metrics(tmp_path / "a")) == exact_fields(read_metrics(tmp_path / "b"))


def test_kill_and_resume_is_exact(prepared, tmp_path):
    """SIGKILL mid-run after the first checkpoint, resume: metrics.jsonl equals the uninterrupted run's, and the
    rows written after the checkpoint are kept aside in metrics.rewound.jsonl, not lost."""
    common = [*SMALL, "--data", prepared, "--max_steps", 150, "--ckpt_interval", 20, "--eval_interval", 50]
    run("train.py", *common, "--out", tmp_path / "a")
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *map(str, common), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "ckpt_0000020.pt").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run("train.py", *common, "--out", out, "--resume")
    assert exact_fields(read_metrics(tmp_path / "a")) == exact_fields(read_metrics(out))


def test_existing_run_is_not_overwritten(prepared, tmp_path):
    out = tmp_path / "run"
    run("train.py", *SMALL, "--data", prepared, "--out", out, "--max_steps", 2)
    before = open(out / "metrics.jsonl").read()
    proc = run("train.py", *SMALL, "--data", prepared, "--out", out, "--max_steps", 2, check=False)
    assert proc.returncode != 0 and "--resume" in proc.stderr and "--overwrite" in proc.stderr
    assert open(out / "metrics.jsonl").read() == before and (out / "ckpt_0000002.pt").exists()
    # A mistake elsewhere on the command line stops the run before --overwrite deletes anything.
    proc = run("train.py", *SMALL, "--data", out / "no-such-data", "--out", out, "--overwrite", check=False)
    assert proc.returncode != 0 and (out / "ckpt_0000002.pt").exists()
    proc = run("train.py", *SMALL, "--data", prepared, "--out", out, "--overwrite", "--resume", check=False)
    assert proc.returncode != 0 and "pass one of them" in proc.stderr and (out / "ckpt_0000002.pt").exists()
    run("train.py", *SMALL, "--data", prepared, "--out", out, "--max_steps", 1, "--overwrite")
    assert not (out / "ckpt_0000002.pt").exists() and len(read_metrics(out)) == 2  # step 1 + its eval


def test_checkpoint_from_another_config(prepared, tmp_path):
    out = tmp_path / "run"
    run("train.py", *SMALL, "--data", prepared, "--out", out, "--max_steps", 2)
    proc = run("train.py", *SMALL, "--data", prepared, "--out", out, "--max_steps", 4, "--n_layer", 3,
               "--resume", check=False)
    assert proc.returncode != 0 and "n_layer: checkpoint 2 vs now 3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_data_from_another_tokenizer(prepared, corpus, tmp_path):
    """Resuming on data prepared with a different tokenizer (same vocab size) is refused."""
    tok = tmp_path / "other.tiktoken"
    run("data.py", "train-tokenizer", "--input", corpus, "--vocab-size", 500, "--out", tok)
    run("data.py", "prepare", "--input", corpus, "--tokenizer", tok, "--out", tmp_path / "d2", "--val-fraction", 0.2)
    out = tmp_path / "run"
    run("train.py", *SMALL, "--data", prepared, "--out", out, "--max_steps", 2)
    proc = run("train.py", *SMALL, "--data", tmp_path / "d2", "--out", out, "--max_steps", 4, "--resume",
               check=False)
    assert proc.returncode != 0 and "different hash" in proc.stderr


def test_corrupt_data_and_checkpoint(prepared, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(prepared, data)
    with open(data / "train_0000.bin", "r+b") as f:
        f.truncate(os.path.getsize(data / "train_0000.bin") - 10)
    proc = run("train.py", *SMALL, "--data", data, "--out", tmp_path / "r1", check=False)
    assert proc.returncode != 0 and "train_0000.bin is truncated" in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "r2"
    run("train.py", *SMALL, "--data", prepared, "--out", out, "--max_steps", 2)
    with open(out / "ckpt_0000002.pt", "r+b") as f:
        f.truncate(1000)
    proc = run("train.py", *SMALL, "--data", prepared, "--out", out, "--max_steps", 4, "--resume", check=False)
    assert proc.returncode != 0 and "cannot read checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_mfu_with_given_peak(prepared, tmp_path):
    """With --peak_tflops, mfu = (6 N_matmul + 12 L h T) * tokens/s / peak."""
    from model import flops_per_token
    from run.config import make_config
    run("train.py", *SMALL, "--data", prepared, "--out", tmp_path / "r", "--max_steps", 2, "--peak_tflops", 0.001)
    cfg = make_config("tiny", n_layer=2, n_embd=64, n_head=4, seq_len=32, vocab_size=512)
    for r in (r for r in read_metrics(tmp_path / "r") if "loss" in r):
        assert r["mfu"] == pytest.approx(flops_per_token(cfg) * r["tokens_per_s"] / 1e9)
