"""Generate text from a checkpoint.

    python sample.py --out out/tiny --prompt "话说天下大势" [--max-new-tokens 200] [--temperature 0.8] [--top-k 50]
    python sample.py --out out/tiny --prompt-file prompt.txt --top-p 0.9 --seed 7 --num-samples 4
    echo "却说曹操" | python sample.py --out out/tiny --prompt-file -

Loads the newest complete checkpoint in --out (or --step N, or --ckpt PATH), whatever tensor-parallel layout wrote it
(the shards are merged), and the tokenizer that train.py copied beside it. Generation uses a KV cache (model.py,
Yuan.generate) and stops a sample at <|endoftext|>. The speed goes to stderr, the text to stdout.
"""
import argparse
import sys
import time

from runtime.errors import require

require("torch")  # a clear hint when run outside .venv
import torch

from run.checkpoint import load_model
from runtime.errors import UserError


def read_prompt(args):
    if args.prompt_file is None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    try:
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None


def sample(args):
    model, enc, tok, step, where = load_model(args.out, args.step, args.ckpt)  # any tensor-parallel layout
    text = read_prompt(args)
    prompt = enc.encode_ordinary(text.replace("<n>", "\n")) or [tok["eot"]]
    idx = torch.tensor([prompt] * args.num_samples)  # [B, T0]
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, stop_token=tok["eot"],
                         generator=gen, use_cache=not args.no_cache)
    seconds = time.perf_counter() - t0
    print(f"# {where} (step {step}), prompt {text[:60]!r}{'...' if len(text) > 60 else ''}")
    new = 0
    for row in out[:, len(prompt):].tolist():
        row = row[:row.index(tok["eot"])] if tok["eot"] in row else row
        new += len(row)
        print("---\n" + enc.decode(prompt + row if args.prompt_file is None else row, errors="replace"))
    print(speed_line(args.num_samples, out.size(1) - len(prompt), new, seconds, args.no_cache), file=sys.stderr,
          flush=True)


def speed_line(samples, steps, printed, seconds, no_cache):
    """stderr's last line: the tokens generated (every sample runs the same number of steps, stopping together) and
    how fast, then how many of them were printed (each sample ends at its first end-of-document token)."""
    total = samples * steps
    kept = (f"all {total:,} printed" if printed == total else
            f"{printed:,} printed: each sample is cut at its first end-of-document token")
    return (f"# {samples} {'samples' if samples > 1 else 'sample'} x {steps} new tokens = {total:,} tokens in "
            f"{seconds:.2f} s, {total / seconds:,.1f} tokens/s "
            f"({'no cache' if no_cache else 'with the KV cache'}); {kept}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the training run's output directory")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest in --out)")
    p.add_argument("--ckpt", help="a specific tp = 1 checkpoint file")
    p.add_argument("--prompt", default="", help="text to continue; <n> is a newline")
    p.add_argument("--prompt-file", help="read the prompt from this file ('-': standard input); prints only the "
                                         "continuation")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: the likeliest tokens up to this mass (1 = all)")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the context for every token (slow; a check)")
    args = p.parse_args(argv)
    for name in ("max_new_tokens", "num_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (args.out or args.ckpt):
        p.error("--out (a run's directory) or --ckpt (a checkpoint file) is required")
    if args.temperature < 0 or args.top_k < 0:
        p.error("--temperature and --top-k must be at least 0 (0 means greedy / all tokens)")
    if not 0 < args.top_p <= 1:
        p.error("--top-p must be in (0, 1]")
    try:
        sample(args)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
