"""Which layout for N GPUs? Every tensor-parallel x data-parallel split (with and without ZeRO-1) of a preset, as
tools/plan.py's picker (layouts) offers them to `train.py --plan`, checked for memory by tools/plan.py and priced by
tools/roofline.py; the fastest that fits is picked, and the output says why (the categories of time in which it
differs from the runner-up).

    python bench/layouts.py --preset yuan-4.7b --gpu H100 --gpus 8 [--gpu_mem GB] [--micro_batch 1] [--json FILE]
                            [any other Config field]

Layouts (tools/plan.py candidates and layouts): tp among the divisors of --gpus that are at most GPUS_PER_NODE (a
tensor-parallel group stays inside a node) and divide the heads, the FFN and seq_len; sequence parallelism on wherever
tp > 1 (it moves the same bytes as plain tensor parallelism and stores less); ZeRO-1 off and on wherever dp > 1. The
micro-batch stays as given, and so does the global batch (batch_tokens) wherever dp ranks make it of whole
micro-batches; where they cannot, the layout runs with the nearest batch_tokens they can split, the --batch_tokens
that `train.py --plan` prints for it (a footnote says so), so those layouts split a slightly different step. Each
projection runs the real step under fake tensors (a few seconds for yuan-4.7b).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.errors import UserError  # noqa: E402
from run.config import FIELD_TYPES, make_config, parse_field  # noqa: E402
from runtime.accelerators import accelerator  # noqa: E402
from tools.plan import SLACK_GB, estimate, layouts  # noqa: E402
from tools.roofline import CATEGORIES, GPUS, PESSIMISM, project  # noqa: E402


def compare(preset, overrides, gpu, gpus, gpu_mem=None):
    """A row per layout of tools/plan.py's picker: the projection, tools/plan.py's memory, whether it fits, the
    train.py flags (with --batch_tokens where its dp needs another) and the note that says why; sorted fastest first
    among those that fit (then those that do not)."""
    if gpu not in GPUS:
        raise UserError(f"unknown --gpu {gpu!r}. Known: {', '.join(GPUS)}.")
    if gpus < 1:
        raise UserError(f"--gpus {gpus} must be at least 1.")
    mem_gb = gpu_mem or accelerator(gpu)["mem_gb"]
    rows = []
    for lay in layouts(preset, overrides, gpus):
        tp, dp, over = lay["tp"], lay["dp"], lay["overrides"]
        r = project(preset, over, gpu, tp, dp)
        need = estimate(make_config(preset, **over), tp, dp, r["dtype"])["total_bytes"] / 1e9
        rows.append(dict(r, memory_gb=need, gpu_mem_gb=mem_gb, fits=need + SLACK_GB <= mem_gb, flags=lay["flags"],
                         note=lay["note"]))
    return sorted(rows, key=lambda r: (not r["fits"], -r["tokens_per_s"]))


def why(best, runner_up):
    """The categories (seconds per step) in which the pick gains most over the runner-up, largest first."""
    a, b = best["seconds_by_category"], runner_up["seconds_by_category"]
    gains = sorted(((b[c] - a[c], c) for c in CATEGORIES), reverse=True)
    parts = [f"{c} {b[c]:.2f} -> {a[c]:.2f} s" for d, c in gains if d > 0.01 * runner_up["step_s"]]
    return ", ".join(parts) or "the two are within 1% in every category"


def name(r):
    return f"tp {r['tp']} x dp {r['dp']}" + (" + ZeRO-1" if r["zero1"] else "") + (" + SP" if r["sequence_parallel"]
                                                                                  else "")


def main(argv):
    opts, overrides = {"preset": "yuan-4.7b", "gpu": "H100", "gpus": "8", "gpu_mem": "0", "json": ""}, {}
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return
    if len(argv) % 2:
        raise UserError("options come in pairs: --NAME VALUE (see the docstring of bench/layouts.py).")
    for key, value in zip(argv[::2], argv[1::2]):
        k = key.lstrip("-").replace("-", "_")
        if k in opts:
            opts[k] = value
        elif k in FIELD_TYPES and k not in ("tp", "zero1", "sequence_parallel"):
            try:
                overrides[k] = parse_field(k, value)
            except ValueError:
                raise UserError(f"--{k}: cannot read {value!r}.") from None
        else:
            raise UserError(f"unknown option {key}. Options: --preset, --gpu, --gpus, --gpu_mem, --json, any Config "
                            f"field but tp, zero1, sequence_parallel (the layouts vary those).")
    try:
        gpus, gpu_mem = int(opts["gpus"]), float(opts["gpu_mem"])
    except ValueError:
        raise UserError("--gpus takes a whole number, --gpu_mem a number of GB.") from None
    rows = compare(opts["preset"], overrides, opts["gpu"], gpus, gpu_mem or None)
    print(f"{opts['preset']} on {gpus} x {opts['gpu']}, {rows[0]['dtype']}, micro-batch {rows[0]['micro_batch']} x "
          f"{rows[0]['seq_len']}, recompute {rows[0]['recompute']}; projected by tools/roofline.py "
          f"({rows[0]['assumes'].split(':')[0]}), memory by tools/plan.py\n"
          f"{'layout':<28} {'memory GB':>10} {'fits':>5} {'tokens/s (pessimistic)':>23} {'MFU (pessimistic)':>18} "
          f"{'exposed comm s':>15}")
    for r in rows:
        mark = " *" if r["note"] else ""  # a footnote below: this layout changes batch_tokens
        print(f"{name(r) + mark:<28} {r['memory_gb']:>10.1f} {'yes' if r['fits'] else 'no':>5} "
              f"{r['tokens_per_s']:>10,.0f} ({r['tokens_per_s'] / PESSIMISM:>9,.0f}) "
              f"{r['mfu']:>7.1%} ({r['mfu'] / PESSIMISM:>6.1%}) {r['seconds_by_category']['communication']:>15.2f}")
    for r in rows:
        if r["note"]:
            print(f"* {name(r)}: {r['note']}")
    best = rows[0]
    if not best["fits"]:
        print(f"no layout fits {best['gpu_mem_gb']} GB per GPU: try --recompute full or a smaller --micro_batch")
    else:
        others = [r for r in rows[1:] if r["fits"]]
        hours = 1e9 / best["tokens_per_s"] / 3600
        print(f"pick: {name(best)} (train.py {best['flags']}), {best['mfu']:.1%} MFU ({best['mfu'] / PESSIMISM:.1%} "
              f"pessimistic: the projection / {PESSIMISM:.2f}, bench/RESULTS.md), 1B tokens in {hours:.2f} h "
              f"({hours * PESSIMISM:.2f} h), {best['memory_gb']:.1f} of {best['gpu_mem_gb']} GB per GPU" +
              (f"; against {name(others[0])}: {why(best, others[0])}" if others else ""))
    if opts["json"]:
        with open(opts["json"], "w") as f:
            json.dump(rows, f, indent=1, default=str)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        sys.exit(f"error: {e}")
