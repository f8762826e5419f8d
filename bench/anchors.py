"""tools/roofline.py held against published measurements of codes whose step is close to ours (issue 20).

    python bench/anchors.py [--json FILE]

Each anchor is a published run: its source, its configuration, and what was measured there (step time or model
FLOP utilization). The same configuration is projected for this code's own step (our model, our kernels: the
comparison is between two codes, and bench/RESULTS.md names what differs). Nothing here feeds back into the
roofline: the terms of tools/roofline.py were fixed from their own sources before these ratios were looked at.

"Priced as there": a second projection of the same step with what the anchor's code did differently and a
published figure prices: the attention kernel of its day (the bars of the FlashAttention-2 figure that
tools/roofline.py's FA2 table comes from, ATTENTION_THEN), communication it overlapped entirely, or a speed-up its
author measured. It explains a ratio; it does not change the roofline.

The model FLOPs of our flops_per_token (6 x matmul weights + 12 L h T per token) are those of Megatron's model-FLOP
count, so a published model-FLOP MFU compares directly; for a step time, the ratio is of times.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tools import roofline  # noqa: E402

# The other bars of the figure FA2 comes from (Dao-AILab/flash-attention assets/flash2_a100_fwd_bwd_benchmark.png,
# commit 4f285b3, "Attention forward + backward speed (A100 80GB SXM4)"): TFLOP/s by sequence length 512 ... 16k, in
# FA2's form. "FlashAttention" is version 1, what torch 2.0-2.1's SDPA ran (torch 2.2's release notes: SDPA "now
# supports FlashAttention-2, yielding around 2x speedups"). "Pytorch" is standard attention, the T x T scores written
# to HBM (out of memory at 16k: the 8k figure repeated there).
ATTENTION_THEN = {
    "FlashAttention": {(64, False): (91, 92, 104, 108, 110, 110), (128, False): (76, 72, 76, 80, 82, 83),
                       (64, True): (58, 70, 77, 87, 92, 97), (128, True): (55, 62, 69, 76, 80, 83)},
    "Pytorch": {(64, False): (36, 40, 43, 45, 46, 46), (128, False): (53, 67, 76, 79, 86, 86),
                (64, True): (15, 16, 17, 18, 18, 18), (128, True): (23, 28, 32, 32, 34, 34)},
}
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, seq_len=1024, vocab_size=50304)
ANCHORS = [
    dict(name="nanoGPT 124M, 8 x A100 40GB",
         source="karpathy/nanoGPT issue #110 (2023-02-02): 'iter 1631: loss 4.0863, time 561.94ms', accepted by the "
                "author; train.py defaults of that day (micro-batch 12 x 1024, 5 micro-batches per GPU, bf16 "
                "autocast, torch.compile, SDPA flash attention, DDP)",
         gpu="A100-40GB", tp=1, dp=8, accum=5, measured_step_s=0.562,
         overrides=dict(GPT2_124M, micro_batch=12, dtype="bf16", compile=True),
         differs="nanoGPT: no biases, vocabulary 50,257 (ours padded to 50,304), bf16 autocast over fp32 weights "
                 "(casts every micro-batch) where we keep bf16 working weights; DDP's bucketed all-reduce as ours; "
                 "torch 2.0 nightly of 2023-02: SDPA's FlashAttention version 1, inductor's first release",
         then=dict(attention="FlashAttention",
                   speedup=(1.25, "its vocabulary padded 50,257 -> 50,304: 'about 25% faster' (nanoGPT commit "
                                  "77e7e04, 2023-02-04, two days later)"))),
    dict(name="build-nanogpt 124M, 1 x A100",
         source="karpathy/build-nanogpt commit 3a148e4 (2024-06-08), train_gpt2.py: micro-batch 16 x 1024, "
                "vocabulary 50,304, bf16 autocast, torch.compile, SDPA flash attention, fused AdamW, one GPU; its "
                "time from the chapter list of the accompanying video ('Let's reproduce GPT-2 (124M)', "
                "youtu.be/l8pRSuU81PU): 'batch size schedule, weight decay, FusedAdamW, 90ms'. The GPU is a Lambda "
                "A100 whose memory size no text we could read states: priced as the 80GB (40GB: 0.091 s)",
         gpu="A100-80GB", tp=1, dp=1, accum=1, measured_step_s=0.090,
         overrides=dict(GPT2_124M, micro_batch=16, dtype="bf16", compile=True),
         differs="build-nanogpt: nanoGPT's model with biases (as ours), bf16 autocast over fp32 weights, torch of "
                 "mid-2024 (SDPA runs FlashAttention-2 since torch 2.2)"),
    *(dict(name=f"Megatron-LM {size} (SC21 Table 1), {gpus} x A100 80GB" + (f" at tp {tp}" if tp > 1 else ""),
           source=f"Narayanan et al. 2021 (SC21), Table 1, the {row} row: {layers} layers, hidden {hidden}, {heads} "
                  f"heads, sequence 2048, vocabulary 51,200, t = {tp}, p = 1, {gpus} GPUs, batch 512: {tflops} TFLOP/s "
                  "per GPU counting the recomputed forward (eq. 3) = 33.5% MFU of model FLOPs (x 0.76); activation "
                  "recomputation on; micro-batch not stated (4 assumed here)",
           gpu="A100-80GB", tp=tp, dp=32, accum=4, measured_mfu=0.335,
           overrides=dict(n_layer=layers, n_head=heads, n_embd=hidden, seq_len=2048, vocab_size=51200, micro_batch=4,
                          dtype="bf16", recompute="full"),
           differs="Megatron 2021: attention without flash (T x T scores in HBM, fused scale+mask+softmax), fused "
                   "bias+GeLU and bias+dropout+add, fp16 with loss scaling, [s, b, h] layout; at tp 2 no sequence "
                   "parallelism; we price flash attention (SDPA) and eager unfused elementwise ops",
           then=dict(attention="Pytorch"))
      for size, row, layers, hidden, heads, tp, gpus, tflops in (("1.7B", "first", 24, 2304, 24, 1, 32, 137),
                                                                 ("3.6B", "second", 30, 3072, 32, 2, 64, 138))),
    dict(name="llm.c GPT-2 124M, 8 x H100",
         source="KellerJordan/modded-nanogpt records/101324_llmc/README.md: llm.c's run_gpt2_124M.sh on 8 x H100 "
                "HBM3, 'The median per-step time was 139ms' (micro-batch 64 x 1024, 524,288 tokens per step, no "
                "accumulation, ZeRO-1, bf16, cuDNN flash attention, no recomputation)",
         gpu="H100", tp=1, dp=8, accum=1, measured_step_s=0.139,
         overrides=dict(GPT2_124M, micro_batch=64, dtype="bf16", zero1=True, compile=True),
         differs="llm.c: hand-written fused CUDA kernels (LayerNorm, GeLU in the GEMM epilogue, fused classifier "
                 "that never stores the logits' gradient), one fused AdamW kernel; priced here as our step with "
                 "--compile's fusion rule"),
    dict(name="llm.c GPT-2 1.5B, 8 x H100",
         source="karpathy/llm.c scripts/run_gpt2_1558M.sh: '# on 8X H100 80GB SXM ($28/hr) steps in 2.80s/iter' "
                "(48 layers, hidden 1600, 25 heads, micro-batch 16 x 1024, 8 micro-batches per GPU, 1,048,576 "
                "tokens per step, ZeRO-1, bf16, no recomputation)",
         gpu="H100", tp=1, dp=8, accum=8, measured_step_s=2.80,
         overrides=dict(n_layer=48, n_head=25, n_embd=1600, seq_len=1024, vocab_size=50304, micro_batch=16,
                        dtype="bf16", zero1=True, compile=True),
         differs="as llm.c 124M"),
    dict(name="Megatron-Core 1.7B, 48 x H100 (README table)",
         source="NVIDIA/Megatron-LM README, 'Training speed and scalability' (2024-07): 24 layers, hidden 2048, 16 "
                "heads, sequence 4096, vocabulary 131,072, tp = pp = 1, 48 GPUs, batch 192: 408.8 TFLOP/s per GPU "
                "= 41% MFU (model FLOPs, peak 989); micro-batch and recomputation not stated (micro-batch 1, none "
                "assumed here)",
         gpu="H100", tp=1, dp=48, accum=4, measured_mfu=0.413,
         overrides=dict(n_layer=24, n_head=16, n_embd=2048, seq_len=4096, vocab_size=131072, micro_batch=1,
                        dtype="bf16"),
         differs="Megatron-Core: Transformer Engine fused kernels, flash attention (cuDNN), overlapped gradient "
                 "reduce and parameter gather; priced here as our eager step",
         then=dict(hide="communication")),
]


def ratio(anchor, step_s, mfu, speedup=1.0):
    """projected / measured: of times, or of MFUs (above 1: the projection is optimistic). `speedup`: what the
    anchor's measurement would have been without a difference its author measured."""
    if "measured_step_s" in anchor:
        return anchor["measured_step_s"] / speedup / step_s
    return mfu / (anchor["measured_mfu"] * speedup)


def compare(anchor):
    """Our projection of the anchor's configuration and projected / measured; with "then", the same step priced as
    the anchor's code ran it (the module docstring)."""
    args = ("small", anchor["overrides"], anchor["gpu"], anchor["tp"], anchor["dp"])
    r = roofline.project(*args, accum=anchor["accum"])
    row = dict(anchor=anchor["name"], gpu=anchor["gpu"], tp=anchor["tp"], dp=anchor["dp"],
               measured_step_s=anchor.get("measured_step_s"), measured_mfu=anchor.get("measured_mfu"),
               projected_step_s=r["step_s"], projected_mfu=r["mfu"],
               projected_over_measured=ratio(anchor, r["step_s"], r["mfu"]),
               seconds_by_category=r["seconds_by_category"])
    then = anchor.get("then")
    if then:
        t = r
        if "attention" in then:
            spec = dict(roofline.GPUS[anchor["gpu"]], fa2=ATTENTION_THEN[then["attention"]])
            t = roofline.project(*args[:2], spec, *args[3:], accum=anchor["accum"])
        step_s = t["step_s"] - (t["seconds_by_category"][then["hide"]] if "hide" in then else 0.0)
        mfu, speedup = t["mfu"] * t["step_s"] / step_s, then.get("speedup", (1.0, ""))[0]
        row.update(then_step_s=step_s, then_mfu=mfu, then_over_measured=ratio(anchor, step_s, mfu, speedup))
    return row


def main(argv):
    rows = []
    for anchor in ANCHORS:
        row = compare(anchor)
        rows.append(row)
        measured = (f"{row['measured_step_s']:.3f} s" if row["measured_step_s"] else f"{row['measured_mfu']:.1%} MFU")
        print(f"{row['anchor']:<52} measured {measured:>11}; projected {row['projected_step_s']:.3f} s, "
              f"{row['projected_mfu']:.1%} MFU; projected / measured {row['projected_over_measured']:.2f}"
              + (f"; priced as there {row['then_step_s']:.3f} s, {row['then_mfu']:.1%}: "
                 f"{row['then_over_measured']:.2f}" if "then_step_s" in row else ""), flush=True)
    if "--json" in argv:
        with open(argv[argv.index("--json") + 1], "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
