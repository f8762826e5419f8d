"""The Yuan 1.0 transformer: a Megatron-style GPT, written to be read top to bottom.

Yuan 1.0 (Wu et al. 2021, arXiv:2110.04725) uses the Megatron-LM GPT architecture:
learned absolute position embeddings, pre-LayerNorm blocks, a final LayerNorm, a GELU MLP, biases everywhere,
and an LM head tied to the word embedding. The ASC22 model is the `yuan-4.7b` preset (MODELS below).

Each piece that tensor parallelism will later shard is its own named module: the fused QKV projection
(`attn.qkv`), the attention output projection (`attn.proj`), MLP up (`mlp.fc`), MLP down (`mlp.proj`) and the
word embedding (`wte`, also the LM head). `python model.py` prints the presets with exact parameter counts.
"""
import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import Dist
from runtime.errors import UserError
from parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, column_parallel_matmul,
                      full_normal, vocab_parallel_cross_entropy)
from recompute import recomputed


@dataclass
class ModelConfig:
    """The network: exactly the fields that rebuild it (a checkpoint, sample.py and export.py carry these). The run's
    fields (schedule, precision, process layout) are run/config.py's TrainConfig."""
    n_layer: int = 2  # transformer blocks
    n_head: int = 4  # attention heads
    n_embd: int = 128  # hidden size h
    ffn_hidden: int = 0  # MLP inner size; 0 means 4 * n_embd
    seq_len: int = 128  # context length T (learned position embeddings)
    vocab_size: int = 0  # padded vocabulary; 0 means: taken from the data's tokenizer, padded to 128
    dropout: float = 0.0  # dropout on attention probabilities and residual branches
    layernorm_eps: float = 1e-5  # LayerNorm epsilon
    init_std: float = 0.02  # N(0, init_std) init; output projections get init_std / sqrt(2 * n_layer)

    def __post_init__(self):
        if self.ffn_hidden == 0:
            self.ffn_hidden = 4 * self.n_embd
        for name in ("n_layer", "n_head", "n_embd", "seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} = {getattr(self, name)} must be at least 1.")
        for name in ("init_std", "layernorm_eps"):
            if not math.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise UserError(f"{name} = {getattr(self, name)} must be a finite number, at least 0.")
        if self.n_embd % self.n_head:
            raise UserError(f"n_embd = {self.n_embd} is not divisible by n_head = {self.n_head}.\n"
                            f"HINT: pick n_head among the divisors of {self.n_embd}, or change n_embd.")
        if self.vocab_size % 128:
            raise UserError(f"vocab_size = {self.vocab_size} is not a multiple of 128.\n"
                            f"HINT: use {pad_vocab(self.vocab_size)} (padding rows are never produced by the data).")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout = {self.dropout} must be in [0, 1).")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


# The presets' networks; how each is trained is run/config.py's RECIPES. vocab_size 0 = from the data; the counts in
# the comments use the vocabulary given here.
MODELS = {
    # init_std 0.04, not 0.02: at width 192 one Adam step at lr ~1.3e-3 moved block 0's attention so far that the
    # loss jumped 2.3 nats at step 34 of the demo (issue 28, bench/RESULTS.md)
    "tiny": dict(n_layer=4, n_head=6, n_embd=192, seq_len=128, vocab_size=4096, init_std=0.04),  # 2,590,848 params
    "small": dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024, vocab_size=50304),  # 124,475,904 params
    "1.3b": dict(n_layer=24, n_head=16, n_embd=2048, seq_len=2048, vocab_size=53248),  # 1,321,848,832 params
    # ASC22: 40 layers, hidden 3072, 24 heads, FFN 12288, sequence 2048, Yuan's 53,228 tokens padded to 53,248;
    # --init-method-std 0.002 as Yuan's published recipe (Shawn-IEITSystems/Yuan-1.0, src/pretrain_yuan_13B.sh)
    "yuan-4.7b": dict(n_layer=40, n_head=24, n_embd=3072, ffn_hidden=12288, seq_len=2048, vocab_size=53248,
                      init_std=0.002),  # 4,701,321,216 params
}


def pad_vocab(n, multiple=128):
    """Round a tokenizer's vocabulary up to a multiple of 128 (Megatron pads so the matmul tiles evenly)."""
    return -(-n // multiple) * multiple


def count_params(cfg):
    """Exact parameter count from the formulas (checked against sum(p.numel()) in tests/test_model.py)."""
    h, f, L, V, T = cfg.n_embd, cfg.ffn_hidden, cfg.n_layer, cfg.vocab_size, cfg.seq_len
    per_layer = (2 * h) + (3 * h * h + 3 * h) + (h * h + h) + (2 * h) + (h * f + f) + (f * h + h)
    return V * h + T * h + L * per_layer + 2 * h  # embeddings (head is tied) + blocks + final LayerNorm


def flops_per_token(cfg):
    """Training FLOPs per token: 6 per matmul weight (forward 2, backward 4) plus attention scores and values,
    12 * L * h * T (Narayanan et al. 2021, eq. 3 without the recompute term). N_matmul includes the LM head."""
    h, f, L = cfg.n_embd, cfg.ffn_hidden, cfg.n_layer
    n_matmul = L * (4 * h * h + 2 * h * f) + cfg.vocab_size * h
    return 6 * n_matmul + 12 * L * h * cfg.seq_len


class Dropout(nn.Dropout):
    """Dropout on the residual stream. Without sequence parallelism every rank of a tp group holds the same
    activations and must drop the same entries: the global generator, seeded alike on every rank. Under sequence
    parallelism each rank holds its own tokens, so masks come from the rank's own generator (dist.rng.fork())."""

    def __init__(self, p, dist):
        super().__init__(p)
        self.dist = dist

    def forward(self, x):
        if not self.dist.sequence_parallel or not self.training or self.p == 0:
            return super().forward(x)
        with self.dist.rng.fork():
            return super().forward(x)


class Attention(nn.Module):
    """Causal self-attention. Under tensor parallelism each rank owns n_head / tp whole heads: the QKV projection is
    column-split (its output columns are grouped per head), the output projection row-split."""

    def __init__(self, cfg, dist, recompute):
        super().__init__()
        self.local_heads = dist.split(cfg.n_head, "n_head")  # this rank's heads: n_head / tp
        self.head_dim, self.dropout, self.dist = cfg.head_dim, cfg.dropout, dist
        self.recompute = recompute == "selective"
        # fused Q, K, V of this rank's heads; the output projection, its partial sums reduced
        self.qkv = ColumnParallelLinear(cfg.n_embd, 3 * cfg.n_embd, dist)
        self.proj = RowParallelLinear(cfg.n_embd, cfg.n_embd, dist)
        self.resid_drop = Dropout(cfg.dropout, dist)

    def core(self, qkv):
        """softmax(q k^T / sqrt(hd)) v over this rank's heads: [B, T, 3C/tp] -> [B, T, C/tp]. No weights, so
        recomputing it (--recompute selective) costs no matmul with parameters."""
        B, T, _ = qkv.shape
        # Per head the layout is [q | k | v] so that a tensor-parallel shard of whole heads is a contiguous slice.
        qkv = qkv.view(B, T, self.local_heads, 3 * self.head_dim).transpose(1, 2)  # [B, nh/tp, T, 3hd]
        q, k, v = qkv.split(self.head_dim, dim=-1)  # 3 x [B, nh/tp, T, hd]
        with self.dist.rng.fork():  # dropout on this rank's own heads draws from this rank's own generator
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)  # [B, nh/tp, T, hd]
        return y.transpose(1, 2).reshape(B, T, self.local_heads * self.head_dim)  # [B, T, C/tp]

    def cached_core(self, qkv, cache):
        """Generation's core (one process): the new tokens' queries over the cached keys and values and their own.
        cache: this layer's {"k", "v": [B, nh, seq_len, hd], "n": tokens held}, extended in place."""
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, self.local_heads, 3 * self.head_dim).transpose(1, 2).split(self.head_dim, dim=-1)
        n = cache["n"]
        if T > 1 and n:  # is_causal below aligns the mask top-left, right only when the cache starts empty
            raise ValueError("feed several tokens only into an empty cache, then one at a time")
        cache["k"][:, :, n:n + T], cache["v"][:, :, n:n + T] = k, v
        cache["n"] = n + T
        y = F.scaled_dot_product_attention(q, cache["k"][:, :, :n + T], cache["v"][:, :, :n + T], is_causal=T > 1)
        return y.transpose(1, 2).reshape(B, T, self.local_heads * self.head_dim)  # [B, T, C]

    def forward(self, x, cache=None):
        qkv = self.qkv(x)  # [B, T, C] (sequence parallel: [B, T/tp, C], gathered inside) -> [B, T, 3C/tp]
        if cache is not None:
            y = self.cached_core(qkv, cache)
        else:
            y = recomputed(self.core, self.dist, qkv) if self.recompute and self.training else self.core(qkv)
        return self.resid_drop(self.proj(y))  # [B, T, C] replicated (sequence parallel: [B, T/tp, C])


class MLP(nn.Module):
    def __init__(self, cfg, dist):
        super().__init__()
        self.fc = ColumnParallelLinear(cfg.n_embd, cfg.ffn_hidden, dist)  # up
        self.proj = RowParallelLinear(cfg.ffn_hidden, cfg.n_embd, dist)  # down
        self.drop = Dropout(cfg.dropout, dist)

    def forward(self, x):  # [B, T, C] -> [B, T, F/tp] -> [B, T, C]  (sequence parallel: T/tp outside)
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg, dist, recompute):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layernorm_eps)
        self.attn = Attention(cfg, dist, recompute)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layernorm_eps)
        self.mlp = MLP(cfg, dist)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class Yuan(nn.Module):
    """cfg: the ModelConfig. How the network is laid out on the processes, which changes no result: dist (the
    tensor-parallel group that splits every layer, with or without sequence parallelism and --overlap) and
    recompute (none | selective | full); seed draws the initial weights."""

    def __init__(self, cfg, dist=None, recompute="none", seed=1234):
        super().__init__()
        if cfg.vocab_size < 1:
            raise UserError("vocab_size is not set: pass --vocab_size N or let train.py take it from the data.")
        self.cfg, self.dist, self.recompute = cfg, dist or Dist(), recompute
        self.wte = VocabParallelEmbedding(cfg.vocab_size, cfg.n_embd, self.dist)  # also the LM head (tied)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.n_embd)  # learned absolute positions (replicated)
        self.drop = Dropout(cfg.dropout, self.dist)
        self.blocks = nn.ModuleList(Block(cfg, self.dist, recompute) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layernorm_eps)
        self.init_weights(seed)
        if self.dist.sequence_parallel:  # a replicated parameter sees only this rank's tokens: its gradient is summed
            for p in self.parameters():  # over tp (parallel.sync_sequence_parallel_grads, called by the reducers)
                p.sequence_parallel = not getattr(p, "tp_sharded", False)

    @torch.no_grad()
    def init_weights(self, seed):
        """Megatron's init: weights ~ N(0, 0.02), the two residual-output projections scaled by 1/sqrt(2L)
        (GPT-2 paper, section 2.3), biases zero, LayerNorm gain one. Every matrix is drawn whole from a generator
        seeded by (seed, its name) and then sliced, so the model at any tensor-parallel size starts identical."""
        out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)
        for name, m in self.named_modules():
            drawn = seed * 1_000_003 + zlib.crc32(name.encode())
            if isinstance(m, (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)):
                m.reset_parameters(out_std if name.endswith("proj") else self.cfg.init_std, drawn)
            elif isinstance(m, nn.Embedding) and not m.weight.is_meta:
                m.weight.copy_(full_normal(m.weight.shape, self.cfg.init_std, drawn))
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets=None, cache=None):
        """idx [B, T] token ids. Returns logits [B, T, V/tp] (this rank's vocabulary slice) and, with targets
        [B, T], the mean cross-entropy over the whole vocabulary. cache (generation, one process: new_cache()):
        idx continues the tokens the cache holds, and their keys and values are added to it."""
        B, T = idx.shape
        past = cache[0]["n"] if cache is not None else 0
        if past + T > self.cfg.seq_len:
            raise UserError(f"sequence of {past + T} tokens is longer than seq_len = {self.cfg.seq_len}.")
        pos = torch.arange(past, past + T, device=idx.device)
        if self.dist.sequence_parallel:  # the residual stream holds this rank's slice of the sequence up to the head
            if T % self.dist.tp:
                raise UserError(f"sequence parallelism needs sequences divisible by tp = {self.dist.tp}, got {T}.")
            pos = pos.chunk(self.dist.tp)[self.dist.tp_rank]
        x = self.drop(self.wte(idx) + self.wpe(pos))  # [B, T, C]
        for i, block in enumerate(self.blocks):  # --recompute full keeps each block's input, reruns it in backward
            if cache is not None:
                x = block(x, cache[i])
            else:
                x = recomputed(block, self.dist, x) if self.recompute == "full" and self.training else block(x)
        x = self.ln_f(x)
        # the tied head: [B, T, V/tp]
        logits = column_parallel_matmul(x, self.wte.weight, None, self.dist)
        if targets is None:
            return logits, None
        loss = vocab_parallel_cross_entropy(logits.view(B * T, -1), targets.reshape(-1), self.dist, self.wte.start)
        return logits, loss

    def new_cache(self, batch):
        """Empty keys and values for generation, one dict per layer: {"k", "v": [B, nh, seq_len, hd], "n": 0}."""
        if self.dist.tp > 1:
            raise UserError("generation runs in one process (tp = 1); sample.py merges tensor-parallel shards.")
        w = self.wpe.weight
        shape = (batch, self.cfg.n_head, self.cfg.seq_len, self.cfg.head_dim)
        return [{"k": w.new_empty(shape), "v": w.new_empty(shape), "n": 0} for _ in self.blocks]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, stop_token=None, generator=None,
                 use_cache=True):
        """Continue idx [B, T0] by up to max_new_tokens, returning [B, T0 + new]. temperature 0 is greedy; top_k
        keeps the k likeliest tokens, top_p the smallest set whose probability reaches p. A row that produced
        stop_token continues with it; generation ends when every row has. With the KV cache each new token costs
        one token's forward; the context holds seq_len tokens (learned absolute positions), and when it is full the
        cache starts again from the last seq_len / 2. use_cache=False recomputes the last seq_len tokens for
        every new one (the reference the cache is tested against)."""
        T, B = self.cfg.seq_len, idx.size(0)
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -T:])[0]
            elif cache is None or cache[0]["n"] == T:  # start (or start again): the prompt's last tokens at once
                cache = self.new_cache(B) if cache is None else cache
                for layer in cache:
                    layer["n"] = 0
                logits = self(idx[:, -(T // 2 if idx.size(1) >= T else T):], cache=cache)[0]
            else:
                logits = self(idx[:, -1:], cache=cache)[0]  # [B, 1, V]
            nxt = next_token(logits[:, -1, :].float(), temperature, top_k, top_p, generator)  # [B, 1]
            if stop_token is not None:
                nxt = nxt.masked_fill(done[:, None], stop_token)
                done |= nxt[:, 0] == stop_token
            idx = torch.cat([idx, nxt], dim=1)
            if bool(done.all()):
                break
        return idx


def next_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """Pick one token per row from logits [B, V] -> [B, 1]."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:  # nucleus: drop the tokens after the smallest prefix of the sorted distribution reaching top_p
        probs, order = torch.sort(F.softmax(logits, dim=-1), dim=-1, descending=True)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a token already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)

if __name__ == "__main__":
    print(f"{'preset':<10} {'layers':>6} {'hidden':>6} {'heads':>5} {'ffn':>6} {'seq':>5} {'vocab':>6} "
          f"{'parameters':>15} {'GFLOP/token':>11}")
    for name in MODELS:
        cfg = ModelConfig(**MODELS[name])
        with torch.device("meta"):  # shapes only: the 4.7B model allocates nothing
            n = sum(p.numel() for p in Yuan(cfg).parameters())
        assert n == count_params(cfg), (name, n, count_params(cfg))
        print(f"{name:<10} {cfg.n_layer:>6} {cfg.n_embd:>6} {cfg.n_head:>5} {cfg.ffn_hidden:>6} {cfg.seq_len:>5} "
              f"{cfg.vocab_size:>6} {n:>15,} {flops_per_token(cfg) / 1e9:>11.2f}")
