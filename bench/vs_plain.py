"""Is nanoyuan's training step as fast as plain PyTorch? The same model (learned positions, pre-LayerNorm, GELU,
biases, tied head) written the obvious way with nn.Linear and F.cross_entropy, and the same step (forward, backward,
clip to 1.0, AdamW), timed side by side in one process against step.build + step.train_step at tp = dp = 1.
The two alternate step by step, so that both see the same machine state. Run by hand; results in bench/RESULTS.md.

    python bench/vs_plain.py [--preset small] [--seq_len 256] [--micro_batch 4] [--steps 5] [--dtype fp32]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from run.config import make_config  # noqa: E402
from distributed import Dist  # noqa: E402
from mixed_precision import LossScaler  # noqa: E402
from step import DTYPES, build, resolve_dtype, train_step  # noqa: E402


class PlainBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h = cfg.n_embd
        self.n_head = cfg.n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(h, eps=cfg.layernorm_eps), nn.LayerNorm(h, eps=cfg.layernorm_eps)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        self.fc, self.fc_proj = nn.Linear(h, cfg.ffn_hidden), nn.Linear(cfg.ffn_hidden, h)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # [B, nh, T, hd]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.fc_proj(F.gelu(self.fc(self.ln_2(x))))


class PlainGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, cfg.n_embd), nn.Embedding(cfg.seq_len, cfg.n_embd)
        self.blocks = nn.ModuleList(PlainBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layernorm_eps)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=cfg.init_std)
            elif "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def plain_step(model, opt, x, y, autocast):
    with autocast:
        loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--micro_batch", type=int, default=4)
    p.add_argument("--n_layer", type=int, default=0, help="fewer layers than the preset (0: the preset's)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each, after one warm-up step of each")
    p.add_argument("--json", default="", help="also write the figures to this file, one JSON object")
    args = p.parse_args()
    extra = {"n_layer": args.n_layer} if args.n_layer else {}
    cfg = make_config(args.preset, seq_len=args.seq_len, micro_batch=args.micro_batch, dtype=args.dtype,
                      batch_tokens=args.seq_len * args.micro_batch, **extra)
    dist = Dist(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"), overlap=cfg.overlap)
    resolve_dtype(cfg, dist.device)
    dtype = DTYPES[cfg.dtype]
    # the plain model as plain PyTorch code runs it: fp32 weights under autocast (ours holds bf16 working weights)
    autocast = torch.autocast(dist.device.type, dtype=dtype, enabled=cfg.dtype != "fp32")

    ours, opt, reducer, clip_params = build(cfg, dist)
    scaler = LossScaler(enabled=cfg.dtype == "fp16")
    torch.manual_seed(cfg.seed)
    plain = PlainGPT(cfg).to(dist.device)
    decay = [p for p in plain.parameters() if p.dim() >= 2]
    plain_opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in plain.parameters() if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=opt.defaults.get("fused") or None)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("nanoyuan", ours), ("plain", plain))}
    assert params["nanoyuan"] == params["plain"], params  # the same network, or the race means nothing

    ids = torch.randint(0, cfg.vocab_size, (cfg.micro_batch, cfg.seq_len + 1)).to(dist.device)
    x, y = ids[:, :-1], ids[:, 1:]
    sync = torch.cuda.synchronize if dist.device.type == "cuda" else (lambda: None)
    times = {"nanoyuan": [], "plain": []}
    for i in range(args.steps + 1):
        for name in times:
            sync()
            t0 = time.perf_counter()
            if name == "nanoyuan":
                loss, _, _ = train_step(ours, opt, reducer, scaler, clip_params, 1, cfg, dist,
                                        lambda micro: (x, y))
            else:
                loss = plain_step(plain, plain_opt, x, y, autocast)
            loss.item()
            if i:  # the first step of each warms up
                times[name].append(time.perf_counter() - t0)
    tokens = cfg.micro_batch * cfg.seq_len
    rate = {name: tokens / statistics.median(t) for name, t in times.items()}
    device = torch.cuda.get_device_name() if dist.device.type == "cuda" else \
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"{args.preset} ({params['nanoyuan']:,} params, the plain model {params['plain']:,}), "
          f"{cfg.micro_batch} x {cfg.seq_len} tokens per step, {cfg.dtype}, {device}, torch {torch.__version__}, "
          f"median of {args.steps} steps")
    for name, r in rate.items():
        print(f"  {name:<9} {r:>10,.1f} tokens/s   {tokens / r:.3f} s/step")
    print(f"  nanoyuan / plain = {rate['nanoyuan'] / rate['plain']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"params": params, "tokens_per_s": rate, "steps": args.steps, "dtype": cfg.dtype}, f)


if __name__ == "__main__":
    main()
