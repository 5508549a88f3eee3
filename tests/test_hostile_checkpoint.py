"""What a downloaded checkpoint's files can make us do, and the limits of generation: every file it names resolves
inside its folder; weights are floats and finite; RoPE numbers cannot divide by zero; a model whose logits overflow
is refused before any generation; a generation past the context, or a temperature that overflows, is refused or
greedy. Each case is one `error:` line (exit 2) or the documented result, never a traceback or a hang."""
import json
import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import swarr
from support import checkpoint
from test_robust import assert_one_error, cfg_edit, cli, edit_json

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def qwen(ckpts):
    return ckpts["Qwen2ForCausalLM"]


def copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def generate_cli(capsys, ck, *flags):
    return cli(capsys, ["generate", "--model", str(ck), "--prompt", "hi", "--max-new-tokens", "2", *flags])


# ---- containment: every file a checkpoint names resolves inside its folder ----------------------------------
def index_to(ck, target_of):
    """Rewrite the shard index so that the shard holding lm_head.weight is named by target_of(shard file)."""
    index = json.load(open(ck / "model.safetensors.index.json"))
    shard = index["weight_map"]["lm_head.weight"]
    new = target_of(ck / shard)
    index["weight_map"] = {n: new if f == shard else f for n, f in index["weight_map"].items()}
    json.dump(index, open(ck / "model.safetensors.index.json", "w"))


def move_out(shard):
    """Move a (valid) shard out of its folder, next to it: it would load, were it read."""
    dst = shard.parent.parent / ("outside-" + shard.name)
    shutil.move(shard, dst)
    return dst


ESCAPES = [  # (id, mutation of a copy of the sharded checkpoint)
    ("index-dotdot", lambda ck: index_to(ck, lambda s: "../" + move_out(s).name)),
    ("index-absolute", lambda ck: index_to(ck, lambda s: str(move_out(s)))),
    ("index-subfolder-dotdot", lambda ck: index_to(ck, lambda s: "sub/../../" + move_out(s).name)),
    ("index-nul", lambda ck: index_to(ck, lambda s: s.name + "\x00.txt")),
    ("shard-symlink-out", lambda ck: index_to(ck, lambda s: (os.symlink(move_out(s), ck / "link.safetensors"),
                                                            "link.safetensors")[1])),
    ("index-symlink-out", lambda ck: (shutil.move(ck / "model.safetensors.index.json", ck.parent / "index.json"),
                                      os.symlink(ck.parent / "index.json", ck / "model.safetensors.index.json"))),
]


@pytest.mark.parametrize("name,mutate", ESCAPES, ids=[e[0] for e in ESCAPES])
def test_sharded_checkpoint_never_reads_outside_its_folder(ckpts, tmp_path, capsys, name, mutate):
    ck = copy(ckpts["sharded"], tmp_path / "ck")
    mutate(ck)
    code, err = generate_cli(capsys, ck)
    assert_one_error(code, err, "outside the model folder" if name != "index-nul" else "not a usable file name")


def link_out(name):
    """Replace the file `name` by a symlink to an identical copy outside the folder."""
    def fn(ck):
        shutil.move(ck / name, ck.parent / ("outside-" + name))
        os.symlink(ck.parent / ("outside-" + name), ck / name)
    return fn


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                                  "generation_config.json"])
def test_a_file_linked_outside_the_folder_is_refused(qwen, tmp_path, capsys, name):
    ck = copy(qwen, tmp_path / "ck")
    if not (ck / name).exists():
        (ck / name).write_text("{}")
    link_out(name)(ck)
    code, err = generate_cli(capsys, ck)
    assert_one_error(code, err, name, "outside the model folder")


def test_chat_template_linked_outside_is_refused(qwen, tmp_path, capsys):
    ck = copy(qwen, tmp_path / "ck")
    (tmp_path / "secret.jinja").write_text("{{ messages[0]['content'] }}")
    os.symlink(tmp_path / "secret.jinja", ck / "chat_template.jinja")
    code, err = generate_cli(capsys, ck)
    assert_one_error(code, err, "chat_template.jinja", "outside the model folder")


def test_links_that_stay_inside_still_load(ckpts, qwen, tmp_path):
    """Symlinks are fine where they resolve inside: a folder linked from elsewhere, a file linked to another inside
    the folder, the index naming a subfolder, a saved checkpoint (out/model -> .model.vN)."""
    want = swarr.load(str(qwen))[0].state_dict()
    same = lambda m: all(torch.equal(m.state_dict()[k], v) for k, v in want.items())
    ck = copy(qwen, tmp_path / "real")
    os.symlink(ck, tmp_path / "alias")
    assert same(swarr.load(str(tmp_path / "alias"))[0])
    (ck / "weights").mkdir()
    shutil.move(ck / "model.safetensors", ck / "weights" / "w.safetensors")
    os.symlink("weights/w.safetensors", ck / "model.safetensors")
    assert same(swarr.load(str(ck))[0])
    model, tok = swarr.load(str(ck))
    model.save(tok, str(tmp_path / "out" / "model"))
    assert os.path.islink(tmp_path / "out" / "model") and same(swarr.load(str(tmp_path / "out" / "model"))[0])
    sh = copy(ckpts["sharded"], tmp_path / "sharded")
    want = swarr.load(str(sh))[0].state_dict()
    (sh / "sub").mkdir()
    index_to(sh, lambda s: (shutil.move(s, sh / "sub" / s.name), "sub/" + s.name)[1])
    assert same(swarr.load(str(sh))[0])


def test_hugging_face_hub_cache_snapshot_loads(qwen, tmp_path, capsys):
    """The hub cache keeps files in models--ORG--NAME/blobs/ and links them from snapshots/REV/: the snapshot loads;
    a link out of models--ORG--NAME does not."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in os.listdir(qwen):
        shutil.copy(qwen / f, repo / "blobs" / ("blob-" + f))
        os.symlink(os.path.join("..", "..", "blobs", "blob-" + f), snap / f)
    model, _ = swarr.load(str(snap))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 swarr.load(str(qwen))[0].state_dict().values()))
    os.remove(snap / "config.json")
    shutil.copy(qwen / "config.json", tmp_path / "hub" / "config.json")
    os.symlink(tmp_path / "hub" / "config.json", snap / "config.json")
    code, err = generate_cli(capsys, snap)
    assert_one_error(code, err, "config.json", "outside the model folder")


# ---- weights: floating point and finite, checked while they are copied in ------------------------------------
def rewrite_weights(fn):
    def mutate(ck):
        state = load_file(ck / "model.safetensors")
        fn(state)
        save_file(state, ck / "model.safetensors", metadata={"format": "pt"})
    return mutate


def poison(name, value):
    def fn(state):
        state[name] = state[name].clone()
        state[name].view(-1)[3] = value
    return fn


def retype(name, dtype):
    def fn(state):
        state[name] = state[name].to(dtype)
    return fn


BAD_WEIGHTS = [  # (id, mutation of the weights, words)
    ("nan", poison("model.layers.1.mlp.up_proj.weight", math.nan), ["model.layers.1.mlp.up_proj.weight", "NaN"]),
    ("inf", poison("model.embed_tokens.weight", math.inf), ["model.embed_tokens.weight", "NaN or inf"]),
    ("minus-inf", poison("model.norm.weight", -math.inf), ["model.norm.weight", "NaN or inf"]),
    ("int64", retype("model.layers.0.self_attn.q_proj.bias", torch.int64),
     ["model.layers.0.self_attn.q_proj.bias", "dtype I64"]),
    ("int8", retype("lm_head.weight", torch.int8), ["lm_head.weight", "dtype I8"]),
    ("bool", retype("model.norm.weight", torch.bool), ["model.norm.weight", "dtype BOOL"]),
    ("fp8", retype("model.layers.0.mlp.down_proj.weight", torch.float8_e4m3fn), ["down_proj", "F8_E4M3"]),
]


@pytest.mark.parametrize("name,mutate,words", BAD_WEIGHTS, ids=[b[0] for b in BAD_WEIGHTS])
def test_weights_that_are_not_finite_floats_are_refused(qwen, tmp_path, capsys, name, mutate, words):
    ck = copy(qwen, tmp_path / "ck")
    rewrite_weights(mutate)(ck)
    code, err = generate_cli(capsys, ck)
    assert_one_error(code, err, "model.safetensors", *words)


def test_float_weights_of_any_width_load(qwen, tmp_path):
    """float64, float16 and bfloat16 weights are weights: they load (converted to the --dtype)."""
    want = swarr.load(str(qwen))[0]
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        ck = copy(qwen, tmp_path / str(dtype))
        rewrite_weights(lambda s: s.update({k: v.to(dtype) for k, v in s.items()}))(ck)
        got = swarr.load(str(ck))[0]
        assert torch.allclose(got.lm_head.weight, want.lm_head.weight.to(dtype).float())


def test_large_finite_weights_pass_the_load_and_their_overflow_is_caught_by_the_probe(qwen, tmp_path, capsys):
    """Weights of 1e38 are finite (the float32 sum overflows; each element is checked then): they load, but the
    logits overflow, which the probe forward refuses before generate and eval."""
    ck = copy(qwen, tmp_path / "ck")
    rewrite_weights(lambda s: s.update({"model.norm.weight": torch.full_like(s["model.norm.weight"], 3e38)}))(ck)
    model, _ = swarr.load(str(ck))
    with pytest.raises(swarr.SwarrError, match="logits on a probe of 8 tokens are not finite"):
        checkpoint.check_logits(model, str(ck))
    code, err = generate_cli(capsys, ck)
    assert_one_error(code, err, str(ck), "not finite")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    code, err = cli(capsys, ["eval", "--model", str(ck), "--data", str(data), "--out", str(tmp_path / "out"),
                             "--max-new-tokens", "2"])
    assert_one_error(code, err, "not finite")
    assert not (tmp_path / "out").exists()


def test_logits_that_overflow_in_half_precision_are_refused(qwen, tmp_path, capsys):
    """Weights fine in float32 whose activations pass float16's range (65504): refused in --dtype float16 only."""
    ck = copy(qwen, tmp_path / "ck")
    rewrite_weights(lambda s: s.update({"model.norm.weight": s["model.norm.weight"] * 3e3,
                                        "lm_head.weight": s["lm_head.weight"] * 100}))(ck)  # logits ~1e5
    assert generate_cli(capsys, ck)[0] == 0
    code, err = generate_cli(capsys, ck, "--dtype", "float16")
    assert_one_error(code, err, "not finite", "float16")


# ---- RoPE numbers that would divide by zero or overflow ------------------------------------------------------
def yarn(**kw):
    return cfg_edit(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                                     "original_max_position_embeddings": 128, **kw})


BAD_ROPE = [
    ("yarn-theta-1", yarn(rope_theta=1.0), ["rope_theta", "above 1"]),
    ("yarn-theta-1-top-level", cfg_edit(rope_parameters=None, rope_theta=1,
                                        rope_scaling={"type": "yarn", "factor": 4.0}), ["rope_theta"]),
    ("theta-below-1", cfg_edit(rope_parameters={"rope_type": "default", "rope_theta": 0.5}), ["rope_theta"]),
    ("theta-past-float32", cfg_edit(rope_parameters={"rope_type": "default", "rope_theta": 1e39}), ["rope_theta"]),
    ("linear-factor-tiny", cfg_edit(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 1e-40}),
     ["rope_parameters", "factor"]),
    ("yarn-factor-below-1", yarn(factor=0.5), ["factor", "at least 1"]),
    ("llama3-factor-below-1", cfg_edit(rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 1e-39, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128}), ["factor"]),
    ("yarn-beta-tiny", yarn(beta_fast=1e-300, original_max_position_embeddings=2 ** 40), ["beta_fast"]),
    ("yarn-original-huge", yarn(original_max_position_embeddings=1e200), ["original_max_position_embeddings"]),
    ("max-pos-huge", cfg_edit(max_position_embeddings=10 ** 400), ["max_position_embeddings"]),
    ("yarn-max-pos-huge", cfg_edit(max_position_embeddings=10 ** 400, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), ["max_position_embeddings"]),
    ("yarn-mscale-huge", yarn(mscale=1e6, mscale_all_dim=1.0), ["attention_factor"]),
    ("yarn-mscale-zero", yarn(mscale=0, mscale_all_dim=1.0), ["mscale"]),
    ("partial-rotary", cfg_edit(partial_rotary_factor=0.5), ["partial_rotary_factor"]),
]


@pytest.mark.parametrize("name,mutate,words", BAD_ROPE, ids=[b[0] for b in BAD_ROPE])
def test_rope_numbers_that_cannot_mean_anything(qwen, tmp_path, capsys, name, mutate, words):
    ck = copy(qwen, tmp_path / "ck")
    mutate(ck)
    code, err = generate_cli(capsys, ck)
    assert_one_error(code, err, "config.json", *words)


@pytest.mark.parametrize("rope", [
    {"factor": 4.0, "mscale": 0.707, "mscale_all_dim": 1.0},  # DeepSeek-style attention factor
    {"factor": 4.0, "original_max_position_embeddings": 10 ** 11},  # lo past the head: HF's ramp runs backwards
    {"factor": 2.0, "original_max_position_embeddings": 3, "truncate": False},  # hi below 0
    {"factor": 4.0, "beta_fast": 8.0, "beta_slow": 2.0},
])
def test_yarn_frequencies_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from conftest import hf_config
    params = {"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 128, **rope}
    hf = hf_config("Qwen2ForCausalLM", rope_parameters=params)
    hf.architectures = ["Qwen2ForCausalLM"]
    want_inv, want_scale = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    inv, scale = swarr.rope_frequencies(swarr.Config.from_hf(hf.to_dict()))
    assert torch.equal(inv, want_inv.float()) and scale == pytest.approx(want_scale, rel=1e-12)


# ---- generation: the context bounds prompt + new tokens, before anything is allocated ----------------------------
def test_generation_past_the_context_is_refused_before_allocating(qwen, monkeypatch):
    model, _ = swarr.load(str(qwen))  # max_position_embeddings 512, full attention
    swarr.check_generation(model, [[5] * 10], 502)  # 512 positions: fits
    allocated = []
    monkeypatch.setattr(swarr, "make_caches", lambda *a: allocated.append(a))
    with pytest.raises(swarr.SwarrError, match=r"prompt of 10 tokens \+ 503 new tokens passes the model's context "
                                               r"\(512 positions, max_position_embeddings\): lower --max-new-tokens "
                                               r"to at most 502"):
        swarr.generate(model, [[5] * 10], 503)
    with pytest.raises(swarr.SwarrError, match="no room is left"):
        swarr.generate(model, [[5] * 512], 1)
    model.set_window(600)  # a window wider than the context reaches as far as full attention
    with pytest.raises(swarr.SwarrError, match="512 positions"):
        swarr.generate(model, [[5] * 10], 503)
    model.set_window(None).set_window(8, layers=[0])  # one full-attention layer left: still bounded by the context
    with pytest.raises(swarr.SwarrError, match="512 positions"):
        swarr.generate(model, [[5] * 10], 503)
    assert allocated == []


def test_an_all_window_model_generates_past_max_position_embeddings(qwen):
    """Every window inside the context: relative distances stay below W however long the generation, so only
    float32 positions (2**24) bound it; the caches hold W slots."""
    model, _ = swarr.load(str(qwen))
    model.set_window(8)
    g = swarr.generate(model, [[5] * 10], 600)
    assert g.tokens.shape == (1, 600) and all(c.slots == 8 for c in g.caches)
    with pytest.raises(swarr.SwarrError, match=r"16777216 positions, 2\*\*24"):
        swarr.check_generation(model, [[5] * 10], 2 ** 24)


def test_generate_a_billion_tokens_is_one_line_at_once(qwen, capsys):
    for flags in ([], ["--window", "8"]):
        t = time.time()
        code, err = generate_cli(capsys, qwen, "--max-new-tokens", "1000000000", *flags)
        assert_one_error(code, err, "--max-new-tokens")
        assert time.time() - t < 30


def test_eval_refuses_a_prompt_past_the_context_before_generating(qwen, tmp_path, capsys, monkeypatch):
    """The longest prompt of the whole data set is checked first: a long prompt sorted last does not stop the eval
    after the short ones have run."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "2"}) + "\n" for p in ["1+1=", "a " * 300]))
    calls = []
    real = swarr.generate
    monkeypatch.setattr(swarr.Transformer, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, err = cli(capsys, ["eval", "--model", str(qwen), "--data", str(data), "--out", str(tmp_path / "out"),
                             "--max-new-tokens", "300", "--raw", "--batch-size", "1"])
    assert_one_error(code, err, "passes the model's context", "lower --max-new-tokens")
    assert calls == [] and not (tmp_path / "out").exists()


# ---- sampling at a temperature so small that logits / T overflows ---------------------------------------------
def test_tiny_temperature_is_greedy():
    logits = torch.tensor([[1.0, 3.0, -2.0, 2.9], [0.5, -1.0, 0.4, 0.0], [-5.0, -4.0, -4.5, -6.0]])
    gen = torch.Generator().manual_seed(0)
    for T in (1e-40, 1e-300, 5e-324):
        for top_p in (1.0, 0.5):
            assert swarr.sample(logits, T, top_p, gen).tolist() == [1, 0, 1]
    masked = logits.clone()
    masked[:, 1] = -math.inf  # a constrained step: the masked token never comes back
    assert swarr.sample(masked, 1e-40, 1.0, gen).tolist() == [3, 0, 2]
    broken = logits.clone()
    broken[1, 2] = math.nan  # logits that are NaN have nothing to sample: one line, not a multinomial crash
    for T in (1e-40, 0.7, 1.0):
        with pytest.raises(swarr.SwarrError, match="logits are NaN"):
            swarr.sample(broken, T, 1.0, gen)


def test_ordinary_temperatures_sample_as_before():
    """Rows that do not overflow are sampled exactly as softmax(logits / T) with multinomial: bit-identical."""
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 4
    for T in (0.1, 0.6, 1.0, 3.0):
        want = torch.multinomial(torch.softmax(logits / T, -1), 1, generator=torch.Generator().manual_seed(7))[:, 0]
        assert torch.equal(swarr.sample(logits, T, 1.0, torch.Generator().manual_seed(7)), want)


def test_generate_with_a_tiny_temperature_equals_greedy(qwen):
    model, _ = swarr.load(str(qwen))
    greedy = swarr.generate(model, [[5, 6, 7], [8, 9]], 12).tokens
    assert torch.equal(swarr.generate(model, [[5, 6, 7], [8, 9]], 12, temperature=1e-40, seed=3).tokens, greedy)
    r = subprocess.run([sys.executable, swarr.__file__, "generate", "--model", str(qwen), "--prompt", "hi",
                        "--max-new-tokens", "6", "--temperature", "1e-40"], capture_output=True, text=True,
                       timeout=120)
    g = subprocess.run([sys.executable, swarr.__file__, "generate", "--model", str(qwen), "--prompt", "hi",
                        "--max-new-tokens", "6"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr and r.stdout == g.stdout and g.stdout, r.stderr
