"""Draw the walkthrough's figures of the parallel layouts, labelled with the shapes each rank really holds: the model
is built on the meta device (nothing allocated) once per rank, and every label reads a parameter's shape.

    python docs/figures.py [--preset yuan-4.7b] [--tp 4] [--dp 2] [--mlp_tp 2] [--out docs]

Writes tp_mlp.png, vocab_parallel.png, sequence_parallel.png and zero1.png (a few tens of kB each).
"""
import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from distributed import Dist  # noqa: E402
from model import Yuan  # noqa: E402
from run.config import make_config  # noqa: E402

COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7"]


def shapes(cfg, tp):
    """{rank: {parameter name: shape}} of every tensor-parallel rank, from the model on the meta device."""
    out = {}
    for rank in range(tp):
        with torch.device("meta"):
            model = Yuan(replace(cfg, tp=tp), Dist(tp=tp, tp_rank=rank))
        out[rank] = {name: tuple(p.shape) for name, p in model.named_parameters()}
    return out


def box(ax, x, y, w, h, text, color, alpha=0.85, size=8):
    ax.add_patch(plt.Rectangle((x, y), w, h, facecolor=color, edgecolor="black", linewidth=0.6, alpha=alpha))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size)


def arrow(ax, x0, y0, x1, y1, text="", color="black"):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", color=color, lw=1.0))
    if text:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, text, ha="center", fontsize=7, color=color)


def rank_rows(ax, n, label, top):
    """(y, colour) of each rank's row, top to bottom, with its label at the left."""
    for r in range(n):
        y = top + (n - 1 - r) * 1.3
        ax.text(0.1, y + 0.45, f"{label} {r}", fontsize=8, weight="bold")
        yield r, y, COLORS[r % len(COLORS)]


def canvas(width, height, title):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    return fig, ax


def tp_mlp(cfg, tp, sh, path):
    """The MLP at tp ranks: f, column-parallel fc, GELU, row-parallel proj, g."""
    fc, proj = sh[0]["blocks.0.mlp.fc.weight"], sh[0]["blocks.0.mlp.proj.weight"]
    fig, ax = canvas(12, 1.3 * tp + 1.2, f"MLP of one block at tp = {tp} (the attention is split the same way, by "
                                         f"heads): f, column-parallel, GELU, row-parallel, g")
    for r, y, c in rank_rows(ax, tp, "rank", 0.4):
        box(ax, 0.9, y, 1.5, 0.9, f"x [B, T, {cfg.n_embd}]\n(same on all)", "#dddddd")
        arrow(ax, 2.4, y + 0.45, 3.1, y + 0.45, "f")
        box(ax, 3.1, y, 2.0, 0.9, f"fc.weight {list(fc)}\nrows {r * fc[0]}..{(r + 1) * fc[0] - 1}", c)
        arrow(ax, 5.1, y + 0.45, 5.7, y + 0.45)
        box(ax, 5.7, y, 1.6, 0.9, f"GELU\n[B, T, {fc[0]}]", c, alpha=0.45)
        arrow(ax, 7.3, y + 0.45, 7.9, y + 0.45)
        box(ax, 7.9, y, 2.0, 0.9, f"proj.weight {list(proj)}\npartial sum [B, T, {proj[0]}]", c)
        arrow(ax, 9.9, y + 0.45, 10.5, y + 0.45, "g")
        box(ax, 10.5, y, 1.3, 0.9, f"y [B, T, {cfg.n_embd}]\n(same on all)", "#dddddd")
    ax.text(6, 0.05, "f: forward identity, backward all-reduce of dL/dx.   g: forward all-reduce (sum of the partial "
                     "products), backward identity.   No communication between the two matmuls.", ha="center",
            fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def vocab_parallel(cfg, tp, sh, path):
    """The embedding split by vocabulary rows, the tied head, and the cross-entropy that never gathers logits."""
    V, C = cfg.vocab_size, cfg.n_embd
    rows = sh[0]["wte.weight"][0]
    fig, ax = canvas(12, 1.3 * tp + 1.4, f"Vocabulary-parallel embedding, tied head and cross-entropy at tp = {tp} "
                                         f"(vocabulary {V:,} = {tp} x {rows:,} rows)")
    for r, y, c in rank_rows(ax, tp, "rank", 0.6):
        box(ax, 0.9, y, 2.6, 0.9, f"wte rows {r * rows:,}..{(r + 1) * rows - 1:,}\n[{rows:,}, {C}]", c)
        arrow(ax, 3.5, y + 0.45, 4.2, y + 0.45, "look up own ids")
        box(ax, 4.2, y, 1.9, 0.9, "embeddings of own ids,\nzeros elsewhere", c, alpha=0.45)
        arrow(ax, 6.1, y + 0.45, 6.7, y + 0.45, "g")
        box(ax, 6.7, y, 1.8, 0.9, f"head: x @ wte^T\nlogits [B, T, {rows:,}]", c)
        arrow(ax, 8.5, y + 0.45, 9.1, y + 0.45)
        box(ax, 9.1, y, 2.7, 0.9, "local max, sum of exp,\ntarget logit if own", c, alpha=0.45)
    ax.text(6, 0.1, f"Three all-reduces of [B, T] numbers (max, sum of exp, target logit) give the loss over all {V:,} "
                    f"entries; the [B, T, {V:,}] logits never exist on one rank.", ha="center", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def sequence_parallel(cfg, tp, path):
    """Activations split along the sequence between the tensor-parallel regions."""
    T, C = cfg.seq_len, cfg.n_embd
    fig, ax = canvas(12, 1.3 * tp + 1.4, f"Sequence parallelism at tp = {tp}: LayerNorm, dropout and the residual "
                                         f"hold T / tp = {T // tp} of the {T} positions")
    for r, y, c in rank_rows(ax, tp, "rank", 0.6):
        box(ax, 0.9, y, 2.2, 0.9, f"LayerNorm on positions\n{r * T // tp}..{(r + 1) * T // tp - 1}  "
                                  f"[B, {T // tp}, {C}]", c, alpha=0.45)
        arrow(ax, 3.1, y + 0.45, 4.3, y + 0.45, "all-gather (T)")
        box(ax, 4.3, y, 2.6, 0.9, f"column- then row-parallel\nmatmuls on [B, {T}, {C}]", c)
        arrow(ax, 6.9, y + 0.45, 8.3, y + 0.45, "reduce-scatter (T)")
        box(ax, 8.3, y, 2.4, 0.9, f"dropout + residual on\npositions {r * T // tp}..{(r + 1) * T // tp - 1}", c,
            alpha=0.45)
    ax.text(6, 0.1, "f becomes an all-gather along T (backward: reduce-scatter), g a reduce-scatter (backward: "
                    "all-gather): the bytes of the all-reduce they replace; activations outside the matmuls / tp.",
            ha="center", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def zero1(cfg, tp, dp, sh, path):
    """Gradient buckets all-reduced during backward; ZeRO-1's reduce-scatter, AdamW on a slice, all-gather."""
    n = sum(torch.Size(s).numel() for s in sh[0].values())
    fig, ax = canvas(12, 1.3 * dp + 2.2, f"Data parallelism at dp = {dp} (each of the {tp} tensor-parallel ranks "
                                         f"holds {n:,} parameters): ZeRO-1")
    for d, y, c in rank_rows(ax, dp, "dp rank", 1.4):
        for b in range(4):  # buckets, last layers first: their gradients are ready first in backward
            box(ax, 1.0 + b * 0.9, y, 0.85, 0.9, f"bucket {b}\n(grad)", c, alpha=0.35 + 0.15 * b)
        arrow(ax, 4.6, y + 0.45, 5.8, y + 0.45, "reduce-scatter")
        for s in range(dp):
            box(ax, 5.8 + s * 0.8, y, 0.75, 0.9, f"slice {s}" + ("\nmine" if s == d else ""), c,
                alpha=0.9 if s == d else 0.15)
        x = 5.8 + dp * 0.8
        arrow(ax, x, y + 0.45, x + 1.0, y + 0.45, "AdamW")
        box(ax, x + 1.0, y, 1.4, 0.9, f"moments of\n1/{dp} only", c)
        arrow(ax, x + 2.4, y + 0.45, x + 3.4, y + 0.45, "all-gather")
        box(ax, x + 3.4, y, 1.2, 0.9, "full weights\nagain", "#dddddd")
    ax.text(6, 0.75, "Plain data parallelism all-reduces each bucket as soon as the last micro-batch's backward has "
                     "produced all of its gradients (overlapped with the rest of the backward).", ha="center",
            fontsize=8)
    ax.text(6, 0.35, f"ZeRO-1 reduce-scatters instead, so each rank keeps the AdamW state (8 bytes a parameter) of "
                     f"1/{dp} of them, then all-gathers the updated slices.", ha="center", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="yuan-4.7b")
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--mlp_tp", type=int, default=2, help="tp of the MLP figure (default 2: at yuan-4.7b's tp 4 the "
                   "FFN slice, 12288 / 4, equals the hidden size, 3072, and the figure could not show which is split)")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    cfg = make_config(args.preset)
    sh = shapes(cfg, args.tp)
    os.makedirs(args.out, exist_ok=True)
    tp_mlp(cfg, args.mlp_tp, shapes(cfg, args.mlp_tp), os.path.join(args.out, "tp_mlp.png"))
    vocab_parallel(cfg, args.tp, sh, os.path.join(args.out, "vocab_parallel.png"))
    sequence_parallel(cfg, args.tp, os.path.join(args.out, "sequence_parallel.png"))
    zero1(cfg, args.tp, args.dp, sh, os.path.join(args.out, "zero1.png"))
    print(f"{args.out}: tp_mlp.png (tp {args.mlp_tp}), vocab_parallel.png, sequence_parallel.png, zero1.png "
          f"({args.preset}, tp {args.tp}, dp {args.dp})")


if __name__ == "__main__":
    main()
