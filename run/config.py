"""A run's settings and the command line that gives them.

    ModelConfig (model.py)   the network: exactly what rebuilds it; checkpoints and export.py carry these fields
    TrainConfig (here)       the run: schedule, batch, precision, logging and checkpoints, the process layout
    Config                   both as one flat object (cfg.lr, cfg.n_layer): what train.py, the planner and the
                             benchmarks pass around; cfg.model is its ModelConfig

Every field of both can be set as --FIELD VALUE; `train.py --help` lists them with the comment beside each below.
A preset (PRESETS) fills in both kinds of field; the command line overrides it.
"""
import difflib
import inspect
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, fields

from model import MODELS, ModelConfig
from runtime.errors import UserError


@dataclass
class TrainConfig:
    # --- training ---
    max_steps: int = 200  # optimizer steps
    batch_tokens: int = 8192  # global batch per optimizer step, in tokens (= micro_batch * seq_len * grad accum)
    micro_batch: int = 8  # sequences per forward/backward
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20  # linear warm-up steps
    lr_decay_steps: int = 0  # cosine length in steps; 0 means max_steps
    weight_decay: float = 0.1  # AdamW decay on matrices and embeddings only
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 disables)
    dtype: str = "auto"  # bf16 | fp16 | fp32 | auto (bf16 on GPU, fp16 if it lacks bf16, fp32 on CPU)
    seed: int = 1234  # model init, dropout and data order
    eval_interval: int = 50  # evaluate on the val shards every N steps (and after the last)
    eval_batches: int = 8  # micro-batches per evaluation
    target_loss: float = 0.0  # record when the val loss first reaches this (ASC22's accuracy condition); 0: none
    log_interval: int = 1  # training rows in metrics.jsonl every N steps
    tensorboard: bool = True  # TensorBoard events in OUT/tensorboard (when the tensorboard package is installed)
    ckpt_interval: int = 100  # checkpoint every N steps (and after the last)
    keep_ckpts: int = 2  # how many recent checkpoints to keep
    time_limit_min: float = 0.0  # checkpoint and exit (code 75) before this many minutes of wall time; 0: no limit
    signal_grace_s: float = 5.0  # a stop signal this soon after the first is its copy; later, it means: exit now
    max_skipped_steps: int = 25  # stop after this many consecutive steps skipped for non-finite gradients
    peak_tflops: float = 0.0  # accelerator peak for MFU; 0 means look the device up in runtime/accelerators.py
    device: str = ""  # cpu | cuda | cuda:N; empty means cuda when available
    # --- parallelism (parallel.py, data_parallel.py) ---
    collective_timeout_s: float = 300.0  # a rank that does not arrive in a collective this long ends the job
    iface: str = ""  # interface between hosts (ib0, eth1); empty: the one reaching rank 0 (runtime/rendezvous.py)
    tp: int = 1  # tensor-parallel size: ranks that split every layer (consecutive ranks, keep them in one node)
    sequence_parallel: bool = False  # with tp > 1: LayerNorm/dropout activations split over the tp group along T
    overlap: bool = True  # tp matmuls as one step: f's backward collective overlapped, wgrad into main_grad
    bucket_mb: float = 25.0  # data-parallel gradient all-reduce bucket size, MB of fp32 gradients
    # --- memory (tools/plan.py estimates what each costs and saves) ---
    recompute: str = "none"  # activation recomputation: none | selective (core attention) | full (every block)
    zero1: bool = False  # shard the AdamW state over the data-parallel group (ZeRO stage 1)
    # --- speed ---
    compile: bool = False  # torch.compile each block (the first steps are slow while it compiles)

    def __post_init__(self):
        for name in ("max_steps", "batch_tokens", "micro_batch", "eval_interval", "eval_batches", "log_interval",
                     "ckpt_interval", "keep_ckpts", "max_skipped_steps", "tp"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} = {getattr(self, name)} must be at least 1.")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "time_limit_min", "signal_grace_s",
                     "collective_timeout_s", "target_loss"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UserError(f"{name} = {value} must be a finite number, at least 0.")
        if self.collective_timeout_s <= 0:
            raise UserError(f"collective_timeout_s = {self.collective_timeout_s} must be positive (seconds).")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise UserError(f"dtype = {self.dtype!r} is not one of auto, bf16, fp16, fp32.")
        if self.recompute not in ("none", "selective", "full"):
            raise UserError(f"recompute = {self.recompute!r} is not one of none, selective, full.")


@dataclass
class Config(TrainConfig, ModelConfig):  # fields: ModelConfig's, then TrainConfig's
    """The model's fields and the run's, as one object; checked alone, then how the layout cuts the model."""

    def __post_init__(self):
        ModelConfig.__post_init__(self)
        TrainConfig.__post_init__(self)
        if self.n_head % self.tp or self.ffn_hidden % self.tp:
            raise UserError(f"n_head = {self.n_head} and ffn_hidden = {self.ffn_hidden} must both be divisible by "
                            f"tp = {self.tp}.\nHINT: pick --tp among their common divisors (yuan-4.7b: 1, 2, 4, 8).")
        if self.sequence_parallel and self.seq_len % self.tp:
            raise UserError(f"sequence_parallel splits seq_len = {self.seq_len} over tp = {self.tp} ranks: it must be "
                            f"divisible.\nHINT: pick --seq_len a multiple of {self.tp}, or --sequence_parallel false.")

    @property
    def model(self):
        """The network's fields alone: what a checkpoint stores to rebuild it."""
        return ModelConfig(**{f.name: getattr(self, f.name) for f in fields(ModelConfig)})

    @property
    def run(self):
        return {f.name: getattr(self, f.name) for f in fields(TrainConfig)}

    @property
    def sp(self):
        """Sequence parallelism in effect: asked for, and a tensor-parallel group to split the sequence over."""
        return self.sequence_parallel and self.tp > 1


# How each preset of model.py's MODELS is trained (tests/test_model.py checks both name the same presets).
RECIPES = {
    "tiny": dict(micro_batch=8, batch_tokens=1024, lr=2e-3, warmup_steps=50, max_steps=1000,
                 eval_interval=200, eval_batches=32, ckpt_interval=500),  # `make demo`: ~6 min on 2 CPU cores
    "small": dict(micro_batch=8, batch_tokens=524288, lr=6e-4, warmup_steps=700, max_steps=19000,
                  eval_interval=500, ckpt_interval=1000),
    "1.3b": dict(micro_batch=4, batch_tokens=1048576, lr=2e-4, warmup_steps=500, max_steps=1000,
                 eval_interval=100, ckpt_interval=200),
    # ASC22: 1B tokens at 1M tokens per step = ~954 steps. After Yuan's published recipe (Shawn-IEITSystems/Yuan-1.0,
    # src/pretrain_yuan_13B.sh): --weight-decay 0.01, --adam-beta2 0.95 and --clip-grad 1.0 (step.py's AdamW and
    # grad_clip already), --min-lr = lr / 10 (min_lr_ratio).
    "yuan-4.7b": dict(micro_batch=1, batch_tokens=1048576, lr=1.6e-4, warmup_steps=100, max_steps=954,
                      eval_interval=100, ckpt_interval=100, weight_decay=0.01),
}
PRESETS = {name: {**MODELS[name], **RECIPES[name]} for name in MODELS}  # a preset: its network and its recipe


def make_config(preset, **overrides):
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}. Presets: {', '.join(PRESETS)}.")
    valid = {f.name for f in fields(Config)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise UserError(f"unknown Config field(s) {unknown}. Valid: {', '.join(sorted(valid))}.")
    return Config(**{**PRESETS[preset], **overrides})


WARMUP_FRACTION = 0.1  # a preset's warm-up that does not fit --max_steps becomes this fraction of the run


def fit_schedule(cfg, given):
    """Fit the preset's warm-up and decay to a shorter run (issue 28: the quick start's --max_steps 40 with the tiny
    preset's 50 warm-up steps ended at 80% of the peak lr, never decaying). A warm-up of max_steps or more becomes
    WARMUP_FRACTION of the run, and a decay longer than the run ends at max_steps; a field in given (the command
    line's overrides) is left as it is. Returns the line train.py prints about it, or "" when nothing changed."""
    was = cfg.warmup_steps, cfg.lr_decay_steps
    if "warmup_steps" not in given and cfg.warmup_steps >= cfg.max_steps:
        cfg.warmup_steps = max(1, round(WARMUP_FRACTION * cfg.max_steps))
    if "lr_decay_steps" not in given and cfg.lr_decay_steps > cfg.max_steps:
        cfg.lr_decay_steps = 0  # 0: decay over max_steps (train.lr_at)
    if (cfg.warmup_steps, cfg.lr_decay_steps) == was:
        return ""
    return (f"schedule fitted to --max_steps {cfg.max_steps}: warmup_steps {was[0]} -> {cfg.warmup_steps}, "
            f"cosine decay to step {cfg.lr_decay_steps or cfg.max_steps}"
            f"{f' (was {was[1]})' if was[1] != cfg.lr_decay_steps else ''}; set --warmup_steps / --lr_decay_steps "
            f"to choose them yourself")


def whole_batch_tokens(cfg, dp):
    """The batch_tokens nearest cfg's that dp data-parallel ranks make of whole micro-batches, at least one each:
    a multiple of micro_batch x seq_len x dp (cfg.batch_tokens itself when it is one)."""
    tokens_per_micro = cfg.micro_batch * cfg.seq_len * dp  # one micro-batch on every data-parallel rank
    return max(1, round(cfg.batch_tokens / tokens_per_micro)) * tokens_per_micro


def grad_accum(cfg, dp):
    """Micro-batches per optimizer step on each of dp data-parallel ranks: batch_tokens / (micro_batch x seq_len x
    dp). Every rank runs the same number of whole micro-batches, so it must divide; train.py stops here otherwise,
    and the planner (tools/plan.py) asks the same of every layout it offers."""
    tokens_per_micro = cfg.micro_batch * cfg.seq_len * dp
    if cfg.batch_tokens % tokens_per_micro:
        raise UserError(f"batch_tokens = {cfg.batch_tokens:,} is not a multiple of micro_batch * seq_len * dp = "
                        f"{cfg.micro_batch} * {cfg.seq_len} * {dp} = {tokens_per_micro:,}.\nHINT: set "
                        f"--batch_tokens to a multiple, e.g. {whole_batch_tokens(cfg, dp)}.")
    return cfg.batch_tokens // tokens_per_micro


# ------------------------------------------------------------------------------------------------------------------
# The command line of train.py


OPTIONS = """\
  --preset NAME      {presets}
  --data DIR         output of data.py prepare, or a Megatron dataset:
                     PREFIX (PREFIX.bin + .idx) or a blend "W1 PREFIX1 W2 PREFIX2 ..."
  --tokenizer SPEC   for a Megatron dataset: yuan:vocab.txt, bert:vocab.txt or a .tiktoken
  --val_data PREFIX  its validation data (else --val_fraction F of its sequences, default 0.01)
  --out DIR          checkpoints, metrics.jsonl, config.json
  --resume           continue from the newest checkpoint in --out
  --overwrite        delete the run in --out and start again
  --plan             print memory and time per GPU (tools/plan.py) and exit; with --json as JSON;
                     --gpus N, --gpu H100|H200|A100-40GB|V100-32GB|..., --gpu_mem GB, --mfu 0.45,
                     --tokens 1e9 describe the machine and the run
"""


def usage(doc):
    """doc (train.py's docstring), the options, then every field of ModelConfig and TrainConfig with its type,
    default and the comment beside it in the source."""
    lines = [doc, OPTIONS.format(presets=" | ".join(PRESETS)), "Config fields (defaults before the preset's values)"]
    for cls, what in ((ModelConfig, "the model (model.py), what a checkpoint carries"),
                      (TrainConfig, "the run (run/config.py)")):
        lines.append(f"  {cls.__name__}: {what}")
        for line in inspect.getsource(cls).splitlines():
            m = re.match(r"\s+(\w+): (\w+) = ([^#]+?)\s*(?:#\s*(.*))?$", line)
            if m:
                lines.append(f"  --{m[1]:<16} {m[2]:<5} {m[3]:<10} {m[4] or ''}")
    return "\n".join(lines)


def parse_bool(value):
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


FIELD_TYPES = {f.name: f.type for f in fields(Config)}


def parse_field(name, value):
    """A Config field's value from the command line, typed by the field (ValueError when it does not parse). The
    benchmarks parse their Config overrides with it too."""
    return parse_bool(value) if FIELD_TYPES[name] is bool else FIELD_TYPES[name](value)


def parse_args(argv, doc=""):
    """--preset, --data, --out, --resume, --overwrite, then any Config field as --FIELD VALUE, typed by the field.
    Returns (options, flags, Config overrides)."""
    if "-h" in argv or "--help" in argv:
        print(usage(doc))
        sys.exit(0)
    opts = {"preset": None, "data": None, "out": None, "gpus": None, "gpu": None, "gpu_mem": None, "mfu": None,
            "tokens": None, "tokenizer": None, "val_data": None, "val_fraction": None}
    flags = {"resume": False, "overwrite": False, "plan": False, "json": False}
    overrides, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; options look like --FIELD VALUE.")
        key, _, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key in flags:
            flags[key], i = True, i + 1
            continue
        if not value:
            if i + 1 >= len(argv):
                raise UserError(f"--{key} needs a value.")
            value, i = argv[i + 1], i + 1
        i += 1
        if key in opts:
            opts[key] = value
        elif key in FIELD_TYPES:
            try:
                overrides[key] = parse_field(key, value)
            except ValueError:
                raise UserError(f"--{key} expects {FIELD_TYPES[key].__name__}, got {value!r}.") from None
        else:
            valid = sorted([*opts, *flags, *FIELD_TYPES])
            close = difflib.get_close_matches(key, valid, n=1)
            raise UserError(f"unknown option --{key}." + (f" Did you mean --{close[0]}?" if close else "") +
                            f"\nValid: {', '.join('--' + k for k in valid)}")
    check_options(opts, flags)
    return opts, flags, overrides


def check_options(opts, flags):
    try:
        opts["val_fraction"] = float(opts["val_fraction"] or 0.01)
    except ValueError:
        raise UserError(f"--val_fraction takes a number, got {opts['val_fraction']!r}.") from None
    plan_only = ("gpus", "gpu", "gpu_mem", "mfu", "tokens")
    if not flags["plan"] and any(opts[k] is not None for k in plan_only):
        raise UserError(f"--{next(k for k in plan_only if opts[k] is not None)} belongs to --plan.")
    for key in ("preset",) if flags["plan"] else ("preset", "data", "out"):
        if opts[key] is None:
            raise UserError(f"--{key} is required. Presets: {', '.join(PRESETS)}." if key == "preset"
                            else f"--{key} is required.")


def absolute(data):
    """--data / --val_data with its paths made absolute, for config.json (a Megatron blend keeps its weights)."""
    if data is None or os.path.isdir(data):
        return data and os.path.abspath(data)
    from dataprep.indexed import parse_blend
    return " ".join(("" if w is None else f"{w:g} ") + os.path.abspath(p) for w, p in parse_blend(data))


def save_record(out, cfg, opts, tokenizer_spec):
    """OUT/config.json: a record of the run for people (on resume the checkpoint's config is the one that counts)."""
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({"preset": opts["preset"], **asdict(cfg), "data": absolute(opts["data"]),
                   "val_data": absolute(opts["val_data"]), "tokenizer": tokenizer_spec}, f, indent=1)
