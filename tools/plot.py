"""Plot training runs from their metrics.jsonl: train and val loss against tokens seen, and training speed.

    python tools/plot.py out/demo/run [out/other ...] --png loss.png [--title "..."] [--smooth 20]

One colour per run: the training loss as a thin line (and a moving average over --smooth logged steps), the val
loss as dots joined by a dashed line; below, tokens/s. Needs matplotlib (requirements.txt).
"""
import argparse
import itertools
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: runtime/
from runtime.errors import UserError  # noqa: E402
from runtime.mpi import run_or_abort  # noqa: E402


def read_run(run):
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise UserError(f"{run}: no metrics.jsonl there.\nHINT: pass a training run's --out directory (or its "
                        f"metrics.jsonl).")
    with open(path) as f:
        try:
            rows = [json.loads(line) for line in f if line.strip()]
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not one JSON object per line ({e}).") from None
    train = [r for r in rows if "loss" in r and r.get("tokens") is not None]
    if not train:
        raise UserError(f"{path} holds no training rows yet.")
    per_step = train[-1]["tokens"] / train[-1]["step"]  # tokens per step, for the val rows (they log only the step)
    val = [(r["step"] * per_step, r["val_loss"]) for r in rows if "val_loss" in r]
    return train, val


def moving_average(values, n):
    """Centred: point i is the mean of the values within n // 2 logged steps either side (fewer at the ends). A
    trailing mean would plot each value n / 2 steps late, and on a falling loss sit above the val loss measured at
    the same step."""
    sums, h = [0.0, *itertools.accumulate(values)], n // 2
    return [(sums[min(len(values), i + h + 1)] - sums[max(0, i - h)]) / (min(len(values), i + h + 1) - max(0, i - h))
            for i in range(len(values))]


def plot(runs, png, title="", smooth=20):
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("tools/plot.py draws with matplotlib, which is not installed.\nHINT: .venv/bin/pip install "
                        "matplotlib") from None
    data = {run: read_run(run) for run in runs}
    fig, (ax, ax_speed) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=[3, 1])
    for i, (run, (train, val)) in enumerate(data.items()):
        color, name = f"C{i}", os.path.basename(os.path.normpath(run))
        tokens, losses = [r["tokens"] for r in train], [r["loss"] for r in train]
        ax.plot(tokens, losses, color=color, alpha=0.3, linewidth=0.8)
        if smooth > 1 and len(losses) > smooth:
            ax.plot(tokens, moving_average(losses, smooth), color=color, linewidth=1.5, label=f"{name} train")
        else:
            ax.lines[-1].set(alpha=1.0, label=f"{name} train")
        if val:
            ax.plot(*zip(*val), "o--", color=color, markersize=4, label=f"{name} val")
        speed = [(r["tokens"], r["tokens_per_s"]) for r in train if r.get("tokens_per_s")]
        if speed:
            ax_speed.plot(*zip(*speed), color=color, linewidth=0.8)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title or "training loss against tokens seen")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_speed.set_ylabel("tokens/s")
    ax_speed.set_xlabel("tokens")
    ax_speed.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    print(f"{png}: {len(runs)} run(s)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="training runs' --out directories (or metrics.jsonl files)")
    p.add_argument("--png", required=True, help="the image to write")
    p.add_argument("--title", default="")
    p.add_argument("--smooth", type=int, default=20, help="moving average over this many logged steps (1: none)")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error("--smooth must be at least 1")
    run_or_abort(lambda: plot(args.runs, args.png, args.title, args.smooth))


if __name__ == "__main__":
    main()
