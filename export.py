"""Export a checkpoint as a Hugging Face model directory: `transformers` loads it with no custom code.

    python export.py --out out/tiny --to out/tiny-hf [--step N] [--dtype fp32|bf16|fp16]

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("out/tiny-hf"); tok = AutoTokenizer.from_pretrained("out/tiny-hf")

Yuan 1.0 is GPT-2's architecture (learned positions, pre-LayerNorm, biases, exact GELU, the head tied to the
embedding), so the directory holds a GPT2LMHeadModel:
    config.json                     GPT2Config (n_inner = ffn_hidden, activation "gelu", vocabulary padded as trained)
    model.safetensors               the weights (model-0000k-of-0000n.safetensors + an index above 4 GB)
    tokenizer.json, tokenizer_config.json   the same byte-level BPE as the run's tiktoken file, the same ids (bert:
                                    its WordPiece; yuan:, which needs jieba, exports vocab.txt instead)
Two layouts differ. nn.Linear stores [out, in] and GPT-2's Conv1D [in, out]: every matrix is transposed. And our
fused QKV groups its output rows per head, [q_h | k_h | v_h] for h = 0..H-1 (so that a tensor-parallel shard is
whole heads), where GPT-2 wants [q_0..q_H-1 | k_0..k_H-1 | v_0..v_H-1]: the rows are permuted. Any checkpoint layout
(tensor-parallel shards) is merged first (run/checkpoint.py consolidated). Needs `safetensors`, not `transformers`.
"""
import argparse
import json
import os
import shutil
from dataclasses import asdict

from runtime.errors import require

require("torch")  # a clear hint when run outside .venv
import torch

from run.checkpoint import config_of, consolidated, run_tokenizer
from dataprep.tokenizer import copy_spec, hf_tokenizer
from runtime.errors import UserError
from runtime.mpi import run_or_abort

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHARD_BYTES = 4 * 2**30  # safetensors files of at most ~4 GB, as transformers writes them


def qkv_rows_to_gpt2(t, n_head):
    """[3C, ...] grouped per head ([q_h | k_h | v_h]) -> [3C, ...] grouped per kind ([q | k | v], heads inside)."""
    rest = t.shape[1:]
    return t.reshape(n_head, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def gpt2_state_dict(model, cfg):
    """Our parameter names and layouts -> GPT2LMHeadModel's (lm_head.weight is tied to wte and not stored)."""
    out = {"transformer.wte.weight": model["wte.weight"], "transformer.wpe.weight": model["wpe.weight"],
           "transformer.ln_f.weight": model["ln_f.weight"], "transformer.ln_f.bias": model["ln_f.bias"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            for kind in ("weight", "bias"):
                out[theirs + f"{ln}.{kind}"] = model[ours + f"{ln}.{kind}"]
        out[theirs + "attn.c_attn.weight"] = qkv_rows_to_gpt2(model[ours + "attn.qkv.weight"], cfg.n_head).t()
        out[theirs + "attn.c_attn.bias"] = qkv_rows_to_gpt2(model[ours + "attn.qkv.bias"], cfg.n_head)
        for name, mine in (("attn.c_proj", "attn.proj"), ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
            out[theirs + name + ".weight"] = model[ours + mine + ".weight"].t()  # Conv1D: [in, out]
            out[theirs + name + ".bias"] = model[ours + mine + ".bias"]
    return out


def gpt2_config(cfg, eot, dtype):
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.seq_len, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": cfg.ffn_hidden, "activation_function": "gelu", "layer_norm_epsilon": cfg.layernorm_eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "initializer_range": cfg.init_std,
            "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True, "bos_token_id": eot,
            "eos_token_id": eot, "torch_dtype": name, "dtype": name,  # transformers 4 reads torch_dtype, 5 dtype
            "nanoyuan_model_config": asdict(cfg)}  # the ModelConfig itself, for a way back


def write_weights(state, to, dtype):
    """safetensors, in files of at most SHARD_BYTES (with the index transformers reads when there are several)."""
    from safetensors.torch import save_file
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in state.items()}
    files, size = [[]], 0
    for name, t in state.items():
        if size and size + t.numel() * t.element_size() > SHARD_BYTES:
            files.append([])
            size = 0
        files[-1].append(name)
        size += t.numel() * t.element_size()
    names = ["model.safetensors"] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    umask = os.umask(0)
    os.umask(umask)
    for fname, keys in zip(names, files):
        save_file({k: state[k] for k in keys}, os.path.join(to, fname), metadata={"format": "pt"})
        os.chmod(os.path.join(to, fname), 0o666 & ~umask)  # safetensors writes 0600; readable like the other files
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: fname for fname, keys in zip(names, files) for k in keys}}
        with open(os.path.join(to, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1)
    return names


def export(out, to, step=None, dtype="fp32"):
    if os.path.exists(to) and not os.path.isdir(to):
        raise UserError(f"--to {to} is a file; the export is a directory.\nHINT: name a new directory.")
    if os.path.exists(to) and os.listdir(to):
        raise UserError(f"--to {to} exists and is not empty; nothing is overwritten.\nHINT: remove it or pick "
                        f"another directory.")
    try:
        import safetensors  # noqa: F401
    except ImportError:
        raise UserError("export.py writes safetensors files and the `safetensors` package is not installed.\n"
                        "HINT: .venv/bin/pip install safetensors") from None
    ckpt, where = consolidated(out, step)
    cfg = config_of(ckpt)
    enc, tok = run_tokenizer(out, ckpt)
    os.makedirs(to, exist_ok=True)
    names = write_weights(gpt2_state_dict(ckpt["model"], cfg), to, dtype)
    with open(os.path.join(to, "config.json"), "w") as f:
        json.dump(gpt2_config(cfg, tok["eot"], dtype), f, indent=1)
    with open(os.path.join(to, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok["eot"], "eos_token_id": tok["eot"]}, f, indent=1)
    kind = tok.get("kind", "tiktoken")
    if kind == "yuan":  # jieba has no tokenizer.json form: the vocabulary goes beside the weights
        shutil.copyfile(copy_spec(out, tok).partition(":")[2], os.path.join(to, "vocab.txt"))
        names.append("vocab.txt")
        print("note: the yuan: tokenizer (jieba, then Yuan's pieces) has no tokenizer.json form; vocab.txt is in the "
              "export: encode with nanoyuan's dataprep/tokenizer.py (YuanTokenizer) or Yuan 1.0's EncDecTokenizer.")
    else:
        hf = hf_tokenizer(enc, tok["eot"]) if kind == "tiktoken" else enc.exported()  # dataprep/tokenizer.py
        hf.save(os.path.join(to, "tokenizer.json"))
        eot_text = enc.decode([tok["eot"]])
        with open(os.path.join(to, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.seq_len,
                       "bos_token": eot_text, "eos_token": eot_text, "unk_token": "[UNK]" if kind == "bert" else None,
                       "clean_up_tokenization_spaces": False, "add_prefix_space": False}, f, indent=1)
        names += ["tokenizer.json", "tokenizer_config.json"]
    print(f"exported {where} (step {ckpt['step']}) to {to}: GPT2LMHeadModel, {cfg.n_layer} layers, vocabulary "
          f"{cfg.vocab_size} ({tok['n_vocab']} tokens, {tok.get('name')}), {dtype}, {', '.join(names)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the training run's output directory")
    p.add_argument("--to", required=True, help="the Hugging Face model directory to write (new or empty)")
    p.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights' dtype (training keeps fp32)")
    args = p.parse_args(argv)
    run_or_abort(lambda: export(args.out, args.to, args.step, args.dtype))


if __name__ == "__main__":
    main()
