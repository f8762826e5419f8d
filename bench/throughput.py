"""Training throughput of the real step (step.build and step.train_step, nothing copied): tokens/s, MFU and peak
memory for a grid of settings, printed as a table under the device's name. Tokens are synthetic (random ids), so the
model is measured, not the data path (that is bench/data_bench.py).

    python bench/throughput.py --preset small,1.3b --dtype bf16 --recompute none,full --compile false,true
    mpiexec -n 8 python bench/throughput.py --preset yuan-4.7b --tp 8 --sequence_parallel false,true
    python bench/throughput.py --preset small --n_layer 2 --seq_len 128 --steps 2     (a quick look on a CPU)

Any Config field takes a comma-separated list of values and the grid is the product of the lists; --tp is one
number (the launch fixes it: dp = ranks / tp). --steps timed steps follow --warmup untimed ones; --accum micro-batches
per step (default 4: training accumulates many, and a step of one micro-batch would weigh the once-per-step work,
gradient reduction, clipping and AdamW, as if it came with every micro-batch; --accum 1 times exactly that worst
case); --json FILE appends one JSON line per setting. MFU = model FLOPs per token (model.py,
flops_per_token: 6 per weight plus attention, recomputation not counted) x tokens/s / (peak x GPUs). Peak memory is
torch.cuda.max_memory_allocated on a GPU, beside tools/plan.py's estimate for the same setting; on a CPU, the process's
resident high-water mark (it only grows across the grid). A setting that runs out of GPU memory reads OOM.
"""
import gc
import itertools
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from runtime.errors import UserError  # noqa: E402
from model import flops_per_token  # noqa: E402
from run.config import FIELD_TYPES, make_config, parse_field  # noqa: E402
from runtime.mpi import run_or_abort  # noqa: E402
from distributed import init_distributed  # noqa: E402
from tools.plan import estimate  # noqa: E402
from runtime.accelerators import peak_flops  # noqa: E402
from mixed_precision import LossScaler  # noqa: E402
from step import build, resolve_dtype, train_step  # noqa: E402

BENCH_OPTS = {"steps": 5, "warmup": 2, "accum": 4, "json": ""}


def parse(argv):
    """(bench options, {field: [values]}, tp). Values are typed by the Config field, as train.py does."""
    opts, grid, types, tp = dict(BENCH_OPTS), {"preset": ["small"]}, FIELD_TYPES, 1
    if len(argv) % 2:
        raise UserError("options come in pairs: --NAME VALUE[,VALUE...] (see the docstring of bench/throughput.py).")
    for key, value in zip(argv[::2], argv[1::2]):
        name = key.lstrip("-").replace("-", "_")
        if not key.startswith("--"):
            raise UserError(f"unexpected argument {key!r}; options look like --NAME VALUE.")
        try:
            if name in opts:
                opts[name] = type(BENCH_OPTS[name])(value)
            elif name == "tp":
                tp = int(value)
            elif name == "preset":
                grid[name] = value.split(",")
            elif name in types:
                grid[name] = [parse_field(name, v) for v in value.split(",")]
            else:
                raise UserError(f"unknown option --{name}. Bench options: {', '.join(BENCH_OPTS)}, --tp, --preset; "
                                f"any Config field: {', '.join(sorted(types))}.")
        except ValueError:
            raise UserError(f"--{name}: cannot read {value!r}.") from None
    return opts, grid, tp


def measure(preset, overrides, dist, opts):
    """Time opts['steps'] training steps of one setting; returns a result row."""
    cfg = make_config(preset, **overrides, tp=dist.tp)
    dist = replace(dist, sequence_parallel=cfg.sequence_parallel, overlap=cfg.overlap)  # this setting's layout
    resolve_dtype(cfg, dist.device)
    row = dict(preset=preset, tp=dist.tp, dp=dist.dp, dtype=cfg.dtype, recompute=cfg.recompute,
               sp=cfg.sp, zero1=cfg.zero1, compile=cfg.compile,
               micro_batch=cfg.micro_batch, seq_len=cfg.seq_len, accum=opts["accum"],
               plan_gb=estimate(cfg, dist.tp, dist.dp, cfg.dtype)["total_bytes"] / 1e9)
    cuda = dist.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dist.device)
    try:
        model, opt, reducer, clip_params = build(cfg, dist)
        scaler = LossScaler(enabled=cfg.dtype == "fp16")
        gen = torch.Generator().manual_seed(cfg.seed + dist.dp_rank)
        ids = torch.randint(0, cfg.vocab_size, (cfg.micro_batch, cfg.seq_len + 1), generator=gen).to(dist.device)
        batch = lambda micro: (ids[:, :-1], ids[:, 1:])  # noqa: E731
        times = []
        for i in range(opts["warmup"] + opts["steps"]):
            t0 = time.perf_counter()
            loss, _, _ = train_step(model, opt, reducer, scaler, clip_params, opts["accum"], cfg, dist,
                                    batch)
            loss.item()  # waits for the device
            if dist.world > 1:  # the slowest rank sets the pace
                torch.distributed.barrier()
            if i >= opts["warmup"]:
                times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        tok_s = cfg.micro_batch * cfg.seq_len * opts["accum"] * dist.dp / dt
        peak = peak_flops(cfg, dist.device)
        row.update(step_s=dt, tokens_per_s=tok_s, loss=loss.item(),
                   mfu=flops_per_token(cfg) * tok_s / (peak * dist.world) if peak else None,
                   peak_gb=(torch.cuda.max_memory_allocated(dist.device) if cuda else
                            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9)
    except torch.cuda.OutOfMemoryError:
        row.update(step_s=None, tokens_per_s=None, mfu=None, peak_gb=None, oom=True)
    finally:
        model = opt = reducer = clip_params = None
        gc.collect()
    return row


def show(row):
    flags = "".join(f" {name}" for name in ("sp", "zero1", "compile") if row[name])
    setting = (f"{row['preset']:<10} tp{row['tp']:<2} dp{row['dp']:<3} {row['dtype']:<4} {row['recompute']:<9}"
               f"{flags:<19} {row['micro_batch']:>3} x {row['seq_len']:<5}")
    if row.get("oom"):
        return f"{setting}  OOM (plan {row['plan_gb']:.1f} GB)"
    mfu = f"{row['mfu']:6.1%}" if row["mfu"] is not None else "   n/a"
    return (f"{setting} {row['tokens_per_s']:>10,.0f} {mfu} {row['peak_gb']:>7.1f} {row['plan_gb']:>7.1f}"
            f" {row['step_s']:>8.3f}")


def main():
    opts, grid, tp = parse(sys.argv[1:])
    dist = init_distributed(tp, (grid.get("device") or [""])[0])
    name = torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads per rank)"
    memory = "allocated by torch" if dist.device.type == "cuda" else "the process's resident high-water mark"
    dist.print0(f"{name}, torch {torch.__version__}, {dist.world} rank(s); median of {opts['steps']} steps of "
                f"{opts['accum']} micro-batches after {opts['warmup']} warm-up; peak GB = {memory}, plan GB = "
                f"tools/plan.py's estimate\n"
                f"{'setting':<55} {'micro x T':<11} {'tokens/s':>10} {'MFU':>6} {'peak GB':>7} {'plan GB':>7} "
                f"{'step s':>8}")
    keys = list(grid)
    for values in itertools.product(*grid.values()):
        setting = dict(zip(keys, values))
        row = measure(setting.pop("preset"), setting, dist, opts)
        dist.print0(show(row))
        if opts["json"] and dist.rank == 0:
            with open(opts["json"], "a") as f:
                f.write(json.dumps({"device": name, "torch": torch.__version__, **row}) + "\n")


if __name__ == "__main__":
    run_or_abort(main)
