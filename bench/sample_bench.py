"""How much faster is generation with the KV cache? One model (random weights: the speed does not depend on them),
one prompt, greedy decoding, timed with the cache and recomputing the whole context for every token (the loop
sample.py had before), in one process. Both produce the same tokens (checked). Run by hand; results in
bench/RESULTS.md.

    python bench/sample_bench.py [--preset small] [--context 512] [--new 32] [--batch 1] [--threads N]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402

from model import Yuan  # noqa: E402
from run.config import make_config  # noqa: E402


def timed(model, prompt, new, use_cache):
    t0 = time.perf_counter()
    out = model.generate(prompt, new, temperature=0, use_cache=use_cache)
    return out, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--n_layer", type=int, help="override the preset's layer count (a quick run)")
    p.add_argument("--context", type=int, default=512, help="tokens of context when the last token is made")
    p.add_argument("--new", type=int, default=32, help="tokens to generate")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args.preset, **({"n_layer": args.n_layer} if args.n_layer else {}))
    if not 0 < args.new < args.context <= cfg.seq_len:
        p.error(f"need 0 < --new < --context <= seq_len ({cfg.seq_len})")
    torch.manual_seed(0)
    model = Yuan(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.context - args.new))
    timed(model, prompt[:, :8], 2, True)  # warm-up
    cached, t_cache = timed(model, prompt, args.new, True)
    plain, t_plain = timed(model, prompt, args.new, False)
    same = cached.equal(plain)
    tokens = args.new * args.batch
    print(f"{args.preset} ({cfg.n_layer} layers), prompt {prompt.size(1)} + {args.new} new tokens, batch {args.batch}, "
          f"{torch.get_num_threads()} threads")
    print(f"KV cache      {t_cache:8.2f} s  {tokens / t_cache:8.1f} tokens/s (prompt's forward included)")
    print(f"recompute     {t_plain:8.2f} s  {tokens / t_plain:8.1f} tokens/s")
    print(f"speed-up {t_plain / t_cache:.1f} x; same tokens: {same}")


if __name__ == "__main__":
    main()
