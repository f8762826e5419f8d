"""Generate text from a checkpoint.

    python sample.py --out out/tiny --prompt "话说天下大势" [--max-new-tokens 200] [--temperature 0.8] [--top-k 50]

Loads the newest checkpoint in --out (or --ckpt PATH) and the tokenizer that train.py copied beside it.
"""
import argparse
import os
import sys

import torch

from tokenizer import load_tokenizer
from errors import UserError
from model import Config, Yuan
from run_dir import checkpoints, ckpt_files, load_checkpoint


def sample(args):
    path = args.ckpt or (list(checkpoints(args.out).values()) or [None])[-1]
    if path is None and ckpt_files(args.out):
        raise UserError(f"{args.out} holds only tensor-parallel checkpoint shards (*.tpRofT.pt); sample.py reads "
                        f"tp = 1 checkpoints and does not merge shards yet.")
    if path is None:
        raise UserError(f"no checkpoint (ckpt_*.pt) in {args.out}.\nHINT: train first: python train.py --out "
                        f"{args.out} ...")
    ckpt = load_checkpoint(path)
    tok_info = ckpt["tokenizer"]
    spec = os.path.join(os.path.dirname(path), "tokenizer.tiktoken")
    enc, tok = load_tokenizer(spec if os.path.exists(spec) else tok_info["name"])
    if tok["hash"] != tok_info["hash"]:
        raise UserError(f"{spec} is not the tokenizer {path} was trained with (hash differs).")
    cfg = Config(**{**ckpt["config"], "dropout": 0.0})
    model = Yuan(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    torch.manual_seed(args.seed)
    prompt = enc.encode_ordinary(args.prompt.replace("<n>", "\n")) or [tok["eot"]]
    idx = torch.tensor([prompt] * args.num_samples)  # [B, T0]
    out = model.generate(idx, args.max_new_tokens, args.temperature, args.top_k, stop_token=tok["eot"])
    print(f"# {path} (step {ckpt['step']}), prompt {args.prompt!r}")
    for row in out.tolist():
        text = enc.decode([t for t in row if t < enc.n_vocab and t != tok["eot"]], errors="replace")
        print("---\n" + text)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the training run's output directory")
    p.add_argument("--ckpt", help="a specific checkpoint file (default: the newest in --out)")
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
    if args.temperature < 0 or args.top_k < 0:
        p.error("--temperature and --top-k must be at least 0 (0 means greedy / all tokens)")
    try:
        sample(args)
    except UserError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
