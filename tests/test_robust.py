"""Hostile inputs: malformed checkpoints, data files and flags each give exit status 2 and one `error:` line
naming the culprit (no traceback, no hang), and leave what was written before byte-identical. Plus the atomic
checkpoint switch, interrupted at every step."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import swarr
from support.safe_io import recover

torch.set_num_threads(2)


def cli(capsys, argv, main=swarr.main):
    """Run a command line in-process: (exit status, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_error(code, err, *culprits):
    """Exit 2 and one `error:` line naming the culprits (a checkpoint without a chat template may add its one
    `note:` line about the ChatML fallback before it)."""
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("note: ") or "chat template" not in ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    for c in culprits:
        assert c in lines[0], (c, lines[0])


def edit_json(path, fn):
    data = json.loads(path.read_text())
    data = fn(data) or data
    path.write_text(json.dumps(data))


def cfg_edit(**kw):
    """config.json mutation: set fields (None deletes them)."""
    def fn(d):
        for k, v in kw.items():
            if v is None:
                d.pop(k, None)
            else:
                d[k] = v
    return lambda ck: edit_json(ck / "config.json", fn)


def windowed_qwen(W):
    return cfg_edit(use_sliding_window=True, sliding_window=W, max_window_layers=0, layer_types=None)


def replace_file(name, make):
    def fn(ck):
        os.remove(ck / name)
        make(ck / name)
    return fn


def write_bytes(name, data):
    return lambda ck: (ck / name).write_bytes(data)


def tok_edit(fn):
    return lambda ck: edit_json(ck / "tokenizer.json", fn)


def dup_vocab_id(t):
    v = t["model"]["vocab"]
    a, b = sorted(v, key=v.get)[100:102]
    v[b] = v[a]


def drop_byte(t):
    v = t["model"]["vocab"]
    del v[next(k for k in v if k == "z")]


def shard(ck):
    json.dump({"metadata": {}, "weight_map": ["model.safetensors"]}, open(ck / "model.safetensors.index.json", "w"))


# (id, base checkpoint, mutation, words the error line must contain)
BAD_CHECKPOINTS = [
    ("config-list", "qwen", write_bytes("config.json", b"[1, 2]"), ["config.json", "JSON object"]),
    ("config-not-utf8", "qwen", write_bytes("config.json", b'{"a": "\xff\xfe"}'), ["config.json", "UTF-8"]),
    ("config-folder", "qwen", replace_file("config.json", os.mkdir), ["config.json", "not a regular file"]),
    ("config-symlink-loop", "qwen", replace_file("config.json", lambda p: os.symlink(p.name, p)), ["config.json"]),
    ("config-deep", "qwen", write_bytes("config.json", b"[" * 100000 + b"]" * 100000), ["config.json", "nested"]),
    ("hidden-string", "qwen", cfg_edit(hidden_size="64"), ["config.json", "hidden_size", "'64'"]),
    ("hidden-negative", "qwen", cfg_edit(hidden_size=-64), ["config.json", "hidden_size", "-64"]),
    ("heads-zero", "qwen", cfg_edit(num_attention_heads=0), ["config.json", "num_attention_heads"]),
    ("kv-heads-zero", "qwen", cfg_edit(num_key_value_heads=0), ["config.json", "num_key_value_heads"]),
    ("kv-heads-not-divisor", "qwen", cfg_edit(num_key_value_heads=3), ["config.json", "num_key_value_heads"]),
    ("layers-bool", "qwen", cfg_edit(num_hidden_layers=True), ["config.json", "num_hidden_layers"]),
    ("mlp-float", "qwen", cfg_edit(intermediate_size=127.5), ["config.json", "intermediate_size"]),
    ("vocab-missing", "qwen", cfg_edit(vocab_size=None), ["config.json", "vocab_size"]),
    ("head-dim-odd", "qwen", cfg_edit(head_dim=15), ["config.json", "head_dim"]),
    ("eps-string", "qwen", cfg_edit(rms_norm_eps="1e-6"), ["config.json", "rms_norm_eps"]),
    ("eps-nan", "qwen", cfg_edit(rms_norm_eps=float("nan")), ["config.json", "rms_norm_eps"]),
    ("theta-string", "qwen", cfg_edit(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}),
     ["config.json", "rope_theta"]),
    ("theta-top-level-string", "qwen", cfg_edit(rope_parameters=None, rope_theta="1e4"),
     ["config.json", "rope_theta"]),
    ("rope-linear-no-factor", "qwen", cfg_edit(rope_parameters=None, rope_scaling={"type": "linear"}),
     ["config.json", "rope_scaling", "factor"]),
    ("rope-llama3-partial", "qwen", cfg_edit(rope_parameters={"rope_type": "llama3", "factor": 8.0}),
     ["config.json", "rope_parameters", "low_freq_factor"]),
    ("rope-list", "qwen", cfg_edit(rope_parameters=None, rope_scaling=[1]), ["config.json", "rope_scaling"]),
    ("rope-yarn-huge-attention-factor", "qwen",
     cfg_edit(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "attention_factor": 1e30}),
     ["config.json", "rope_parameters", "attention_factor"]),
    ("arch-number", "qwen", cfg_edit(architectures=[5]), ["config.json", "architecture"]),
    ("eos-string", "qwen", cfg_edit(eos_token_id="2"), ["config.json", "eos_token_id"]),
    ("eos-past-vocab", "qwen", cfg_edit(eos_token_id=[2, 4096]), ["config.json", "eos_token_id"]),
    ("qwen-window-0", "qwen", windowed_qwen(0), ["config.json", "sliding_window", "0"]),
    ("qwen-window-true", "qwen", windowed_qwen(True), ["config.json", "sliding_window", "True"]),
    ("qwen-window-float", "qwen", windowed_qwen(40.5), ["config.json", "sliding_window", "40.5"]),
    ("qwen-window-huge", "qwen", windowed_qwen(10 ** 30), ["config.json", "sliding_window"]),
    ("theta-huge-int", "qwen", cfg_edit(rope_parameters={"rope_type": "default", "rope_theta": 10 ** 400}),
     ["config.json", "rope_theta"]),
    ("qwen-window-null", "qwen", windowed_qwen(None), ["config.json", "sliding_window"]),
    ("qwen-use-string", "qwen", cfg_edit(use_sliding_window="yes", sliding_window=8),
     ["config.json", "use_sliding_window"]),
    ("tie-string", "qwen", cfg_edit(tie_word_embeddings="false"), ["config.json", "tie_word_embeddings"]),
    ("qwen-max-window-layers", "qwen", cfg_edit(use_sliding_window=True, sliding_window=8, layer_types=None,
                                                max_window_layers=-1), ["config.json", "max_window_layers"]),
    ("layer-type-unknown", "qwen", cfg_edit(layer_types=["full_attention", "chunked_attention"]),
     ["config.json", "layer_types[1]", "chunked_attention"]),
    ("layers-huge", "qwen", cfg_edit(num_hidden_layers=10 ** 9, layer_types=None),
     ["config.json", "num_hidden_layers 1000000000 is not plausible"]),
    ("layers-more", "qwen", cfg_edit(num_hidden_layers=3, layer_types=None),
     ["config.json", "num_hidden_layers is 3, the weights hold 2 layers"]),
    ("hidden-huge", "qwen", cfg_edit(hidden_size=2 ** 24, intermediate_size=2 ** 24, head_dim=16),
     ["config.json", "GiB"]),
    ("model-is-a-file", "qwen", lambda ck: (shutil.rmtree(ck), ck.write_text("x")), ["ck", "not a folder"]),
    ("layer-types-short", "qwen", cfg_edit(layer_types=["full_attention"]), ["config.json", "layer_types"]),
    ("mistral-window-0", "mistral", cfg_edit(sliding_window=0), ["config.json", "sliding_window"]),
    ("mistral-window-neg", "mistral", cfg_edit(sliding_window=-1), ["config.json", "sliding_window"]),
    ("mistral-window-float", "mistral", cfg_edit(sliding_window=1.5), ["config.json", "sliding_window"]),
    ("mistral-window-string", "mistral", cfg_edit(sliding_window="8"), ["config.json", "sliding_window"]),
    ("index-list", "qwen", write_bytes("model.safetensors.index.json", b"[]"), ["index.json", "JSON object"]),
    ("index-map-list", "qwen", shard, ["index.json", "weight_map"]),
    ("index-non-string", "qwen", lambda ck: json.dump({"weight_map": {"lm_head.weight": 5}},
                                                      open(ck / "model.safetensors.index.json", "w")),
     ["index.json", "weight_map"]),
    ("weights-folder", "qwen", replace_file("model.safetensors", os.mkdir), ["model.safetensors"]),
    ("tok-list", "qwen", write_bytes("tokenizer.json", b"[]"), ["tokenizer.json", "JSON object"]),
    ("tok-not-utf8", "qwen", write_bytes("tokenizer.json", b"\xff"), ["tokenizer.json", "UTF-8"]),
    ("tok-vocab-list", "qwen", tok_edit(lambda t: t["model"].update(vocab=["a", "b"])), ["tokenizer.json", "vocab"]),
    ("tok-pre-no-type", "qwen", tok_edit(lambda t: t.update(pre_tokenizer={"add_prefix_space": False})),
     ["tokenizer.json", "pre_tokenizer", "type"]),
    ("tok-seq-no-type", "qwen", tok_edit(lambda t: t.update(pre_tokenizer={"type": "Sequence",
                                                                           "pretokenizers": [{}]})),
     ["tokenizer.json", "pre_tokenizer"]),
    ("tok-added-no-content", "qwen", tok_edit(lambda t: t["added_tokens"].append({"id": 450})),
     ["tokenizer.json", "content"]),
    ("tok-added-bad-id", "qwen", tok_edit(lambda t: t["added_tokens"].append({"id": "x", "content": "<x>"})),
     ["tokenizer.json", "<x>"]),
    ("tok-id-huge", "qwen", tok_edit(lambda t: t["model"]["vocab"].update(zz=2 ** 40)), ["tokenizer.json", "'zz'"]),
    ("tok-bad-regex", "qwen", tok_edit(lambda t: t.update(pre_tokenizer={
        "type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated", "invert": False})),
     ["tokenizer.json", "regex"]),
    ("tok-regex-empty-match", "qwen", tok_edit(lambda t: t.update(pre_tokenizer={
        "type": "Split", "pattern": {"Regex": "\\s*"}, "behavior": "Isolated", "invert": False})),
     ["tokenizer.json", "empty string"]),
    ("tok-split-no-pattern", "qwen", tok_edit(lambda t: t.update(pre_tokenizer={"type": "Split"})),
     ["tokenizer.json", "Split"]),
    ("tok-duplicate-ids", "qwen", tok_edit(dup_vocab_id), ["tokenizer.json", "given to both"]),
    ("tok-special-dup-id", "qwen", tok_edit(lambda t: t["added_tokens"].append({"id": 300, "content": "<x>"})),
     ["tokenizer.json", "given to both"]),
    ("tok-normalizer-list", "qwen", tok_edit(lambda t: t.update(normalizer=[1])), ["tokenizer.json", "normalizer"]),
    ("vocab-past-embedding", "qwen", tok_edit(lambda t: t["added_tokens"].append({"id": 700, "content": "<x>"})),
     ["tokenizer.json", "vocab_size", "700"]),
]


@pytest.fixture(scope="module")
def bases(ckpts):
    return {"qwen": ckpts["Qwen2ForCausalLM"], "mistral": ckpts["MistralForCausalLM"]}


@pytest.mark.parametrize("name,base,mutate,words", BAD_CHECKPOINTS, ids=[c[0] for c in BAD_CHECKPOINTS])
def test_bad_checkpoint_is_one_error_line(bases, tmp_path, capsys, name, base, mutate, words):
    ck = tmp_path / "ck"
    shutil.copytree(bases[base], ck)
    mutate(ck)
    code, err = cli(capsys, ["generate", "--model", str(ck), "--prompt", "hi", "--max-new-tokens", "2"])
    assert_one_error(code, err, *words)


def test_vocabulary_missing_a_single_byte(bases, tmp_path, capsys):
    """Real vocabularies (SmolLM2's) lack a few rare single bytes: the checkpoint loads and text without them
    works; a prompt that needs a missing byte is one error line, not an index past the embedding."""
    ck = tmp_path / "ck"
    shutil.copytree(bases["qwen"], ck)
    tok_edit(drop_byte)(ck)
    code, err = cli(capsys, ["generate", "--model", str(ck), "--prompt", "hi", "--max-new-tokens", "2"])
    assert code == 0, err
    code, err = cli(capsys, ["generate", "--model", str(ck), "--prompt", "zz", "--max-new-tokens", "2"])
    assert_one_error(code, err, "z")


def test_good_windows_still_load(bases, tmp_path):
    """The checks refuse only what cannot mean anything: real windows load as before."""
    ck = tmp_path / "ck"
    shutil.copytree(bases["qwen"], ck)
    windowed_qwen(8)(ck)
    assert swarr.load(str(ck))[0].windows == [8, 8]
    cfg_edit(use_sliding_window=False, sliding_window=131072)(ck)  # released Qwen: a window, switched off
    assert swarr.load(str(ck))[0].windows == [None, None]


def test_fifo_config_does_not_hang(bases, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(bases["qwen"], ck)
    os.remove(ck / "config.json")
    os.mkfifo(ck / "config.json")
    r = subprocess.run([sys.executable, swarr.__file__, "generate", "--model", str(ck), "--prompt", "x"],
                       capture_output=True, text=True, timeout=60)
    assert_one_error(r.returncode, r.stderr, "config.json", "not a regular file")


# ---- data files and flags of eval: the previous results stay byte-identical --------------------------------
def bad_data(tmp_path, name):
    p = tmp_path / name
    if name == "deep.jsonl":
        p.write_text('{"prompt": "a", "answer": "1"}\n' + "[" * 100000 + "]" * 100000 + "\n")
    elif name == "latin1.jsonl":
        p.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    elif name == "folder.jsonl":
        p.mkdir()
    elif name == "fifo.jsonl":
        os.mkfifo(p)
    return str(p)


BAD_EVAL = [  # (flags to change, words the error line must contain)
    (["--data", "deep.jsonl"], ["deep.jsonl:2", "nested"]),
    (["--data", "latin1.jsonl"], ["latin1.jsonl:2", "UTF-8"]),
    (["--data", "folder.jsonl"], ["folder.jsonl", "not a regular file"]),
    (["--data", "fifo.jsonl"], ["fifo.jsonl", "not a regular file"]),
    (["--temperature", "nan"], ["--temperature"]),
    (["--temperature", "inf"], ["--temperature"]),
    (["--seed", str(2 ** 70)], ["--seed"]),
    (["--seed", "-1"], ["--seed"]),
    (["--device", "bogus"], ["--device", "bogus"]),
    (["--device", "cuda:7"], ["--device", "cuda:7"]),
    (["--window", "0"], ["window"]),
    (["--batch-size", "-1"], ["--batch-size"]),
    (["--out", "FILE"], ["--out", "not a folder"]),
    (["--out", "FILE/sub"], ["--out", "not a folder"]),
    (["--out", "/proc/swarr-out"], ["--out", "cannot write"]),
    (["--max-new-tokens", "600"], ["passes the model's context (512 positions", "--max-new-tokens"]),
]


@pytest.fixture(scope="module")
def eval_run(ckpts, tmp_path_factory):
    """A finished eval: its data file and output folder (which every bad run below must leave as it is)."""
    d = tmp_path_factory.mktemp("eval")
    (d / "good.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) + "\n"
                                          for i in range(3)))
    (d / "FILE").write_text("a file, not a folder\n")
    base = ["eval", "--model", str(ckpts["Qwen2ForCausalLM"]), "--data", str(d / "good.jsonl"),
            "--out", str(d / "out"), "--max-new-tokens", "3"]
    swarr.main(base)
    return d, base


def snapshot(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))}


@pytest.mark.parametrize("change,words", BAD_EVAL, ids=[" ".join(c) for c, _ in BAD_EVAL])
def test_bad_eval_is_one_error_line_and_keeps_results(eval_run, tmp_path, capsys, change, words):
    d, base = eval_run
    before = snapshot(d / "out")
    capsys.readouterr()
    argv = list(base)
    flag, value = change
    if flag == "--data":
        value = bad_data(tmp_path, value)
    elif flag == "--out" and not value.startswith("/"):
        value = str(d / value)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    code, err = cli(capsys, argv)
    assert_one_error(code, err, *words)
    assert snapshot(d / "out") == before
    assert sorted(os.listdir(d)) == ["FILE", "good.jsonl", "out"]


def test_prompt_longer_than_the_context_and_huge_generations(ckpts, capsys, tmp_path):
    model, tok = swarr.load(str(ckpts["Qwen2ForCausalLM"]))
    with pytest.raises(swarr.SwarrError, match="prompt of 600 tokens is longer than the model's context \\(512"):
        swarr.generate(model, [[5] * 600], 4)
    with pytest.raises(swarr.SwarrError, match="GiB of KV cache"):
        swarr.generate(model, [[5] * 10], 10 ** 12)
    code, err = cli(capsys, ["generate", "--model", str(ckpts["Qwen2ForCausalLM"]), "--prompt", "a " * 2000,
                             "--raw", "--max-new-tokens", "2"])
    assert_one_error(code, err, "longer than the model's context")
    code, err = cli(capsys, ["generate", "--model", str(ckpts["Qwen2ForCausalLM"]), "--prompt", "hi",
                             "--max-new-tokens", str(10 ** 13)])
    assert_one_error(code, err, "--max-new-tokens")


# ---- the atomic checkpoint switch --------------------------------------------------------------------------
class Interrupt(BaseException):
    """Stands for a Ctrl-C or a crash at one step of save()."""


FAULT_POINTS = [(os, "rename"), (os, "replace"), (os, "symlink"), (os, "fsync"), (os, "mkdir"),
                (swarr, "save_file"), (shutil, "rmtree"), (os, "remove")]


def weights_of(path):
    model, _ = swarr.load(str(path))
    return model.state_dict()["model.embed_tokens.weight"].clone()


@pytest.mark.parametrize("plain_folder", [False, True], ids=["symlinked", "plain-folder"])
def test_save_interrupted_at_every_step_leaves_a_complete_checkpoint(ckpts, tmp_path, monkeypatch, plain_folder):
    """Interrupt the n-th file operation of save() for every n; at that instant the checkpoint must load and be
    the old or the new one; the next save cleans up and succeeds. `plain_folder`: the old checkpoint is a
    folder written by another tool (save must replace it by its symlink without a gap)."""
    model, tok = swarr.load(str(ckpts["LlamaForCausalLM"]))
    out = tmp_path / "ck"
    old = model.state_dict()["model.embed_tokens.weight"].clone()
    if plain_folder:
        shutil.copytree(ckpts["LlamaForCausalLM"], out)
    else:
        swarr.save(model, tok, str(out))
    new_model = swarr.load(str(ckpts["LlamaForCausalLM"]))[0]
    with torch.no_grad():
        new_model.model.embed_tokens.weight.add_(1.0)
    new = new_model.state_dict()["model.embed_tokens.weight"].clone()

    calls = []

    def counting(mod, name, real):
        def op(*a, **k):
            calls.append(name)
            if len(calls) == fail_at:
                raise Interrupt(f"{name} #{fail_at}")
            return real(*a, **k)
        return op

    fail_at, n, outcomes = 0, 1, set()
    for mod, name in FAULT_POINTS:
        monkeypatch.setattr(mod, name, counting(mod, name, getattr(mod, name)))
    while True:  # fail the 1st, 2nd, ... operation until a save runs through
        calls.clear()
        fail_at = n
        try:
            swarr.save(new_model, tok, str(out))
            finished = True
        except Interrupt:
            finished = False
        fail_at = 0
        w = weights_of(out)  # at this very instant (load finishes an interrupted switch if it has to)
        assert torch.equal(w, old) or torch.equal(w, new), f"interrupted at {calls[-1]} #{n}"
        outcomes.add("new" if torch.equal(w, new) else "old")
        if finished:
            break
        # restore the old checkpoint for the next round, through a save that is not interrupted
        if torch.equal(w, new):
            swarr.save(model, tok, str(out))
        n += 1
    assert n > 8 and outcomes == {"old", "new"}
    assert torch.equal(weights_of(out), new)
    left = sorted(os.listdir(tmp_path))  # nothing but the link and the folder it points to
    assert left == [os.readlink(out), "ck"] and left[0].startswith(".ck.v")


def test_recover_links_the_newest_version_and_cleans_leftovers(ckpts, tmp_path):
    model, tok = swarr.load(str(ckpts["LlamaForCausalLM"]))
    out = tmp_path / "ck"
    swarr.save(model, tok, str(out))
    os.remove(out)  # as if cut between moving a plain folder aside and linking
    os.mkdir(tmp_path / ".ck.tmp-999999999-abcd")  # a half-written folder of a dead process
    (tmp_path / ".ck.tmp-999999999-abcd" / "model.safetensors").write_bytes(b"partial")
    os.mkdir(tmp_path / f".ck.tmp-{os.getppid()}-abcd")  # a live process's save in progress: left alone
    recover(str(out))
    assert os.readlink(out) == ".ck.v1"
    assert sorted(os.listdir(tmp_path)) == [".ck.tmp-" + str(os.getppid()) + "-abcd", ".ck.v1", "ck"]
    swarr.load(str(out))
    import transformers  # the folder users name is `out`; transformers follows the symlink
    transformers.AutoConfig.from_pretrained(out)


def test_save_never_replaces_a_folder_that_is_not_a_checkpoint(ckpts, tmp_path):
    model, tok = swarr.load(str(ckpts["LlamaForCausalLM"]))
    other = tmp_path / "project"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(swarr.SwarrError, match="not a checkpoint folder"):
        swarr.save(model, tok, str(other))
    assert os.listdir(other) == ["notes.txt"] and os.listdir(tmp_path) == ["project"]
    for bad in ("", "/"):
        with pytest.raises(swarr.SwarrError, match="not a folder name"):
            swarr.save(model, tok, bad)


def test_save_into_an_existing_empty_folder(ckpts, tmp_path):
    """As transformers' save_pretrained: an empty folder holds nothing to lose, so save writes there (as its symlink)."""
    model, tok = swarr.load(str(ckpts["LlamaForCausalLM"]))
    out = tmp_path / "empty"
    out.mkdir()
    swarr.save(model, tok, str(out))
    assert os.path.islink(out) and sorted(os.listdir(tmp_path)) == [os.readlink(out), "empty"]
    assert torch.equal(swarr.load(str(out))[0].state_dict()["model.embed_tokens.weight"],
                       model.state_dict()["model.embed_tokens.weight"])
