"""The benchmark scripts run (on a tiny model, one timed step), so that they cannot silently rot between the GPU
sessions that use them. Their numbers are not checked here: they are recorded by hand in bench/RESULTS.md."""
import json

from conftest import run
from helpers import needs_mpiexec

TINY = ["--preset", "tiny", "--n_layer", "1", "--seq_len", "32", "--micro_batch", "2", "--vocab_size", "256"]


def test_throughput_grid(tmp_path):
    out = tmp_path / "rows.jsonl"
    proc = run("bench/throughput.py", *TINY, "--steps", 1, "--warmup", 1, "--recompute", "none,full", "--json", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["recompute"] for r in rows] == ["none", "full"] and all(r["tokens_per_s"] > 0 for r in rows)
    assert proc.stdout.count("tiny ") == 2 and "tokens/s" in proc.stdout
    assert all(r["accum"] == 4 for r in rows) and "steps of 4 micro-batches" in proc.stdout  # the default


def test_throughput_errors_say_what_is_valid():
    proc = run("bench/throughput.py", "--presets", "small", check=False)
    assert proc.returncode != 0 and "unknown option --presets" in proc.stderr and "Traceback" not in proc.stderr


def test_vs_plain(tmp_path):
    """The plain model it races is the same network (as many parameters), and both were timed."""
    run("bench/vs_plain.py", "--preset", "tiny", "--n_layer", "1", "--seq_len", "32", "--micro_batch", "2",
        "--steps", 1, "--json", tmp_path / "vs.json")
    r = json.loads((tmp_path / "vs.json").read_text())
    assert r["params"]["nanoyuan"] == r["params"]["plain"] > 0 and min(r["tokens_per_s"].values()) > 0, r


def test_sample_bench():
    proc = run("bench/sample_bench.py", "--preset", "tiny", "--n_layer", 1, "--context", 64, "--new", 8)
    assert "speed-up" in proc.stdout and "same tokens: True" in proc.stdout


@needs_mpiexec
def test_signal_soak(tmp_path):
    proc = run("bench/signal_soak.py", "--trials", 1, "--workdir", tmp_path)
    assert "1 of 1 ended in a checkpoint at the step reached, exit 75" in proc.stdout, proc.stdout
