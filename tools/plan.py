"""Will it fit, and how long will it take? Memory and time per GPU, on paper: nothing is allocated.

    python train.py --preset yuan-4.7b --tp 8 --plan [--gpus 8] [--gpu H100] [--micro_batch 1] [--recompute full]
                    [--zero1 true] [--gpu_mem 80] [--mfu 0.45] [--tokens 1e9] [--json]

Time: tokens/s = GPUs x peak x MFU / FLOPs per token, with the MFU that tools/roofline.py projects for this layout
on this GPU from the training step's own op stream (--mfu overrides it).

Memory per GPU, as train.py holds it (in bf16/fp16, Megatron-style master weights: mixed_precision.py):
    weights      4 bytes x parameters of this rank (sharded matrices / tp + replicated LayerNorms, biases, positions):
                 the fp32 weights, or in bf16/fp16 the fp32 masters the optimizer updates
    working      2 bytes x the same in bf16/fp16: the working weights the model computes with (0 in fp32)
    gradients    4 bytes x the same (fp32 .grad, or main_grad), alive through forward and backward (they are,
                 under gradient accumulation). The bf16 gradients of the parameters whose matmul does not add into
                 main_grad itself (biases, LayerNorms, the tied embedding) live only until a hook adds them, at the
                 end of backward where activations are freed: not counted
                 The data-parallel reductions run in place on these buffers (no second copy of the gradients);
                 with --zero1 in fp32, plus 4 / dp: this rank's slice of their sum (data_parallel.ZeroAdamW)
    optimizer    8 bytes x the same for AdamW's two moments, divided by dp with --zero1
    activations  what autograd saves, per layer (below) x layers, plus the final LayerNorm and the loss
Activations per layer, for n = micro_batch x seq_len tokens, hidden h, FFN f, heads a, s = 2 (bf16/fp16) or 4 (fp32)
bytes per element, r = s for the residual stream and LayerNorm inputs (the model runs in its working dtype):
    none       n * (2r h + 2s h + 5s h/tp + 2s f/tp) + 4 n a/tp     LayerNorm inputs, their outputs for the two column-
               parallel matmuls, q k v, attention output and its reshaped copy, the MLP's two f-wide tensors,
               flash attention's log-sum-exp (+ 2 n h one-byte dropout masks when dropout > 0)
    selective  none - n (s h/tp + 4 a/tp): core attention is recomputed, its output and log-sum-exp not kept.
               Flash attention never stores the T x T scores, so this saves little (Korthikanti et al. 2022
               recompute attention to avoid those scores, which SDPA already does).
    full       n r h per layer (the block input), plus the larger of the loss's peak and one layer's `none`
               activations while it is recomputed, with its largest gradients n (2s f/tp + 2r h)
With --sequence_parallel every term outside the matmuls (the r h and 2s h terms, dropout masks, the block input of
full recomputation, the final LayerNorm) is divided by tp too: each rank keeps only its T/tp tokens there.
The loss keeps fp32 log-probabilities [n, V/tp], and the start of backward holds two gradients of that size
(at tp > 1 the vocab-parallel loss works in place: its softmax and one gradient).
Measured against these formulas on CPU in fp32 (tests/test_plan.py): within 3% for none, selective and full; at
tp = 2 with and without sequence parallelism under mpiexec (tests/mpi_plan.py), within 10%. The
plan assumes flash attention (GPU); CPU attention with dropout stores T x T probabilities the plan leaves out.
"""
import json
import os
import sys

from runtime.accelerators import ACCELERATORS, GPUS_PER_NODE, accelerator
from runtime.errors import UserError
from model import flops_per_token
from run.config import grad_accum, make_config, whole_batch_tokens

SLACK_GB = 2.0  # CUDA context, allocator fragmentation, NCCL buffers: what a plan must leave free


def params_per_rank(cfg, tp):
    """(parameters on one tensor-parallel rank, of which matmul weights and biases). Matrices, column-parallel
    biases and the vocabulary are split by tp; LayerNorms, row-parallel biases and positions are replicated."""
    h, f, L, V, T = cfg.n_embd, cfg.ffn_hidden, cfg.n_layer, cfg.vocab_size, cfg.seq_len
    sharded = L * (3 * h * h + 3 * h + h * h + h * f + f + f * h) + V * h
    replicated = L * (2 * h + h + 2 * h + h) + T * h + 2 * h
    matmul = (L * (4 * h * h + 2 * h * f + 3 * h + f) + V * h) // tp + L * 2 * h
    return sharded // tp + replicated, matmul


def activation_bytes(cfg, micro_batch, tp, dtype, recompute):
    """(bytes saved for backward per layer as stored, bytes of the whole model's activations) on one rank."""
    n, h, f, a = micro_batch * cfg.seq_len, cfg.n_embd, cfg.ffn_hidden, cfg.n_head
    s = 4 if dtype == "fp32" else 2
    r = s
    q = tp if cfg.sp else 1  # outside the matmuls: every token (q = 1) or T/tp of them (q = tp)
    layer = n * ((2 * r * h + 2 * s * h) // q + 5 * s * h // tp + 2 * s * f // tp) + 4 * n * a // tp
    if cfg.dropout > 0:
        layer += 2 * n * h // q
    if recompute == "selective":
        layer -= n * s * h // tp + 4 * n * a // tp
    head = n * (r * h + s * h) // q  # final LayerNorm input and output (the tied head saves it)
    # tp = 1, F.cross_entropy: log-probabilities and two gradients of their size in backward; tp > 1, the vocab-
    # parallel one (parallel.py): its softmax, computed in place, and one gradient (measured by tests/mpi_plan.py)
    loss = (3 if tp == 1 else 2) * 4 * n * cfg.vocab_size // tp
    if recompute == "full":  # the peak: the loss's backward, or later one layer's recomputation and its backward
        stored = n * r * h // q  # (whose largest gradients, of the two f-wide tensors and the residual, coexist)
        return stored, cfg.n_layer * stored + max(head + loss, layer + 2 * n * s * f // tp + 2 * n * r * h // q)
    return layer, cfg.n_layer * layer + head + loss


def estimate(cfg, tp=1, dp=1, dtype="bf16"):
    """Bytes per GPU of each part, FLOPs per token, and the parameter count per rank."""
    n_rank, _ = params_per_rank(cfg, tp)
    per_layer, act = activation_bytes(cfg, cfg.micro_batch, tp, dtype, cfg.recompute)
    # ZeRO-1 in fp32: the gradients, plus this rank's 1/dp slice of their sum (the reduce-scatter's output, the
    # shards' .grad), alive from the last backward through the step; in bf16/fp16 that slice is main_grad's own
    grads = 4 * n_rank + (4 * n_rank // dp if cfg.zero1 and dp > 1 and dtype == "fp32" else 0)
    parts = dict(weights=4 * n_rank, working=0 if dtype == "fp32" else 2 * n_rank, gradients=grads,
                 optimizer=8 * n_rank // (dp if cfg.zero1 else 1), activations=act)
    return dict(params_per_rank=n_rank, bytes=parts, total_bytes=sum(parts.values()), layer_bytes=per_layer,
                flops_per_token=flops_per_token(cfg))


ASSUMED_MFU = 0.45  # the time estimate's MFU for a GPU that tools/roofline.py's table lacks (e.g. L40S)


def projected_mfu(preset, overrides, gpu, tp, dp, dtype):
    """(MFU, where it comes from): tools/roofline.py's projection of this layout's training step on this GPU, priced
    from the code's own op stream (a few seconds for yuan-4.7b), or ASSUMED_MFU where its table lacks the GPU."""
    from tools import roofline  # here: the roofline loads fake tensors, a plan with --mfu needs none
    key = roofline.gpu_key(gpu)
    if key is None or dtype not in roofline.GPUS[key]:
        return ASSUMED_MFU, f"assumed; tools/roofline.py has no {dtype} figures for {gpu}"
    cfg = make_config(preset, **overrides)
    accum = max(1, round(cfg.batch_tokens / (cfg.micro_batch * cfg.seq_len * dp)))
    r = roofline.project(preset, {**overrides, "dtype": dtype}, key, tp, dp, accum=accum)
    return r["mfu"], f"projected by tools/roofline.py for {key}, {r['assumes'].split(':')[0]} kernels"


def gpu_dtype(cfg, gpu):
    """The dtype a run on this GPU uses: --dtype, or for "auto" fp16 on V100 (no bf16) and bf16 elsewhere."""
    return cfg.dtype if cfg.dtype != "auto" else ("fp16" if "V100" in gpu.upper() else "bf16")


def candidates(cfg, gpus):
    """[(tp, dp, zero1)]: the splits of `gpus` GPUs, largest tp first. tp among the divisors of gpus up to
    GPUS_PER_NODE (a tensor-parallel group stays inside a node) that divide the heads, the FFN and seq_len (sequence
    parallelism splits the sequence over tp); ZeRO-1 off and on wherever dp > 1."""
    tps = [t for t in range(min(gpus, GPUS_PER_NODE), 0, -1)
           if gpus % t == 0 and cfg.n_head % t == 0 and cfg.ffn_hidden % t == 0 and cfg.seq_len % t == 0]
    return [(tp, gpus // tp, z) for tp in tps for z in ((False, True) if gpus // tp > 1 else (False,))]


def layouts(preset, overrides, gpus):
    """Every split of `gpus` GPUs that train.py accepts, largest tp first: the picker that `--plan` and
    bench/layouts.py share. Each row: tp, dp, zero1, the Config overrides of the run, the flags that give that
    layout on train.py's command line, and a note when it changes batch_tokens. Sequence parallelism is on wherever
    tp > 1 (it moves the same bytes as plain tensor parallelism and stores less). Where dp ranks cannot make the
    global batch of whole micro-batches (run/config.grad_accum: yuan-4.7b's 512 over dp 6), the layout comes
    with --batch_tokens, the nearest multiple of micro_batch x seq_len x dp, rather than not at all."""
    rows = []
    for tp, dp, zero1 in candidates(make_config(preset, **{**overrides, "tp": 1}), gpus):
        over = {**overrides, "tp": tp, "zero1": zero1, "sequence_parallel": tp > 1}
        # a switch the layout turns on, or off where the command line had it on
        flags = f"--tp {tp}" + "".join(f" --{k} {str(over[k]).lower()}" for k in ("sequence_parallel", "zero1")
                                       if over[k] or overrides.get(k))
        cfg = make_config(preset, **over)
        batch, note = whole_batch_tokens(cfg, dp), ""
        if batch != cfg.batch_tokens:
            over["batch_tokens"], flags = batch, flags + f" --batch_tokens {batch}"
            micro = cfg.batch_tokens / (cfg.micro_batch * cfg.seq_len)
            note = (f"batch_tokens {cfg.batch_tokens:,} -> {batch:,}: {micro:g} micro-batches of {cfg.micro_batch} x "
                    f"{cfg.seq_len} do not split over dp {dp}")
        grad_accum(make_config(preset, **over), dp)  # what train.py checks, so a layout offered here is one it runs
        rows.append(dict(tp=tp, dp=dp, zero1=zero1, overrides=over, flags=flags, note=note))
    return rows


def layouts_that_fit(preset, overrides, gpu, gpus, mem_gb, rank_by_speed):
    """The layouts of `gpus` GPUs (layouts(), with their flags) that fit in mem_gb, fastest first by
    tools/roofline.py's projection (rank_by_speed; a few seconds each, several at once: project_all), else smallest
    tp first."""
    rows = []
    for lay in layouts(preset, overrides, gpus):
        cfg = make_config(preset, **lay["overrides"])
        dtype = gpu_dtype(cfg, gpu)
        need = estimate(cfg, lay["tp"], lay["dp"], dtype)["total_bytes"] / 1e9
        if need + SLACK_GB <= mem_gb:
            rows.append(dict(tp=lay["tp"], dp=lay["dp"], zero1=lay["zero1"], memory_gb=round(need, 2), mfu=None,
                             flags=lay["flags"], batch_tokens=cfg.batch_tokens, note=lay["note"],
                             job=(preset, lay["overrides"], gpu, lay["tp"], lay["dp"], dtype)))
    if rank_by_speed:
        for row, mfu in zip(rows, project_all([row["job"] for row in rows])):
            row["mfu"] = mfu
    for row in rows:
        del row["job"]
    return sorted(rows, key=lambda r: -r["mfu"]) if rank_by_speed else sorted(rows, key=lambda r: r["tp"])


def _projected(job):
    return projected_mfu(*job)[0]


def _worker_signals():
    """A projecting worker ignores Ctrl-C (it reaches this process, which ends the pool) and dies quietly of the
    SIGTERM that ends the pool, not of train.py's start-up handler, which would print a line about a requeue."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)


def project_all(jobs):
    """projected_mfu of each job (its arguments), in as many processes as this machine gives us cores: each
    projection runs the training step under fake tensors, 2-3 s of one core, and they share nothing but what the
    first one loads."""
    if not jobs:
        return []
    workers = min(len(jobs), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    print(f"projecting the {len(jobs)} layouts that fit, {workers} at a time ...", file=sys.stderr, flush=True)
    if workers <= 1:
        return [_projected(job) for job in jobs]
    import gc
    import multiprocessing
    # The first one here, before the fork: what a first projection loads (torch._dynamo, fake tensors' cache of
    # shapes) is then loaded once, and every worker starts with it.
    first = _projected(jobs[0])
    gc.freeze()  # the workers' collector leaves what they inherit alone: no copies of those pages on write
    try:
        with multiprocessing.get_context("fork").Pool(workers, _worker_signals) as pool:
            # neighbours to one worker: layouts of the same tp share most shapes, and so the fake tensors' cache
            rest = pool.map(_projected, jobs[1:], chunksize=-(-(len(jobs) - 1) // workers))
    finally:
        gc.unfreeze()
    return [first] + rest  # Ctrl-C reaches this process alone, which ends the pool


def plan(preset, overrides, gpus=None, gpu="H100", gpu_mem=None, mfu=None, tokens=1e9, as_json=False):
    cfg = make_config(preset, **overrides)
    tp = cfg.tp
    gpus = tp if gpus is None else gpus
    if gpus < 1 or gpus % tp:
        raise UserError(f"--gpus {gpus:g} must be a positive multiple of --tp {tp}.")
    dp = gpus // tp
    spec = accelerator(gpu) or {}
    if not spec and not (gpu_mem and cfg.peak_tflops):
        known = sorted(name for name, _ in ACCELERATORS)
        raise UserError(f"--gpu {gpu!r} is not a GPU runtime/accelerators.py knows: {', '.join(known)}.\nHINT: one of "
                        f"those, or describe yours with --gpu_mem GB and --peak_tflops TFLOPS.")
    dtype = gpu_dtype(cfg, gpu)
    mem_gb = gpu_mem or spec.get("mem_gb")
    peak = cfg.peak_tflops or spec.get(dtype)
    e = estimate(cfg, tp, dp, dtype)
    total_gb = e["total_bytes"] / 1e9
    fits = None if mem_gb is None else total_gb + SLACK_GB <= mem_gb
    # dp ranks must make batch_tokens of whole micro-batches, or train.py stops (run/config.grad_accum)
    batch_hint = whole_batch_tokens(cfg, dp)
    whole = batch_hint == cfg.batch_tokens
    given = mfu
    if fits is False:  # no time for a layout that cannot run (and no seconds spent projecting it)
        mfu, mfu_source = None, "does not fit"
    elif not whole:
        mfu, mfu_source = None, f"batch_tokens does not split over dp {dp}"  # nor for one train.py refuses
    else:
        mfu, mfu_source = (mfu, "given") if mfu else projected_mfu(preset, overrides, gpu, tp, dp, dtype)
    tok_s = gpus * peak * 1e12 * mfu / e["flops_per_token"] if peak and mfu else None
    # A projection comes with its pessimistic bound: divided by the largest ratio of projection to a published
    # measurement of a comparable code (tools/roofline.py's PESSIMISM, bench/anchors.py, bench/RESULTS.md).
    factor = None
    if mfu and mfu_source.startswith("projected"):  # a projection: the roofline is loaded already
        from tools.roofline import PESSIMISM as factor
    result = dict(preset=preset, gpus=gpus, gpu=gpu, tp=tp, dp=dp, dtype=dtype, micro_batch=cfg.micro_batch,
                  seq_len=cfg.seq_len, recompute=cfg.recompute, zero1=cfg.zero1,
                  sequence_parallel=cfg.sp, **e,
                  gpu_mem_gb=mem_gb, fits=fits, batch_tokens=cfg.batch_tokens, whole_micro_batches=whole,
                  batch_tokens_hint=None if whole else batch_hint,
                  peak_tflops=peak, mfu=mfu, mfu_source=mfu_source, tokens_per_s=tok_s, tokens=tokens,
                  hours=tokens / tok_s / 3600 if tok_s else None, params_total=params_per_rank(cfg, 1)[0],
                  pessimism=factor, mfu_pessimistic=mfu / factor if factor else None,
                  tokens_per_s_pessimistic=tok_s / factor if factor and tok_s else None,
                  hours_pessimistic=tokens / tok_s / 3600 * factor if factor and tok_s else None)
    if result["fits"] is False:  # which splits of these GPUs would fit, instead of a time for one that cannot run
        result["layouts_that_fit"] = layouts_that_fit(preset, {k: v for k, v in overrides.items() if k != "tp"}, gpu,
                                                      gpus, mem_gb, rank_by_speed=not given)
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        report(result, cfg, e, given)
    return result


def report(result, cfg, e, given):
    """plan()'s result for people; a layout that does not fit ends in a UserError naming the ones that do, and one
    that fits but whose dp cannot split batch_tokens into whole micro-batches in train.py's own error and HINT."""
    preset, gpus, gpu, tp, dp, dtype = (result[k] for k in ("preset", "gpus", "gpu", "tp", "dp", "dtype"))
    mem_gb, total_gb, tok_s = result["gpu_mem_gb"], e["total_bytes"] / 1e9, result["tokens_per_s"]
    b = e["bytes"]
    gb = lambda x: f"{x / 1e9:8.2f} GB"  # noqa: E731
    print(f"{preset} on {gpus} x {gpu}: tp {tp} x dp {dp}, {dtype}, micro-batch {cfg.micro_batch} x {cfg.seq_len}, "
          f"recompute {cfg.recompute}, ZeRO-1 {'on' if cfg.zero1 else 'off'}, sequence parallel "
          f"{'on' if cfg.sp else 'off'}\nper GPU")
    print(f"  parameters     {e['params_per_rank']:>14,}   of {result['params_total']:,} in the model")
    print(f"  weights        {gb(b['weights'])}   fp32 master copy")
    print(f"  gradients      {gb(b['gradients'])}   fp32")
    print(f"  optimizer      {gb(b['optimizer'])}   AdamW moments, fp32" + (f", sharded over dp {dp}" if cfg.zero1
                                                                             else ""))
    print(f"  working        {gb(b['working'])}   {dtype} working weights (the masters are the fp32 weights above)")
    print(f"  activations    {gb(b['activations'])}   {e['layer_bytes'] / 1e6:,.0f} MB per layer as stored x "
          f"{cfg.n_layer}, plus LayerNorm, head and loss")
    fit = "" if mem_gb is None else (f" of {mem_gb} GB: fits, {mem_gb - total_gb:.1f} GB free" if result["fits"]
                                     else f" of {mem_gb} GB: DOES NOT FIT (needs {SLACK_GB:.0f} GB of slack)")
    if result["fits"] is not False and not result["whole_micro_batches"]:
        fit += f", but train.py refuses batch_tokens {cfg.batch_tokens:,} at dp {dp} (below)"
    print(f"  total          {gb(e['total_bytes'])}{fit}")
    print(f"model FLOPs per token {e['flops_per_token'] / 1e9:.2f} G" + (" (recompute adds ~1/3 more hardware work)"
                                                                        if cfg.recompute == "full" else ""))
    if result["fits"] is False:
        fit = result["layouts_that_fit"]
        width = max((len(r["flags"]) for r in fit), default=0)
        ways = "\n".join(f"  {r['flags']:<{width}}  {r['memory_gb']:6.1f} GB" +
                         (f", {r['mfu']:.1%} MFU projected" if r["mfu"] else "") +
                         (f"; {r['note']}" if r["note"] else "") for r in fit)
        raise UserError(f"{preset} at tp {tp} x dp {dp} does not fit in {mem_gb} GB per {gpu}." +
                        (f" Layouts of {gpus} GPUs that fit, {'fastest' if not given else 'smallest tp'} first:\n{ways}"
                         if fit else f" No split of {gpus} GPUs fits.\nHINT: more GPUs, --recompute full, or a "
                         f"smaller --micro_batch."))
    if not result["whole_micro_batches"]:
        try:
            grad_accum(cfg, dp)  # raises train.py's own error, with the batch_tokens to use in its HINT
        except UserError as err:
            raise UserError(f"{preset} at tp {tp} x dp {dp}{' fits, but' if result['fits'] else ':'} train.py would "
                            f"stop: {err}") from None
    if tok_s:
        print(f"at {result['mfu']:.1%} MFU ({result['mfu_source']}) of {result['peak_tflops']:g} TFLOP/s per GPU: "
              f"{tok_s:,.0f} tokens/s; {result['tokens']:.3g} tokens in {result['hours']:.1f} h")
        if result["mfu_pessimistic"]:
            print(f"pessimistic: {result['mfu_pessimistic']:.1%} MFU, {result['tokens_per_s_pessimistic']:,.0f} "
                  f"tokens/s, {result['hours_pessimistic']:.1f} h (the projection / {result['pessimism']:.2f}, its "
                  f"largest excess over a published measurement: bench/RESULTS.md). Projected, not measured.")
    else:
        print(f"no peak FLOP/s known for {gpu} in {dtype}: pass --peak_tflops for the time estimate")


def plan_from_args(opts, flags, overrides):
    """--plan: memory and time per GPU from tools/plan.py; nothing is allocated and no data is read."""
    try:
        gpus, mem, mfu, tokens = (None if opts[k] is None else float(opts[k]) for k in ("gpus", "gpu_mem", "mfu",
                                                                                        "tokens"))
    except ValueError:
        raise UserError("--gpus, --gpu_mem, --mfu and --tokens take numbers (e.g. --gpu_mem 80 --mfu 0.45).") from None
    if mfu is not None and not 0 < mfu <= 1:
        raise UserError(f"--mfu {mfu} is a fraction of the peak, in (0, 1].")
    return plan(opts["preset"], overrides, gpus=int(gpus) if gpus is not None else None, gpu=opts["gpu"] or "H100",
                gpu_mem=mem, mfu=mfu, tokens=tokens or 1e9, as_json=flags["json"])
