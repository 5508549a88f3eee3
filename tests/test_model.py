"""swarr.py's model against transformers: logits, windows, generation with the ring buffer, I/O, errors."""
import json
import os
import shutil

import pytest
import torch

import swarr
from conftest import ARCHS, SPECIALS, make_checkpoint

torch.set_num_threads(2)


def hf_logits(path, idx, **override):
    import transformers
    cfg = transformers.AutoConfig.from_pretrained(path, **override)
    cfg._attn_implementation = "eager"
    m = transformers.AutoModelForCausalLM.from_pretrained(path, config=cfg).eval()
    with torch.no_grad():
        return m(idx).logits


@pytest.mark.parametrize("name", ARCHS + ["sharded", "tied"])
def test_logits_match_transformers(ckpts, name):
    model, _ = swarr.load(str(ckpts[name]))
    idx = torch.randint(0, 400, (2, 40), generator=torch.Generator().manual_seed(0))
    ref = hf_logits(ckpts[name], idx)
    with torch.no_grad():
        diff = (model(idx) - ref).abs().max().item()
    print(f"{name}: max |logit diff| = {diff:.2e}")
    assert diff < 1e-4


def test_sharded_and_tied_are_what_they_claim(ckpts):
    assert os.path.exists(ckpts["sharded"] / "model.safetensors.index.json")
    model, _ = swarr.load(str(ckpts["tied"]))
    assert model.lm_head.weight is model.model.embed_tokens.weight


W = 8


@pytest.mark.parametrize("arch", ["MistralForCausalLM", "Qwen2ForCausalLM"])
@pytest.mark.parametrize("T", [W - 1, W, W + 1, 2 * W + 3])
def test_windowed_logits_match_transformers(tmp_path_factory, arch, T):
    path = tmp_path_factory.mktemp("win")
    kw = dict(sliding_window=W) if arch.startswith("Mistral") else dict(sliding_window=W, use_sliding_window=True,
                                                                          max_window_layers=0)
    make_checkpoint(path, arch, seed=3, **kw)
    model, _ = swarr.load(str(path))
    assert model.windows == [W, W]
    idx = torch.randint(0, 400, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        ours = model(idx)
        full = model.set_window(None)(idx)
    ref = hf_logits(path, idx)
    assert (ours - ref).abs().max().item() < 1e-4
    if T > W:  # the window really changes the result beyond W
        assert (full[:, W:] - ref[:, W:]).abs().max().item() > 1e-3
    assert (full[:, :W] - ref[:, :W]).abs().max().item() < 1e-4


def naive_greedy(model, prompt, n, eos=()):
    """Greedy decoding by recomputing the whole sequence with the windowed mask at every step."""
    seq = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            tok = int(model(torch.tensor([seq]))[0, -1].argmax())
        seq.append(tok)
        if tok in eos:
            break
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def win_model(ckpts):
    model, _ = swarr.load(str(ckpts["Qwen2ForCausalLM"]))
    return model.set_window(5, layers=[0])  # a mixed model: layer 0 windowed, layer 1 full


@pytest.mark.parametrize("plen", [1, 4, 5, 6, 13])
def test_ring_buffer_greedy_equals_recompute(win_model, plen):
    prompt = torch.randint(3, 400, (plen,), generator=torch.Generator().manual_seed(plen)).tolist()
    g = swarr.generate(win_model, [prompt], 17)           # prompt + output cross W=5 several times
    assert g.tokens[0].tolist() == naive_greedy(win_model, prompt, 17)


def test_batch_of_different_lengths_and_group_samples(win_model):
    prompts = [torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (2, 9, 5)]
    g = swarr.generate(win_model, prompts, 12)
    for r, p in enumerate(prompts):
        assert g.tokens[r].tolist() == naive_greedy(win_model, p, 12)
    g2 = swarr.generate(win_model, prompts[:2], 12, n_samples=3)  # one prefill, cloned into 3 rows each
    assert g2.tokens.shape[0] == 6
    for r in range(6):
        assert g2.tokens[r].tolist() == g.tokens[r // 3].tolist()


def test_sampling_is_seeded_and_groups_differ(win_model):
    a = swarr.generate(win_model, [[5, 6, 7]], 10, temperature=1.0, n_samples=4, seed=1)
    b = swarr.generate(win_model, [[5, 6, 7]], 10, temperature=1.0, n_samples=4, seed=1)
    assert torch.equal(a.tokens, b.tokens)
    assert len({tuple(r) for r in a.tokens.tolist()}) > 1
    c = swarr.generate(win_model, [[5, 6, 7]], 10, temperature=1.0, top_p=1e-6, n_samples=2, seed=2)
    assert c.tokens.tolist() == [swarr.generate(win_model, [[5, 6, 7]], 10).tokens[0].tolist()] * 2  # top-p -> argmax


def test_stops_on_eos(win_model):
    prompt = [7, 8, 9]
    free = naive_greedy(win_model, prompt, 10)
    eos = free[3]
    g = swarr.generate(win_model, [prompt, [10, 11]], 10, eos_ids=[eos])
    assert g.tokens[0, :int(g.lengths[0])].tolist() == free[:free.index(eos) + 1]
    assert bool(g.stopped[0])


def test_swa_cache_holds_exactly_w_slots(win_model):
    g = swarr.generate(win_model, [list(range(3, 40))], 50)  # prompt longer than W, long generation
    sw, full = g.caches
    assert sw.k.shape == (1, 2, 5, 16) and sw.v.shape == (1, 2, 5, 16)
    assert full.k.shape[2] == 37 + 50
    assert int(sw.valid()[0]) == 5


@pytest.mark.parametrize("W", [1, 4, 7])
@pytest.mark.parametrize("n", [1, 3, 4, 5, 8, 11])  # for W = 4: W-1, W, W+1, 2W, 2W+3; W = 7: W >= n mostly
def test_cache_write_keeps_the_last_w_keys(W, n):
    """A prompt of n keys in one write, then 3 one-token writes: slot p % W holds position p's key for the last
    W positions (a full cache holds every position in order), and valid counts min(positions, slots)."""
    keys = torch.randn(1, 2, n + 3, 4)
    ring = swarr.KVCache(1, 2, 4, W, W, torch.float32, "cpu")
    full = swarr.KVCache(1, 2, 4, n + 3, None, torch.float32, "cpu")
    for c in (ring, full):
        c.write(keys[:, :, :n], -keys[:, :, :n])
        for p in range(n, n + 3):
            c.write(keys[:, :, p:p + 1], -keys[:, :, p:p + 1])
        assert int(c.pos[0]) == n + 3 and int(c.valid()[0]) == min(n + 3, c.slots)
        for p in range(max(0, n + 3 - c.slots), n + 3):
            assert torch.equal(c.k[0, :, p % c.slots], keys[0, :, p]) and torch.equal(c.v[0, :, p % c.slots], -keys[0, :, p])
    with pytest.raises(swarr.SwarrError, match="does not fit"):
        swarr.KVCache(1, 2, 4, n, None, torch.float32, "cpu").write(keys, keys)


@pytest.mark.parametrize("W", [1, 3, 64])
def test_prefill_and_decode_are_the_forward(W):
    """Prompts of W-1 .. 2W+3 tokens (ragged, one cache batch), prefilled and then decoded through
    Transformer.forward with caches, give the logits of one forward over the whole sequence. GQA, a windowed and a
    full layer, float64."""
    torch.manual_seed(W)
    cfg = swarr.Config(arch="LlamaForCausalLM", vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=8, hidden_dim=48, windows=[W, None])
    model = swarr.Transformer(cfg).double().eval()
    lengths = sorted({max(1, n) for n in (W - 1, W, W + 1, 2 * W, 2 * W + 3)})
    seqs = torch.randint(0, 50, (len(lengths), max(lengths) + 4))
    caches = swarr.make_caches(model, len(lengths), seqs.shape[1])
    last = swarr.prefill(model, [seqs[r, :n].tolist() for r, n in enumerate(lengths)], caches)
    with torch.no_grad():
        full = [model(seqs[r:r + 1])[0] for r in range(len(lengths))]
        assert max((last[r] - full[r][n - 1]).abs().max() for r, n in enumerate(lengths)) < 1e-10
        for t in range(4):  # every row decodes one token at its own position
            tok = torch.stack([seqs[r, n + t] for r, n in enumerate(lengths)])
            step = model(tok[:, None], caches=caches)[:, 0]
            assert max((step[r] - full[r][n + t]).abs().max() for r, n in enumerate(lengths)) < 1e-10
        assert [int(p) for p in caches[0].pos] == [n + 4 for n in lengths]
        assert caches[0].slots == min(W, seqs.shape[1])
        with pytest.raises(swarr.SwarrError, match="empty caches"):  # several tokens continue no cache
            model(seqs[:, :2], caches=caches)


def test_tokenizer_matches_tokenizers_library(ckpts):
    from tokenizers import Tokenizer
    path = str(ckpts["LlamaForCausalLM"] / "tokenizer.json")
    ref, ours = Tokenizer.from_file(path), swarr.Tokenizer(path)
    texts = ["Hello world", "unicode: café naïve 東京 🙂 ñ", "digits 1234567 3.14159 -42", "  many   spaces\n\n\n\t end ",
             f"{SPECIALS[1]}user\nhi{SPECIALS[2]}\n", "x^2+2x+1=(x+1)^2 \\boxed{84}", "'s 're don't", ""]
    for t in texts:
        ids = ref.encode(t).ids
        assert ours.encode(t) == ids, t
        assert ours.decode(ids) == t


def test_save_load_roundtrip_and_transformers_reads_windows(ckpts, tmp_path):
    for arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"):
        model, tok = swarr.load(str(ckpts[arch]))
        model.set_window(6)
        out = tmp_path / arch
        swarr.save(model, tok, str(out))
        again, _ = swarr.load(str(out))
        assert again.windows == [6, 6]
        for (n, p), (n2, p2) in zip(model.state_dict().items(), again.state_dict().items()):
            assert n == n2 and torch.equal(p, p2)
        cfg = json.load(open(out / "config.json"))
        if arch == "LlamaForCausalLM":
            assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["sliding_window"] == 6
        else:
            assert cfg["use_sliding_window"] and cfg["max_window_layers"] == 0
        idx = torch.randint(0, 400, (1, 20))
        with torch.no_grad():
            assert (model(idx) - hf_logits(out, idx)).abs().max().item() < 1e-4


def test_partial_window_export_is_refused(ckpts, tmp_path):
    """Some layers windowed, some not: no HF form that transformers and vLLM both run (tests/test_export.py)."""
    for arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM"):
        model, tok = swarr.load(str(ckpts[arch]))
        with pytest.raises(swarr.SwarrError, match="1 of 2 layers cannot be exported.*window all layers"):
            swarr.save(model.set_window(4, layers=[1]), tok, str(tmp_path / "bad"))
        assert not (tmp_path / "bad").exists()


def test_bfloat16_load(ckpts):
    model, _ = swarr.load(str(ckpts["Qwen3ForCausalLM"]), dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_rope_frequencies_are_a_float32_buffer(ckpts):
    """RoPE's inverse frequencies: a buffer, not saved (HF computes its own), float32 whatever dtype the model is
    cast to, and real numbers in a model built on the meta device (Transformer.empty, as load does)."""
    cfg = swarr.Config(arch="LlamaForCausalLM", vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                       head_dim=8, hidden_dim=48, rope={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8})
    inv = swarr.rope_frequencies(cfg)[0]
    assert inv.dtype == torch.float32
    model = swarr.Transformer(cfg)
    assert "_inv_freq" in dict(model.named_buffers()) and "_inv_freq" not in model.state_dict()
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        assert torch.equal(cast(model)._inv_freq, inv)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(swarr.Transformer.empty(cfg, "cpu", dtype)._inv_freq, inv)
    loaded, _ = swarr.load(str(ckpts["Qwen3ForCausalLM"]), dtype="bfloat16")
    assert torch.equal(loaded._inv_freq, swarr.rope_frequencies(loaded.cfg)[0])


def test_save_is_atomic(ckpts, tmp_path, monkeypatch):
    model, tok = swarr.load(str(ckpts["LlamaForCausalLM"]))
    out = tmp_path / "ck"
    swarr.save(model, tok, str(out))
    before = (out / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(swarr, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        swarr.save(model.set_window(3), tok, str(out))
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [".ck.v1", "ck"]  # no temporary folder left behind
    assert os.readlink(out) == ".ck.v1"  # ck is a symlink to the complete folder


def test_saved_folder_has_the_usual_permissions(ckpts, tmp_path):
    """The atomic save goes through a private temporary folder; the result must not stay private (0700)."""
    model, tok = swarr.load(str(ckpts["LlamaForCausalLM"]))
    old = os.umask(0o022)
    try:
        swarr.save(model, tok, str(tmp_path / "ck"))
    finally:
        os.umask(old)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "ck" / "config.json").stat().st_mode & 0o777 == 0o644


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_inputs(ckpts, tmp_path):
    E = swarr.SwarrError
    with pytest.raises(E, match="not found"):
        swarr.load(str(tmp_path / "nope"))
    d = copy_ckpt(ckpts["LlamaForCausalLM"], tmp_path / "notok")
    os.remove(d / "tokenizer.json")
    with pytest.raises(E, match="tokenizer.json"):
        swarr.load(str(d))
    d = copy_ckpt(ckpts["LlamaForCausalLM"], tmp_path / "trunc")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(E, match="model.safetensors"):
        swarr.load(str(d))
    d = copy_ckpt(ckpts["sharded"], tmp_path / "shard")
    index = json.load(open(d / "model.safetensors.index.json"))
    os.remove(d / sorted(set(index["weight_map"].values()))[-1])
    with pytest.raises(E, match="missing"):
        swarr.load(str(d))
    d = copy_ckpt(ckpts["Qwen2ForCausalLM"], tmp_path / "shape")
    cfg = json.load(open(d / "config.json"))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(E, match=r"model.safetensors: tensor model.layers.0.mlp.\w+_proj.weight has shape"):
        swarr.load(str(d))
    cfg["intermediate_size"], cfg["architectures"] = 128, ["MixtralForCausalLM"]
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(E, match="MixtralForCausalLM.*supported: LlamaForCausalLM"):
        swarr.load(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(E, match="config.json"):
        swarr.load(str(d))
    model, _ = swarr.load(str(ckpts["Qwen3ForCausalLM"]))
    for bad in (0, -3, 2.5, "8", True):
        with pytest.raises(E, match="window"):
            model.set_window(bad)


def test_cli_generate_and_errors(ckpts, tmp_path):
    import subprocess
    import sys
    run = lambda *a: subprocess.run([sys.executable, str(swarr.__file__), *a], capture_output=True, text=True)
    r = run("generate", "--model", str(ckpts["Qwen2ForCausalLM"]), "--prompt", "Hello", "--window", "4",
            "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    r = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "not found" in r.stderr
    r = run("generate", "--model", str(ckpts["Qwen2ForCausalLM"]), "--prompt", "x", "--window", "0")
    assert r.returncode == 2 and "window" in r.stderr


def test_decode_skips_ids_without_a_token(ckpts):
    tok = swarr.Tokenizer(str(ckpts["LlamaForCausalLM"] / "tokenizer.json"))
    ids = tok.encode("hi there")
    assert tok.decode(ids[:1] + [tok.vocab_size + 5] + ids[1:]) == "hi there"  # a padded-embedding id is skipped
