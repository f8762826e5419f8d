"""Train a Yuan model. Reads top to bottom in the order things happen: config -> processes -> data -> model and
optimizer (step.build) -> loop (lr, step.train_step, log, eval, checkpoint). Checkpoints and resuming (at any
tensor-parallel size) are run/checkpoint.py; metrics.jsonl and the output directory, runtime/run_dir.py.

    python train.py --preset tiny --data out/data/sanguo --out out/tiny [--max-steps 300] [--resume] [--dtype fp32]
    python train.py --preset yuan-4.7b --tp 8 --plan [--gpus 8] [--gpu H100] [--recompute full] [--json]

Every field of the model's ModelConfig (model.py) and the run's TrainConfig (run/config.py) can be set as
--FIELD VALUE (dashes or underscores); the command line is read in run/config.py.
"""
import math
import os
import sys
import time
from dataclasses import dataclass

from runtime.errors import require, stop_during_start_up

stop_during_start_up()  # SIGTERM, SIGUSR1, Ctrl-C while torch imports: exit 75, one line
require("torch")  # a clear hint when run outside .venv
import torch

from data import Batches
from distributed import init_distributed
from mixed_precision import LossScaler
from model import flops_per_token, pad_vocab
from step import build, resolve_dtype, train_step
from run.config import fit_schedule, grad_accum, make_config, parse_args, save_record
from run.checkpoint import resume, save_checkpoint, saved_vocab_size
from runtime.accelerators import peak_flops
from runtime.errors import UserError
from runtime.mpi import run_or_abort
from runtime.run_dir import Console, Metrics, Score, announce, ckpt_name, prepare_out_dir
from runtime.stopping import Stopping
from dataprep.tokenizer import save_copy

# ------------------------------------------------------------------------------------------------------------------
# The schedule


def lr_at(step, cfg):
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at lr_decay_steps (or max_steps)."""
    decay_steps = cfg.lr_decay_steps or cfg.max_steps
    if step <= cfg.warmup_steps:
        return cfg.lr * step / max(cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / max(decay_steps - cfg.warmup_steps, 1), 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    """Everything the loop works with, made by setup in the order things happen."""
    cfg: object  # run/config.Config: the model's and the run's fields
    out: str  # the output directory
    dist: object  # distributed.Dist: the process layout
    data: Batches
    grad_accum: int  # micro-batches per step
    model: torch.nn.Module
    opt: object  # AdamW, MasterAdamW (bf16/fp16) or data_parallel.ZeroAdamW (--zero1)
    reducer: object  # data_parallel.GradReducer, or with --zero1 the ZeroAdamW itself
    clip_params: list  # what clip_grad_norm sees: the parameters, or ZeRO-1's shards
    scaler: LossScaler
    step: int  # the last step done: 0, or the resumed checkpoint's
    metrics: Metrics
    score: Score
    console: Console
    floor: float  # the data's unigram entropy, the best loss without context (rank 0; NaN elsewhere)
    peak: object  # the device's peak FLOP/s, or None where unknown (a CPU)
    flops: float  # model FLOPs per token


def open_data(cfg, opts, dist):
    """The batch reader, and the micro-batches per step it needs (batch_tokens over micro_batch x seq_len x dp: whole,
    run/config.grad_accum, or a UserError that says which batch_tokens would be)."""
    accum = grad_accum(cfg, dist.dp)
    data = Batches(opts["data"], cfg.seq_len, cfg.micro_batch, cfg.seed, rank=dist.dp_rank, dp=dist.dp,
                   accum=accum, pin_memory=dist.device.type == "cuda",  # pinned: train_step's copies overlap
                   tokenizer=opts["tokenizer"], val_data=opts["val_data"], val_fraction=opts["val_fraction"])
    return data, accum


def size_vocab(cfg, tokenizer, out, resumed, given):
    """The model's vocabulary: the tokenizer's, padded to 128 * tp, unless --vocab_size says otherwise (given) or a
    resumed checkpoint has its own."""
    saved = saved_vocab_size(out) if resumed and not given else None
    if saved and saved % cfg.tp == 0:  # resumed, perhaps at another tp: the checkpoint's padding stays
        cfg.vocab_size = saved
    elif not given or cfg.vocab_size == 0:  # 0: from the data (model.ModelConfig)
        cfg.vocab_size = pad_vocab(tokenizer["n_vocab"], 128 * cfg.tp)
    elif cfg.vocab_size < tokenizer["n_vocab"]:
        raise UserError(f"--vocab_size {cfg.vocab_size} is smaller than the data's tokenizer ({tokenizer['n_vocab']:,}"
                        f" tokens).\nHINT: drop --vocab_size, or prepare the data with the model's tokenizer.")


def setup(opts, flags, overrides):
    """Config, processes, data, vocabulary, the output directory, model and optimizer, resume, the run's records."""
    cfg, out = make_config(opts["preset"], **overrides), opts["out"]
    dist = init_distributed(cfg.tp, cfg.device, cfg.collective_timeout_s, cfg.iface, cfg.sequence_parallel, cfg.overlap)
    fitted = fit_schedule(cfg, overrides)  # a preset's warm-up longer than --max_steps, scaled to the run
    if fitted:
        dist.print0(fitted)
    resolve_dtype(cfg, dist.device)  # "auto" becomes the device's dtype
    data, accum = open_data(cfg, opts, dist)
    size_vocab(cfg, data.tokenizer, out, flags["resume"], "vocab_size" in overrides)
    # Only now touch --out: a mistake above must not cost the earlier run.
    prepare_out_dir(out, flags["resume"], flags["overwrite"], dist)
    if dist.rank == 0:
        save_copy(data.tokenizer_spec, data.tokenizer, out)  # beside the checkpoints, for sample.py
    model, opt, reducer, clip_params = build(cfg, dist)
    scaler = LossScaler(enabled=cfg.dtype == "fp16")
    step = resume(out, model, opt, scaler, cfg, data.tokenizer, dist) if flags["resume"] else 0
    # --tensorboard true: the package must be there; false: off; not given (None): on where it is installed
    tensorboard = cfg.tensorboard if "tensorboard" in overrides else None
    metrics = Metrics(out, step, enabled=dist.rank == 0, tensorboard=tensorboard)
    score = Score(cfg.target_loss, out, enabled=dist.rank == 0)  # --target_loss: ASC22's accuracy condition
    if step == 0 and dist.rank == 0:  # a record for people; on resume the checkpoint's config is the one that counts
        save_record(out, cfg, opts, data.tokenizer_spec)  # OUT/config.json
    announce(opts["preset"], cfg, dist, model, accum)  # the layout, on the console
    # the loss of the best model that ignores context (up to 10M tokens read): computed once, by rank 0, which prints it
    floor = data.unigram_entropy() if dist.rank == 0 else float("nan")
    dist.print0(f"unigram entropy of the data {floor:.4f} nats/token: the best loss without context")
    # a bar on a terminal, plain lines in a batch log; its clock runs on across --resume, as the score's does
    console = Console(cfg, step, enabled=dist.rank == 0, elapsed=score.elapsed)
    return Run(cfg, out, dist, data, accum, model, opt, reducer, clip_params, scaler, step, metrics, score, console,
               floor, peak_flops(cfg, dist.device), flops_per_token(cfg))


def evaluate(r):
    """The mean validation loss over cfg.eval_batches fixed micro-batches: every rank evaluates the same windows,
    so every rank gets the same number."""
    r.model.eval()
    with torch.no_grad():
        losses = [r.model(x.to(r.dist.device), y.to(r.dist.device))[1].item()
                  for x, y in r.data.val_batches(r.cfg.eval_batches)]
    r.model.train()
    return sum(losses) / len(losses)


def train(argv):
    opts, flags, overrides = parse_args(argv, __doc__)
    if flags["plan"]:  # memory and time on paper, nothing allocated
        from tools.plan import plan_from_args  # here: a plan loads the roofline, a run does not
        return plan_from_args(opts, flags, overrides)
    r = setup(opts, flags, overrides)
    cfg, dist, metrics, console, score, step = r.cfg, r.dist, r.metrics, r.console, r.score, r.step
    ran_steps = step < cfg.max_steps
    stopping = Stopping(cfg, dist, last_ckpt=step or None)  # signals, --time_limit_min, divergence
    ckpt_path = lambda s: os.path.join(r.out, ckpt_name(s, dist.tp, dist.tp_rank))  # noqa: E731
    while step < cfg.max_steps:
        step += 1
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in r.opt.param_groups:
            group["lr"] = lr
        loss, grad_norm, finite = train_step(r.model, r.opt, r.reducer, r.scaler, r.clip_params, r.grad_accum, cfg,
                                             dist, lambda micro: r.data.train_batch(step, micro))
        if dist.dp > 1:  # for the log: the mean loss over the whole global batch
            torch.distributed.all_reduce(loss, group=dist.dp_group)
        loss = loss.item() / dist.dp  # .item() waits for the device, so the time below is honest
        dt = time.perf_counter() - t0
        tok_s = cfg.batch_tokens / dt
        mfu = r.flops * tok_s / (r.peak * dist.world) if r.peak else None
        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            metrics.log(step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=step * cfg.batch_tokens,
                        tokens_per_s=tok_s, mfu=mfu, loss_scale=r.scaler.scale, skipped=not finite,
                        elapsed_s=score.elapsed())
        console.step(step, loss, lr, grad_norm, tok_s, mfu)
        stopping.check_divergence(step, loss, finite, ckpt_path)
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val_loss = evaluate(r)
            metrics.log(step=step, val_loss=val_loss)
            console.write(f"step {step}: train loss {loss:.4f}, val loss {val_loss:.4f}")
            score.evaluated(step, step * cfg.batch_tokens, val_loss, metrics, console)
        requeue = stopping.requeue_reason(dt) if step < cfg.max_steps else None  # the same on every rank
        if step % cfg.ckpt_interval == 0 or step == cfg.max_steps or requeue:
            t0 = time.perf_counter()
            save_checkpoint(r.out, step, r.model, r.opt, r.scaler, cfg, r.data.tokenizer, dist,
                            protect=stopping.protect)
            stopping.saved(step, time.perf_counter() - t0)
        if requeue:
            break
    console.close()
    metrics.close()
    if step < cfg.max_steps:  # stopped by a signal or the time limit, after a checkpoint
        stopping.requeue(step, requeue, r.out)
    elif ran_steps:
        dist.print0(score.summary(step * cfg.batch_tokens, val_loss))
        dist.print0(f"done: val loss {val_loss:.4f} nats/token; unigram entropy of the data "
                    f"{r.floor:.4f} (the best loss without context). Checkpoints in {r.out}")
    else:
        dist.print0(f"nothing to do: {r.out} is already at step {step} = max_steps")
    return r.model


def main(argv=None):
    run_or_abort(lambda: train(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
