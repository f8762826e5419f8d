"""Generate text from a checkpoint.

    python sample.py --out out/tiny --prompt "话说天下大势" [--max-new-tokens 200] [--temperature 0.8] [--top-k 50]

Loads the newest checkpoint in --out (or --ckpt PATH) and the tokenizer that train.py copied beside it.
"""
import argparse
import os
import sys
from dataclasses import replace

import torch

from tokenizer import load_tokenizer
from errors import UserError
from model import Yuan
from checkpoint import config_of, consolidated, load_checkpoint


def sample(args):
    if args.ckpt:
        ckpt, where = load_checkpoint(args.ckpt), args.ckpt
        if ckpt["layout"]["tp"] > 1:
            raise UserError(f"{args.ckpt} is one of {ckpt['layout']['tp']} tensor-parallel shards.\nHINT: pass "
                            f"--out DIR (and --step N): every shard is then merged.")
    else:
        ckpt, where = consolidated(args.out, args.step)  # any tensor-parallel layout, merged
    path = args.ckpt or os.path.join(args.out, "ckpt")
    tok_info = ckpt["tokenizer"]
    spec = os.path.join(os.path.dirname(path), "tokenizer.tiktoken")
    enc, tok = load_tokenizer(spec if os.path.exists(spec) else tok_info["name"])
    if tok["hash"] != tok_info["hash"]:
        raise UserError(f"{spec} is not the tokenizer {path} was trained with (hash differs).")
    cfg = replace(config_of(ckpt), dropout=0.0)
    model = Yuan(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    torch.manual_seed(args.seed)
    prompt = enc.encode_ordinary(args.prompt.replace("<n>", "\n")) or [tok["eot"]]
    idx = torch.tensor([prompt] * args.num_samples)  # [B, T0]
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, stop_token=tok["eot"])
    print(f"# {where} (step {ckpt['step']}), prompt {args.prompt!r}")
    for row in out.tolist():
        text = enc.decode([t for t in row if t < enc.n_vocab and t != tok["eot"]], errors="replace")
        print("---\n" + text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="the training run's output directory")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest in --out)")
    p.add_argument("--ckpt", help="a specific tp = 1 checkpoint file")
    p.add_argument("--prompt", default="", help="text to continue; <n> is a newline")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("max_new_tokens", "num_samples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (args.out or args.ckpt):
        p.error("--out (a run's directory) or --ckpt (a checkpoint file) is required")
    if args.temperature < 0 or args.top_k < 0:
        p.error("--temperature and --top-k must be at least 0 (0 means greedy / all tokens)")
    try:
        sample(args)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
