"""export.py: a checkpoint trained at tp 2 becomes a Hugging Face GPT-2 directory that transformers loads with no
custom code; its logits, greedy generation and tokenizer ids equal ours."""
import json
import os
from dataclasses import asdict, replace

import pytest
import torch

from conftest import ROOT, SMALL, run
from helpers import mpi_train, needs_mpiexec

transformers = pytest.importorskip("transformers")
pytestmark = needs_mpiexec


def held_out_lines():
    """Chapters the fixture's tokenizer and model never saw (they are trained on the first 30)."""
    with open(os.path.join(ROOT, "corpus", "sanguo.txt"), encoding="utf-8") as f:
        return f.read().splitlines()[100:103]


MIXED = ("玄德曰：“Hello, world!” 孔明笑曰 🙂🎉👍🏽 naïve café — x_1 = 3.14e-2; 東京 ひらがな 한국어\n\n"
         "  two spaces\tand a tab <n> 第一回")


@pytest.fixture(scope="module")
def exported(prepared, tmp_path_factory):
    """A tp 2 run (seq_len 64, room for a 10-token prompt and 50 new tokens), exported."""
    base = tmp_path_factory.mktemp("export")
    mpi_train(2, *SMALL, "--seq_len", 64, "--data", prepared, "--out", base / "run", "--max_steps", 4, "--tp", 2)
    proc = run("export.py", "--out", base / "run", "--to", base / "hf")
    assert "and the other 1 shard(s), merged (step 4)" in proc.stdout
    return str(base / "run"), str(base / "hf")


@pytest.fixture(scope="module")
def ours(exported):
    from run.checkpoint import config_of, consolidated
    from model import Yuan
    from dataprep.tokenizer import load_tokenizer
    ckpt, _ = consolidated(exported[0])
    with open(os.path.join(exported[1], "config.json")) as f:  # the export carries the ModelConfig
        assert json.load(f)["nanoyuan_model_config"] == asdict(config_of(ckpt)) == ckpt["model_config"]
    model = Yuan(replace(config_of(ckpt), dropout=0.0))
    model.load_state_dict(ckpt["model"])
    return model.eval(), load_tokenizer(os.path.join(exported[0], "tokenizer.tiktoken"))[0]


def test_logits_and_greedy_generation_equal_ours(exported, ours):
    model, enc = ours
    hf = transformers.AutoModelForCausalLM.from_pretrained(exported[1]).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ids = torch.tensor([enc.encode_ordinary(line)[:64] for line in held_out_lines()])  # [3, 64]
    with torch.no_grad():
        mine, theirs = model(ids)[0], hf(ids).logits
    assert mine.shape == theirs.shape and (mine - theirs).abs().max().item() < 1e-4
    prompt = ids[:, :10]
    greedy = model.generate(prompt, 50, temperature=0)
    hf_greedy = hf.generate(prompt, max_new_tokens=50, do_sample=False, pad_token_id=enc.eot_token,
                            eos_token_id=None)
    assert greedy.shape == (3, 60) and torch.equal(greedy, hf_greedy)


def test_tokenizer_ids_equal_tiktoken(exported, ours):
    _, enc = ours
    tok = transformers.AutoTokenizer.from_pretrained(exported[1])
    with open(os.path.join(ROOT, "corpus", "sanguo.txt"), encoding="utf-8") as f:
        corpus = f.read().replace("<n>", "\n")
    for text in (corpus, MIXED, *held_out_lines()):
        ids = enc.encode_ordinary(text)
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok.decode(ids) == enc.decode(ids)
    assert tok.eos_token_id == enc.eot_token and tok.convert_ids_to_tokens(enc.eot_token) == "<|endoftext|>"


def test_bf16_export_and_refusals(exported, tmp_path):
    run("export.py", "--out", exported[0], "--to", tmp_path / "bf16", "--dtype", "bf16", "--step", 4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert hf.transformer.wte.weight.dtype == torch.bfloat16
    proc = run("export.py", "--out", exported[0], "--to", exported[1], check=False)  # already written
    assert proc.returncode != 0 and "is not empty; nothing is overwritten" in proc.stderr
    assert sorted(os.listdir(exported[1])) == ["config.json", "generation_config.json", "model.safetensors",
                                               "tokenizer.json", "tokenizer_config.json"]
