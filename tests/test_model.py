import pytest
import torch

from model import ModelConfig, UserError, Yuan, count_params
from run.config import PRESETS, Config, make_config


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_count_on_meta_device(name):
    cfg = make_config(name)
    with torch.device("meta"):
        model = Yuan(cfg)
    assert all(p.is_meta for p in model.parameters())  # nothing allocated
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)


def test_yuan_4_7b_is_the_asc22_model():
    cfg = make_config("yuan-4.7b")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.ffn_hidden, cfg.seq_len, cfg.vocab_size) == \
        (40, 3072, 24, 12288, 2048, 53248)
    assert count_params(cfg) == 4_701_321_216


def test_head_is_tied_and_init_follows_megatron():
    torch.manual_seed(0)
    cfg = Config(n_layer=4, n_embd=64, n_head=4, vocab_size=256, seq_len=16)
    model = Yuan(cfg)
    logits, _ = model(torch.zeros(1, 1, dtype=torch.long))
    assert logits.shape == (1, 1, 256)
    assert not any(n.startswith("lm_head") for n, _ in model.named_parameters())
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0 and model.ln_f.weight.eq(1).all()
    # Output projections are scaled down by 1/sqrt(2 * n_layer) (std 0.02 / sqrt(8) = 0.0071).
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / 8**0.5) < 0.002
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.002


def test_causal():
    """Changing a later token never changes the logits of an earlier position."""
    torch.manual_seed(0)
    model = Yuan(Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, seq_len=16)).eval()
    x = torch.randint(0, 128, (2, 16))
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % 128
    a, b = model(x)[0], model(y)[0]
    assert torch.allclose(a[:, :10], b[:, :10]) and not torch.allclose(a[:, 10:], b[:, 10:])


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = Yuan(Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, seq_len=32))
    x = torch.randint(0, 128, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(x[:, :-1], x[:, 1:])
        first = first or loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert first > 4.5 and loss.item() < 0.1


def test_generate_top_k_and_greedy():
    torch.manual_seed(0)
    model = Yuan(Config(n_layer=1, n_embd=32, n_head=2, vocab_size=128, seq_len=8)).eval()
    idx = torch.randint(0, 128, (2, 3))
    out = model.generate(idx, 12, temperature=0)  # longer than seq_len: the context is cropped
    assert out.shape == (2, 15) and out[:, :3].equal(idx)
    assert out.equal(model.generate(idx, 12, temperature=1.0, top_k=1))  # top-1 sampling is greedy
    torch.manual_seed(1)
    sampled = model.generate(idx, 12, temperature=1.0, top_k=5)
    assert sampled.shape == (2, 15)


def test_kv_cache_equals_recomputing():
    """Generation with the KV cache: the prompt's logits and each new token's equal a full forward's, and greedy
    decoding equals recomputing the context for every token, within the context window."""
    torch.manual_seed(0)
    model = Yuan(Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, seq_len=32)).eval()
    x = torch.randint(0, 128, (3, 20))
    cache = model.new_cache(3)
    with torch.no_grad():
        parts = [model(x[:, :12], cache=cache)[0]] + [model(x[:, t:t + 1], cache=cache)[0] for t in range(12, 20)]
        assert torch.allclose(torch.cat(parts, dim=1), model(x)[0], atol=1e-5)
    prompt = x[:, :6]
    cached = model.generate(prompt, 26, temperature=0)
    assert cached.shape == (3, 32) and cached.equal(model.generate(prompt, 26, temperature=0, use_cache=False))
    longer = model.generate(prompt, 60, temperature=0)  # past seq_len the cache starts again from seq_len / 2
    assert longer.shape == (3, 66) and longer[:, :32].equal(cached)
    stop = int(cached[0, 6])  # stopping: a row that produced stop_token repeats it; all rows done, generation ends
    out = model.generate(prompt, 26, temperature=0, stop_token=stop)
    done = (out[:, 6:] == stop).cumsum(dim=1) > 0
    assert (out[:, 6:][done] == stop).all() and (out.size(1) == 32 or done[:, -1].all())


def test_top_p_keeps_the_nucleus():
    from model import next_token
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    picked = next_token(logits, top_p=0.7, generator=gen)  # 0.5 < 0.7 <= 0.8: tokens 0 and 1 only
    assert set(picked.flatten().tolist()) == {0, 1}
    assert abs((picked == 0).float().mean().item() - 0.5 / 0.8) < 0.05
    assert next_token(logits[:1], top_p=0.01, generator=gen).item() == 0  # the likeliest token is always kept


@pytest.mark.parametrize("kwargs, message", [(dict(n_embd=100, n_head=3), "not divisible by n_head"),
                                             (dict(vocab_size=1000), "multiple of 128"),
                                             (dict(dtype="fp8"), "not one of"), (dict(n_layer=0), "at least 1"),
                                             (dict(n_embd=192, n_head=6, seq_len=100, tp=3,
                                                   sequence_parallel=True), "multiple of 3")])
def test_config_errors_say_what_to_change(kwargs, message):
    with pytest.raises(UserError, match=message):
        Config(**kwargs)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recompute_gives_the_same_gradients(dropout):
    """Selective and full recomputation change what is stored, not what is computed: same loss, same gradients,
    also with dropout (the recomputation replays the forward's random masks)."""
    def grads(recompute):
        cfg = make_config("tiny", n_layer=3, n_embd=64, n_head=4, seq_len=32, vocab_size=256, dropout=dropout)
        model = Yuan(cfg.model, recompute=recompute)
        x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(5)
        loss = model(x, x.roll(-1, 1))[1]
        loss.backward()
        return loss.item(), {n: p.grad for n, p in model.named_parameters()}
    loss, ref = grads("none")
    for recompute in ("selective", "full"):
        other_loss, other = grads(recompute)
        assert other_loss == loss and all(torch.equal(other[n], ref[n]) for n in ref)


def test_presets_are_a_network_and_a_recipe():
    """model.py's MODELS (the network of each preset) and run/config.py's RECIPES (how it is trained) name the same
    presets, each with fields of its own kind only: a checkpoint's model_config is a MODELS entry's kind of field."""
    from dataclasses import fields
    from model import MODELS
    from run.config import RECIPES, TrainConfig
    assert list(MODELS) == list(RECIPES) == list(PRESETS)
    network, run = {f.name for f in fields(ModelConfig)}, {f.name for f in fields(TrainConfig)}
    for name in MODELS:
        assert set(MODELS[name]) <= network and set(RECIPES[name]) <= run, name
        assert ModelConfig(**MODELS[name]) == make_config(name).model, name
