"""gguf_convert.py against hostile GGUF files and faults: every metadata value it reads of the wrong type or out of
range, tensors that do not match the metadata, a vocabulary with a repeated token, two conversions into one folder,
a full disk or a file-size limit, Ctrl-C. Each is one `error:` line, and nothing is left behind: no output folder,
no temporary folder, no lock file."""
import errno
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_checkpoint

gguf = pytest.importorskip("gguf")
from support import gguf_convert  # noqa: E402
from test_gguf import finish, write_gguf  # noqa: E402

T = gguf.GGUFValueType
A = "llama"  # the architecture prefix of the tiny file's keys


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A valid GGUF file (tiny random Llama, grouped-query attention, F32 tensors)."""
    d = tmp_path_factory.mktemp("hostile")
    hf = make_checkpoint(d / "hf", "LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return write_gguf(d / "base.gguf", hf, d / "hf")


def rewrite(src, dst, set_=None, drop=(), tensors=None):
    """Copy the GGUF file src to dst with metadata keys set ({key: (value, GGUFValueType[, sub type])}) or dropped,
    and the tensors passed through tensors(list of (name, array)) -> list of (name, array)."""
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), str(r.fields["general.architecture"].contents()))
    for key, f in r.fields.items():
        if key.startswith("GGUF.") or key in drop:
            continue
        kind = f.types[0]
        w.add_key_value(key, f.contents(), kind, f.types[-1] if kind == T.ARRAY else None)
    for key, v in (set_ or {}).items():
        w.add_key_value(key, *v)
    items = [(t.name, np.array(t.data).reshape(tuple(int(d) for d in reversed(t.shape)))) for t in r.tensors]
    for name, a in (tensors(items) if tensors else items):
        w.add_tensor(name, a)
    return finish(w, dst)


def meta(path):
    return gguf_convert.metadata(gguf.GGUFReader(str(path)))


def refused(path, out, capsys, *words):
    """The command line on (path, out): exit status 2, one `error:` line holding `words`, and nothing written."""
    with pytest.raises(SystemExit) as e:
        gguf_convert.main([str(path), str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert leftovers(out) == [], leftovers(out)
    return err


def leftovers(out):
    """Whatever a conversion into `out` left: the folder itself, `.NAME.tmp-*`, `.NAME.lock`, `NAME.tmp*`."""
    parent, name = os.path.split(str(out))
    if not os.path.isdir(parent):
        return []
    return sorted(f for f in os.listdir(parent) if f == name or f.startswith((f".{name}.", f"{name}.")))


def tokens_with(path, i, text):
    toks = list(meta(path)["tokenizer.ggml.tokens"])
    toks[i] = text
    return toks


U32, I32, F32, STR, BOOL, U64, F64 = T.UINT32, T.INT32, T.FLOAT32, T.STRING, T.BOOL, T.UINT64, T.FLOAT64
# (case id, metadata set, words the error line must hold)
METADATA = [
    ("bos-string", {"tokenizer.ggml.bos_token_id": ("1", STR)}, ["bos_token_id", "must be a number"]),
    ("bos-out-of-range", {"tokenizer.ggml.bos_token_id": (10 ** 6, U32)}, ["bos_token_id", "past the vocabulary"]),
    ("eos-negative", {"tokenizer.ggml.eos_token_id": (-1, I32)}, ["eos_token_id", "integer >= 0"]),
    ("eos-float", {"tokenizer.ggml.eos_token_id": (2.0, F32)}, ["eos_token_id"]),
    ("eos-bool", {"tokenizer.ggml.eos_token_id": (True, BOOL)}, ["eos_token_id"]),
    ("padding-out-of-range", {"tokenizer.ggml.padding_token_id": (2 ** 31, U32)}, ["padding_token_id"]),
    ("unk-string", {"tokenizer.ggml.unknown_token_id": ("x", STR)}, ["unknown_token_id"]),
    ("heads-0", {f"{A}.attention.head_count": (0, U32)}, ["head_count", "integer >= 1"]),
    ("heads-not-dividing", {f"{A}.attention.head_count": (3, U32), f"{A}.attention.head_count_kv": (1, U32)},
     ["embedding_length (64)", "head_count (3)"]),
    ("heads-string", {f"{A}.attention.head_count": ("4", STR)}, ["head_count", "must be a number"]),
    ("kv-heads-0", {f"{A}.attention.head_count_kv": (0, U32)}, ["head_count_kv", "integer >= 1"]),
    ("kv-heads-not-dividing", {f"{A}.attention.head_count_kv": (3, U32)}, ["head_count (4)", "head_count_kv (3)"]),
    ("kv-heads-more", {f"{A}.attention.head_count_kv": (8, U32)}, ["head_count_kv (8)"]),
    ("eps-string", {f"{A}.attention.layer_norm_rms_epsilon": ("1e-5", STR)}, ["layer_norm_rms_epsilon"]),
    ("eps-nan", {f"{A}.attention.layer_norm_rms_epsilon": (math.nan, F32)}, ["layer_norm_rms_epsilon"]),
    ("eps-negative", {f"{A}.attention.layer_norm_rms_epsilon": (-1e-5, F32)}, ["layer_norm_rms_epsilon"]),
    ("eps-inf", {f"{A}.attention.layer_norm_rms_epsilon": (math.inf, F32)}, ["layer_norm_rms_epsilon"]),
    ("eps-zero", {f"{A}.attention.layer_norm_rms_epsilon": (0.0, F32)}, ["layer_norm_rms_epsilon"]),
    ("eps-underflows-float32", {f"{A}.attention.layer_norm_rms_epsilon": (1e-300, F64)}, ["rms_norm_eps"]),
    ("blocks-0", {f"{A}.block_count": (0, U32)}, ["block_count"]),
    ("blocks-string", {f"{A}.block_count": ("2", STR)}, ["block_count"]),
    ("blocks-huge", {f"{A}.block_count": (10 ** 9, U64)}, ["block_count", "not plausible"]),
    ("blocks-one-more", {f"{A}.block_count": (3, U32)}, ["block_count is 3", "tensors of 2 blocks"]),
    ("blocks-one-fewer", {f"{A}.block_count": (1, U32)}, ["blk.1.", "block_count is 1"]),
    ("context-0", {f"{A}.context_length": (0, U32)}, ["context_length"]),
    ("context-float", {f"{A}.context_length": (2048.5, F32)}, ["context_length"]),
    ("context-huge", {f"{A}.context_length": (2 ** 60, U64)}, ["context_length", "not plausible"]),
    ("rope-base-0", {f"{A}.rope.freq_base": (0.0, F32)}, ["rope.freq_base"]),
    ("rope-base-nan", {f"{A}.rope.freq_base": (math.nan, F32)}, ["rope.freq_base"]),
    ("rope-base-negative", {f"{A}.rope.freq_base": (-10000.0, F32)}, ["rope.freq_base"]),
    ("rope-base-string", {f"{A}.rope.freq_base": ("10000", STR)}, ["rope.freq_base"]),
    ("rope-scaling-array", {f"{A}.rope.scaling.type": ([1, 2], T.ARRAY, I32)}, ["rope.scaling.type"]),
    ("embedding-0", {f"{A}.embedding_length": (0, U32)}, ["embedding_length"]),
    ("embedding-huge", {f"{A}.embedding_length": (2 ** 24, U32)}, ["token_embd.weight", "shape"]),
    ("ffn-string", {f"{A}.feed_forward_length": ("96", STR)}, ["feed_forward_length"]),
    ("ffn-per-layer", {f"{A}.feed_forward_length": ([96, 96], T.ARRAY, U32)}, ["per-layer"]),
    ("key-length-0", {f"{A}.attention.key_length": (0, U32)}, ["key_length"]),
    ("key-length-odd", {f"{A}.attention.key_length": (15, U32)}, ["head_dim must be even"]),
    ("rope-dims-partial", {f"{A}.rope.dimension_count": (8, U32)}, ["rope.dimension_count (8)"]),
    ("value-length-other", {f"{A}.attention.value_length": (32, U32)}, ["value_length (32)"]),
    ("window-huge", {f"{A}.attention.sliding_window": (2 ** 40, U64)}, ["sliding_window"]),
    ("window-string", {f"{A}.attention.sliding_window": ("8", STR)}, ["sliding_window"]),
    ("arch-int", {"general.architecture": (7, U32)}, ["architecture 7"]),
    ("tokenizer-pre-array", {"tokenizer.ggml.pre": (["gpt-2"], T.ARRAY, STR)}, ["tokenizer.ggml.pre"]),
    ("add-bos-string", {"tokenizer.ggml.add_bos_token": ("false", STR)}, ["add_bos_token", "true or false"]),
    ("chat-template-int", {"tokenizer.chat_template": (5, U32)}, ["chat_template", "a string"]),
    ("tokens-ints", {"tokenizer.ggml.tokens": (list(range(300)), T.ARRAY, I32)}, ["tokenizer.ggml.tokens"]),
    ("tokens-string", {"tokenizer.ggml.tokens": ("abc", STR)}, ["tokenizer.ggml.tokens"]),
    ("token-types-short", {"tokenizer.ggml.token_type": ([1, 1, 1], T.ARRAY, I32)}, ["token_type"]),
    ("token-types-strings", {"tokenizer.ggml.token_type": (["x"] * 300, T.ARRAY, STR)}, ["token_type"]),
    ("merges-ints", {"tokenizer.ggml.merges": ([1, 2], T.ARRAY, I32)}, ["merges"]),
    ("merge-without-space", {"tokenizer.ggml.merges": (["ab"], T.ARRAY, STR)}, ["merges", "'ab'"]),
    ("merge-three-parts", {"tokenizer.ggml.merges": (["a b c"], T.ARRAY, STR)}, ["merges"]),
]


@pytest.mark.parametrize("case", METADATA, ids=[c[0] for c in METADATA])
def test_metadata_types_and_ranges_are_one_line(base, tmp_path, capsys, case):
    name, set_, words = case
    path = rewrite(base, tmp_path / f"{name}.gguf", set_)
    refused(path, tmp_path / "out", capsys, str(path), *words)


@pytest.mark.parametrize("key", [f"{A}.block_count", f"{A}.embedding_length", f"{A}.attention.head_count",
                                 f"{A}.attention.layer_norm_rms_epsilon", f"{A}.context_length",
                                 f"{A}.feed_forward_length", "tokenizer.ggml.tokens"])
def test_missing_metadata_is_one_line(base, tmp_path, capsys, key):
    path = rewrite(base, tmp_path / "x.gguf", drop=(key,))
    refused(path, tmp_path / "out", capsys, key)


def test_vocabulary_against_the_embedding_and_duplicate_tokens(base, tmp_path, capsys):
    toks = list(meta(base)["tokenizer.ggml.tokens"])
    types = list(meta(base)["tokenizer.ggml.token_type"])
    # one token more or fewer than the embedding has rows (token types kept one per token)
    for n, t in (("more", toks + ["extra"]), ("fewer", toks[:-1])):
        path = rewrite(base, tmp_path / f"{n}.gguf", {"tokenizer.ggml.tokens": (t, T.ARRAY, STR),
                                                      "tokenizer.ggml.token_type": ((types + [1])[:len(t)], T.ARRAY,
                                                                                    I32)})
        refused(path, tmp_path / "out", capsys, "token_embd.weight", f"has {len(t)} tokens")
    # a repeated token: a tokenizer.json vocabulary {token: id} would silently give both ids one
    path = rewrite(base, tmp_path / "dup.gguf", {"tokenizer.ggml.tokens": (tokens_with(base, 40, toks[39]), T.ARRAY,
                                                                           STR)})
    refused(path, tmp_path / "out", capsys, "twice", "ids 39 and 40")
    # a repeated special token
    path = rewrite(base, tmp_path / "dup2.gguf", {"tokenizer.ggml.tokens": (tokens_with(base, 2, toks[0]), T.ARRAY,
                                                                            STR)})
    refused(path, tmp_path / "out", capsys, "twice", "ids 0 and 2")


def test_tensors_against_the_metadata(base, tmp_path, capsys):
    def change(fn):
        return lambda items: [x for item in items for x in fn(*item)]
    cases = {
        "wrong-shape": (change(lambda n, a: [(n, a[:, :-1] if n == "blk.0.ffn_up.weight" else a)]),
                        ["blk.0.ffn_up.weight", "shape"]),
        "q-rows-not-heads": (change(lambda n, a: [(n, a[:-2] if n == "blk.1.attn_q.weight" else a)]),
                             ["blk.1.attn_q.weight", "shape"]),
        "missing": (change(lambda n, a: [] if n == "blk.1.ffn_down.weight" else [(n, a)]),
                    ["blk.1.ffn_down.weight is missing"]),
        "no-embedding": (change(lambda n, a: [] if n == "token_embd.weight" else [(n, a)]),
                         ["token_embd.weight is missing"]),
        "extra-bias": (change(lambda n, a: [(n, a)] + ([("blk.0.attn_q.bias", a[:, 0].copy())]
                                                       if n == "blk.0.attn_q.weight" else [])),
                       ["blk.0.attn_q.bias", "does not belong"]),
        "block-past-count": (change(lambda n, a: [(n.replace("blk.1.", "blk.7."), a)]), ["blk.7.", "block 7"]),
        "second-copy": (change(lambda n, a: [(n, a)] + ([("blk.01.attn_q.weight", a)]
                                                        if n == "blk.1.attn_q.weight" else [])), ["second copy"]),
        "unknown": (change(lambda n, a: [(n, a)] + ([("rope_freqs.weight", a[0].copy())]
                                                    if n == "output_norm.weight" else [])), ["rope_freqs"]),
        "nan-weight": (change(lambda n, a: [(n, np.where(np.arange(a.size).reshape(a.shape) == 5, np.nan, a)
                                             .astype(np.float32) if n == "blk.0.attn_v.weight" else a)]),
                       ["blk.0.attn_v.weight", "NaN"]),
        "inf-weight": (change(lambda n, a: [(n, a * np.float32(np.inf) if n == "output_norm.weight" else a)]),
                       ["output_norm.weight", "NaN or inf"]),
    }
    for name, (fn, words) in cases.items():
        path = rewrite(base, tmp_path / f"{name}.gguf", tensors=fn)
        refused(path, tmp_path / "out", capsys, *words)


def test_what_was_written_is_checked_before_it_is_switched_in(base, tmp_path, capsys, monkeypatch):
    """The folder is read back as swarr reads it before it takes the name OUT: a token that is not byte-level BPE
    (the tokenizer refuses it), or a tensor written in another shape, stops the conversion with nothing left."""
    path = rewrite(base, tmp_path / "sp.gguf", {"tokenizer.ggml.tokens": (tokens_with(base, 50, "\u2581the"), T.ARRAY,
                                                                          STR)})
    refused(path, tmp_path / "out", capsys, "tokenizer.json", "byte-level")
    real = gguf_convert.save_file

    def save_other_shape(state, fn, **kw):
        state = dict(state)
        state["model.norm.weight"] = state["model.norm.weight"][:-1].clone()
        real(state, fn, **kw)
    monkeypatch.setattr(gguf_convert, "save_file", save_other_shape)
    refused(base, tmp_path / "out", capsys, "model.norm.weight", "shape")
    monkeypatch.setattr(gguf_convert, "save_file", lambda state, fn, **kw: real(
        {k: v for k, v in state.items() if k != "lm_head.weight"}, fn, **kw))
    refused(base, tmp_path / "out", capsys, "lm_head.weight")


def test_a_valid_file_still_converts_and_leaves_only_its_folder(base, tmp_path):
    path = rewrite(base, tmp_path / "ids.gguf", {"tokenizer.ggml.unknown_token_id": (1, U32),
                                                 "tokenizer.ggml.padding_token_id": (2, U32)})
    out = gguf_convert.convert(str(path), str(tmp_path / "a" / "b" / "out"))
    assert sorted(os.listdir(tmp_path / "a" / "b")) == ["out"]
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors",
                                       "tokenizer.json", "tokenizer_config.json"]
    tc = json.loads(open(os.path.join(out, "tokenizer_config.json")).read())
    toks = meta(base)["tokenizer.ggml.tokens"]
    assert (tc["bos_token"], tc["eos_token"], tc["unk_token"], tc["pad_token"]) == (toks[0], toks[2], toks[1], toks[2])


def test_refused_conversion_removes_the_folders_it_made(base, tmp_path, capsys):
    path = rewrite(base, tmp_path / "bad.gguf", {f"{A}.attention.head_count": (0, U32)})
    refused(path, tmp_path / "new" / "deeper" / "out", capsys, "head_count")
    assert not (tmp_path / "new").exists()


def test_a_killed_conversions_leftovers_are_cleared_by_the_next(base, tmp_path):
    """SIGKILL leaves `.NAME.tmp-PID-*` and `.NAME.lock` (unlocked: the kernel drops a flock with its process):
    the next conversion into the same folder takes the lock and removes the half-written folder."""
    (tmp_path / ".out.tmp-999999-abcd").mkdir()
    (tmp_path / ".out.tmp-999999-abcd" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".out.lock").write_text("999999\n")
    gguf_convert.convert(str(base), str(tmp_path / "out"))
    assert leftovers(tmp_path / "out") == ["out"]


# ---- faults: two conversions at once, a full disk, a file-size limit, Ctrl-C ------------------------------------
DRIVER = """
import os, resource, signal, sys, time
sys.path.insert(0, {root!r})
from support import gguf_convert
mode, args = sys.argv[1], sys.argv[2:]
real = gguf_convert.save_file
if mode == "slow":      # hold the lock a while: the other conversion must find it taken
    def save_file(*a, **k):
        time.sleep(4)
        real(*a, **k)
    gguf_convert.save_file = save_file
elif mode.startswith("fsize="):  # a file-size limit: writes past it fail with EFBIG (SIGXFSZ ignored)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = int(mode[6:])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
elif mode.startswith("sigint-"):  # Ctrl-C at a chosen moment of the conversion
    where = mode[7:]
    def interrupt(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    if where == "save":
        def save_file(*a, **k):
            real(*a, **k)
            interrupt()
        gguf_convert.save_file = save_file
    else:
        real_fn = getattr(gguf_convert, where)
        def wrapped(*a, **k):
            out = real_fn(*a, **k)
            interrupt()
            return out
        setattr(gguf_convert, where, wrapped)
gguf_convert.main(args)
"""


def driver(tmp_path, mode, *args):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=str(ROOT)))
    return subprocess.Popen([sys.executable, str(script), mode, *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def one_line(err):
    return err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_two_conversions_into_one_folder(base, tmp_path):
    """Started together: one wins, the other is one line; the folder is the winner's, whole, and nothing else is
    left. With the winner slowed down, the loser finds the lock taken (not the finished folder)."""
    for mode in ("slow", "plain"):
        out = tmp_path / mode / "out"
        out.parent.mkdir()
        procs = [driver(tmp_path, mode, base, out) for _ in range(2)]
        results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
        codes = sorted(rc for rc, _, _ in results)
        assert codes == [0, 2], results
        err = next(e for rc, _, e in results if rc == 2)
        assert one_line(err) and ("another conversion" in err or "exists" in err), err
        if mode == "slow":
            assert "another conversion (pid " in err, err
        assert leftovers(out) == ["out"]
        gguf_convert.verify(str(out), json.loads((out / "config.json").read_text()), str(base))


@pytest.mark.parametrize("limit", [4, 100, 20_000, 10 ** 7])
def test_file_size_limit_is_one_line_and_leaves_nothing(base, tmp_path, limit):
    """RLIMIT_FSIZE of 4 bytes (the lock file's pid line fails), 100 B or 20 kB (model.safetensors, ~0.5 MB, fails
    part-written): one line naming OUT, and nothing left. 10 MB: the conversion is whole."""
    out = tmp_path / "out"
    p = driver(tmp_path, f"fsize={limit}", base, out)
    rc = p.wait(timeout=300)
    _, err = p.communicate()
    if limit < os.path.getsize(base):
        assert rc == 2 and one_line(err) and "File too large" in err and str(out) in err, err
        assert leftovers(out) == []
    else:
        assert rc == 0 and leftovers(out) == ["out"], err
        assert max(os.path.getsize(out / f) for f in os.listdir(out)) <= limit


@pytest.mark.parametrize("where", ["save", "verify", "tensors", "read"])
def test_ctrl_c_is_one_line_and_leaves_nothing(base, tmp_path, where):
    out = tmp_path / "out"
    p = driver(tmp_path, f"sigint-{where}", base, out)
    rc = p.wait(timeout=300)
    _, err = p.communicate()
    assert rc == 130 and one_line(err) and "interrupted" in err, (rc, err)
    assert leftovers(out) == []


def test_disk_full_is_one_line_and_leaves_nothing(base, tmp_path, capsys, monkeypatch):
    """ENOSPC from safetensors (half a file written) and from the small files after it."""
    real = gguf_convert.save_file

    def full(state, fn, **kw):
        with open(fn, "wb") as f:
            f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", fn)
    monkeypatch.setattr(gguf_convert, "save_file", full)
    refused(base, tmp_path / "out", capsys, "No space left on device", str(tmp_path / "out"))
    monkeypatch.setattr(gguf_convert, "save_file", real)
    import builtins
    real_open = builtins.open

    def open_full(fn, mode="r", *a, **k):
        if "w" in mode and str(fn).endswith("tokenizer_config.json"):
            raise OSError(errno.ENOSPC, "No space left on device", str(fn))
        return real_open(fn, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", open_full)
    refused(base, tmp_path / "out", capsys, "No space left on device")
