"""Reading a checkpoint folder strictly, and the mapping between HF config.json fields and the model's.

    ck = read(path, dtype, device)   # after every check: ck.config (the fields of a swarr.Config),
                                     # ck.tokenizer, ck.files (tensor name -> safetensors file), ck.dtype
    export_config(cfg, windows, dtype) -> the config.json that transformers and vLLM read, windows included

Anything that cannot mean anything (a string where a number belongs, a window of 0, a shard that is missing, a
model larger than the free memory) is one SwarrError naming the file and the field, before the model is built.
Every file the folder names must lie inside it after symlinks (folder_root); while the weights are copied in, each
tensor is checked (check_tensor: shape, a floating-point dtype, finite values); before generating, the length
(check_context) and, from the command line, one probe forward (check_logits).
"""
from __future__ import annotations

import math
import os
import re
from types import SimpleNamespace
from typing import NamedTuple

import torch
from safetensors import safe_open

from .flags import check_window
from .safe_io import SwarrError, read_json, recover
from .tokenizer import TOKENIZER_FILES, Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
MAX_LAYERS = 10_000  # far above any released decoder (Llama 3.1 405B has 126 layers)
LAYER_TYPES = ("full_attention", "sliding_attention")
MAX_POSITIONS = 2 ** 40  # max_position_embeddings: far above any released model (Llama 4 Scout: 10M)
POSITION_LIMIT = 2 ** 24  # float32 holds every integer position below it: RoPE's angles are float32(pos) * freq
FLOAT32_MAX = torch.finfo(torch.float32).max
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors header dtypes a weight can have
WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")


class Checkpoint(NamedTuple):
    config: dict            # the fields of a swarr.Config: swarr.Config(**config)
    tokenizer: Tokenizer
    files: dict             # tensor name -> the safetensors file that holds it
    dtype: torch.dtype      # the dtype to load the weights in


def read(path: str, dtype=torch.float32, device="cpu") -> Checkpoint:
    """Read and check a local HF model folder: config.json, tokenizer.json and the shard index (or the single
    model.safetensors), and that the model they describe fits in the memory free on `device` in `dtype`."""
    dtype = DTYPES.get(dtype, dtype)
    if not path:
        raise SwarrError("no model folder given (--model)")
    recover(path, clean=False)  # a save interrupted at its switch leaves `path` missing for an instant: finish it
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise SwarrError(f"{path}: model folder not found" if not os.path.exists(path) else f"{path}: not a folder")
    root = folder_root(path)
    for name in WEIGHT_FILES + TOKENIZER_FILES:  # every file read from the folder (the shards: weight_files)
        if os.path.lexists(os.path.join(path, name)):
            inside(root, os.path.join(path, name))
    config = config_fields(read_json(cfg_path), cfg_path)
    tok = Tokenizer(os.path.join(path, "tokenizer.json"))
    if tok.vocab_size > config["vocab_size"]:  # an id past the embedding would fail only at generation
        raise SwarrError(f"{tok.path}: token ids go up to {tok.vocab_size - 1}, but config.json's vocab_size "
                         f"(the embedding) is {config['vocab_size']}")
    files = weight_files(path, root)
    check_size(SimpleNamespace(**config), files, torch.empty(0, dtype=dtype).element_size(), device, cfg_path)
    return Checkpoint(config, tok, files, dtype)


def folder_root(path: str) -> str:
    """The folder every file of the checkpoint at `path` must resolve into: `path` after symlinks (a saved checkpoint
    `out/model` is a symlink to `out/.model.vN`), or, for a snapshot of the Hugging Face hub cache
    (.../models--ORG--NAME/snapshots/REV, whose files are symlinks to ../../blobs/), its models--ORG--NAME folder."""
    real = os.path.realpath(path)
    up = os.path.dirname(real)
    if os.path.basename(up) == "snapshots" and os.path.basename(os.path.dirname(up)).startswith("models--"):
        return os.path.dirname(up)
    return real


def inside(root: str, fn: str) -> str:
    """fn, if it resolves (after symlinks) to a path inside the folder `root`; else one SwarrError: a checkpoint
    never makes us read a file elsewhere (an index naming ../x or /etc/x, a weight file linked to another place)."""
    try:
        real = os.path.realpath(fn)
    except (ValueError, OSError) as e:  # a NUL byte in a name from the index
        raise SwarrError(f"{fn!r}: not a usable file name ({e})") from None
    if real == root or os.path.commonpath([root, real]) != root:
        raise SwarrError(f"{fn}: resolves to {real}, outside the model folder {root} (a checkpoint's files must lie "
                         f"inside its folder)")
    return fn


# ---- config.json --------------------------------------------------------------------------------------
def config_fields(hf: dict, where: str = "config.json") -> dict:
    """Read and check a config.json: every number that shapes the model, its RoPE and its windows, as the fields
    of a swarr.Config. A field that cannot mean anything raises one SwarrError naming the file and the field."""
    if not isinstance(hf, dict):
        raise SwarrError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    archs = hf.get("architectures") or ["?"]
    arch = archs[0] if isinstance(archs, list) and archs else archs
    if not isinstance(arch, str) or arch not in SUPPORTED:
        raise SwarrError(f"{where}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED)}")
    num = lambda key, **kw: config_number(hf, key, where, **kw)
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(key) is not None and not isinstance(hf[key], bool):  # "false" would read as true
            raise SwarrError(f"{where}: {key} must be true or false, got {hf[key]!r}")
    n_heads, n_layers, dim = num("num_attention_heads"), num("num_hidden_layers"), num("hidden_size")
    if n_layers > MAX_LAYERS:  # per-layer lists are built from it before any weight is read
        raise SwarrError(f"{where}: num_hidden_layers {n_layers} is not plausible (at most {MAX_LAYERS})")
    if num("max_position_embeddings", default=4096) > MAX_POSITIONS:  # (YaRN reads it as a float)
        raise SwarrError(f"{where}: max_position_embeddings {hf['max_position_embeddings']} is not plausible "
                         f"(at most 2**40)")
    n_kv_heads = num("num_key_value_heads", default=n_heads)
    if n_heads % n_kv_heads:
        raise SwarrError(f"{where}: num_attention_heads ({n_heads}) is not a multiple of "
                         f"num_key_value_heads ({n_kv_heads})")
    if hf.get("head_dim") is None and dim % n_heads:
        raise SwarrError(f"{where}: hidden_size ({dim}) is not a multiple of num_attention_heads ({n_heads}) "
                         f"and there is no head_dim")
    head_dim = num("head_dim", default=dim // n_heads)
    if head_dim % 2:
        raise SwarrError(f"{where}: head_dim must be even (RoPE rotates pairs), got {head_dim}")
    fields = dict(arch=arch, vocab_size=num("vocab_size"), dim=dim, n_layers=n_layers, n_heads=n_heads,
                  n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_dim=num("intermediate_size"),
                  norm_eps=num("rms_norm_eps", kind=float, default=1e-6),
                  max_pos=num("max_position_embeddings", default=4096),
                  qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias")),
                  qk_norm=arch == "Qwen3ForCausalLM", tie_embeddings=bool(hf.get("tie_word_embeddings")),
                  hf=dict(hf))
    if hf.get("hidden_act", "silu") != "silu" or hf.get("mlp_bias"):
        raise SwarrError(f"{where}: only SwiGLU (silu, no MLP bias) MLPs are supported")
    eos = hf.get("eos_token_id")
    for i in eos if isinstance(eos, list) else [] if eos is None else [eos]:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < fields["vocab_size"]:
            raise SwarrError(f"{where}: eos_token_id {eos!r} is not a token id below vocab_size {fields['vocab_size']}")
    fields["rope"] = config_rope(hf, where, fields["max_pos"])
    fields["windows"] = config_windows(hf, arch, n_layers, where)
    return fields


_REQUIRED = object()


def config_number(hf: dict, key: str, where: str, kind=int, default=_REQUIRED, minimum: float = 1):
    """hf[key] as a positive int (kind=int, at least `minimum`) or a positive finite float (kind=float).
    A missing or null field takes `default`; a required one is an error, as is a string, a bool, 0, -1 or NaN."""
    v = hf.get(key)
    if v is None:
        if default is _REQUIRED:
            raise SwarrError(f"{where}: missing field {key!r}")
        return default
    if kind is int:
        ok = isinstance(v, int) and not isinstance(v, bool) and v >= minimum
        want = f"an integer >= {minimum}"
    else:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1e300  # (also not NaN)
        want = "a positive finite number"
    if not ok:
        raise SwarrError(f"{where}: {key} must be {want}, got {v!r}")
    return float(v) if kind is float else v


def config_rope(hf: dict, where: str, max_pos: int = 4096) -> dict:
    """The RoPE parameters. transformers 5 writes `rope_parameters`; released checkpoints use `rope_theta` +
    `rope_scaling`. Scaled types need their factors (llama3: four numbers). Every number rope_frequencies divides
    by or takes the log of is checked here, so the frequencies are finite and positive."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    if not isinstance(rope, dict):
        raise SwarrError(f"{where}: {key} must be an object, got {type(rope).__name__}")
    given, rope = rope, dict(rope)
    if rope.get("rope_theta") is None:
        rope["rope_theta"] = 10000.0 if hf.get("rope_theta") is None else hf["rope_theta"]
    rope["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    if rope["rope_type"] not in ("default", "linear", "llama3", "yarn"):
        raise SwarrError(f"{where}: rope type {rope['rope_type']!r} is not supported (default, linear, llama3, yarn)")
    need = {"default": [], "linear": ["factor"], "yarn": ["factor"],
            "llama3": ["factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"]}
    for name in ["rope_theta", *need[rope["rope_type"]]]:  # rope_theta may come from the top level
        rope[name] = config_number(rope, name, f"{where}: {key}" if name != "rope_theta" or name in given else where,
                                   kind=float)
    for name in ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow", "mscale",
                 "mscale_all_dim"):
        if rope.get(name) is not None:
            rope[name] = config_number(rope, name, f"{where}: {key}", kind=float)
    if not 1 < rope["rope_theta"] < FLOAT32_MAX:  # wavelengths theta**(2i/d) in float32; YaRN divides by log(theta)
        raise SwarrError(f"{where}: rope_theta must be above 1 and finite in float32 (the base of RoPE's "
                         f"wavelengths), got {rope['rope_theta']!r}")
    if (hf.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1) != 1:  # RoPE on part of a head
        raise SwarrError(f"{where}: partial_rotary_factor is not supported (RoPE rotates every dimension here)")
    if rope.get("original_max_position_embeddings", 0) > MAX_POSITIONS:
        raise SwarrError(f"{where}: {key}: original_max_position_embeddings is not plausible (at most 2**40)")
    if rope.get("factor", 1) < 1:  # frequencies are divided by it (transformers asks for >= 1 too)
        raise SwarrError(f"{where}: {key}: factor must be at least 1 (a context extension), got {rope['factor']!r}")
    if rope["rope_type"] == "yarn":
        rope_yarn(rope, f"{where}: {key}", max_pos)
    if (rope.get("attention_factor") or 0) > 16:  # it multiplies q and k, so every logit by its square
        raise SwarrError(f"{where}: {key}: attention_factor {rope['attention_factor']:g} is not plausible (YaRN's own "
                         f"is 0.1 ln(factor) + 1; above 16 the attention logits grow over 256x)")
    if rope["rope_type"] == "llama3" and rope["low_freq_factor"] == rope["high_freq_factor"]:
        raise SwarrError(f"{where}: {key}: low_freq_factor and high_freq_factor must differ")
    return rope


def rope_yarn(rope: dict, where: str, max_pos: int):
    """YaRN's numbers: the dimensions where interpolation starts and ends are logs of
    original_max_position_embeddings / (2 pi beta), which must be finite; DeepSeek-style mscale / mscale_all_dim
    set the attention factor as transformers does (it is never left at the default when they are given)."""
    old = rope.get("original_max_position_embeddings") or max_pos
    for name, default in (("beta_fast", 32), ("beta_slow", 1)):
        if not 0 < old / ((rope.get(name) or default) * 2 * math.pi) < math.inf:
            raise SwarrError(f"{where}: original_max_position_embeddings / (2 pi {name}) is not a finite number "
                             f"({old!r} / {rope.get(name)!r})")
    mscale = lambda m: 0.1 * m * math.log(rope["factor"]) + 1.0 if rope["factor"] > 1 else 1.0
    if rope.get("attention_factor") is None and rope.get("mscale") and rope.get("mscale_all_dim"):
        rope["attention_factor"] = mscale(rope["mscale"]) / mscale(rope["mscale_all_dim"])  # (checked after)


def config_windows(hf: dict, arch: str, n_layers: int, where: str) -> list:
    """Per-layer windows, read the way transformers reads them (W keys including the query itself): Mistral
    windows every layer with `sliding_window` (null = full attention); Qwen2/Qwen3 only with
    `use_sliding_window: true`, on the layers `layer_types` (or `max_window_layers`) names; Llama never."""
    W = hf.get("sliding_window")
    if W is not None and arch != "LlamaForCausalLM":
        try:
            check_window(W)
        except SwarrError:
            raise SwarrError(f"{where}: sliding_window must be an integer in [1, 2**31) (keys per query) or null, "
                             f"got {W!r}") from None
    types = hf.get("layer_types")
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers:
            raise SwarrError(f"{where}: layer_types must be a list of {n_layers} entries (num_hidden_layers)")
        for i, t in enumerate(types):
            if t not in LAYER_TYPES:
                raise SwarrError(f"{where}: layer_types[{i}] is {t!r}; supported: {', '.join(LAYER_TYPES)}")
    if arch == "MistralForCausalLM":
        return [W] * n_layers
    if arch.startswith("Qwen"):
        use = hf.get("use_sliding_window", False)
        if use and W is None:
            raise SwarrError(f"{where}: use_sliding_window is true but sliding_window is null")
        if use:
            first = config_number(hf, "max_window_layers", where, default=n_layers, minimum=0)
            types = types or ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
            return [W if t == "sliding_attention" else None for t in types]
    return [None] * n_layers


def export_config(cfg, windows: list, dtype) -> dict:
    """config.json for a model with this config (cfg.hf: the config.json it came from, cfg.arch) and these
    per-layer windows, in the form transformers and vLLM read (docs/REAL_CHECKPOINTS.md, "Exports": what each reads)."""
    hf = dict(cfg.hf)
    hf["dtype"] = hf["torch_dtype"] = str(dtype).replace("torch.", "")
    ws = {w for w in windows if w is not None}
    if len(ws) > 1:
        raise SwarrError(f"HF configs hold one sliding_window for all windowed layers; this model has {sorted(ws)}")
    W = ws.pop() if ws else None
    if W is not None and None in windows:
        raise SwarrError(f"windows on {sum(w is not None for w in windows)} "
                         f"of {len(windows)} layers cannot be exported: vLLM's Qwen2/Qwen3 refuse mixed layer_types "
                         "(or window every layer) and transformers' Mistral windows every layer; window all layers")
    if cfg.arch.startswith("Qwen"):  # all layers windowed or none: vLLM reads use_sliding_window + sliding_window
        hf["use_sliding_window"], hf["sliding_window"] = W is not None, W
        hf["layer_types"] = ["sliding_attention" if W else "full_attention"] * len(windows)
        if W is not None:
            hf["max_window_layers"] = 0
    elif W is not None:  # Llama or Mistral: a windowed Llama is a Mistral (Llama + sliding_window on every layer)
        hf.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=W)
        hf.pop("attention_bias", None), hf.pop("mlp_bias", None)
    elif cfg.arch == "MistralForCausalLM":
        hf["sliding_window"] = None
    return hf


# ---- the weights -----------------------------------------------------------------------------------------
def weight_files(path: str, root: str | None = None) -> dict[str, str]:
    """tensor name -> safetensors file, from model.safetensors or model.safetensors.index.json. Every file must
    resolve inside `root` (default: folder_root(path))."""
    root = root or folder_root(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.lexists(index):
        weight_map = read_json(inside(root, index)).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
            raise SwarrError(f"{index}: weight_map must map tensor names to file names")
        files = {n: os.path.join(path, f) for n, f in weight_map.items()}
        for fn in set(files.values()):
            inside(root, fn)
    else:
        single = os.path.join(path, "model.safetensors")
        if not os.path.exists(single):
            raise SwarrError(f"{path}: no model.safetensors or model.safetensors.index.json")
        files = {n: single for n in read_safetensors(inside(root, single), lambda f: list(f.keys()))}
    for fn in set(files.values()):
        if not os.path.exists(fn):
            raise SwarrError(f"{fn}: shard listed in the index is missing")
        if not os.path.isfile(fn):  # a folder, FIFO or device: safetensors would fail or block on it
            raise SwarrError(f"{fn}: not a regular file")
    return files


def read_safetensors(fn: str, use):
    """Open a safetensors file and apply `use` to it, turning a truncated/corrupt file into one clear error."""
    try:
        with safe_open(fn, framework="pt") as f:
            return use(f)
    except SwarrError:
        raise
    except Exception as e:  # safetensors raises its own error types for header/size problems
        raise SwarrError(f"{fn}: cannot read safetensors file ({str(e).splitlines()[0]})") from None


def check_tensor(fn: str, name: str, header, param: torch.Tensor):
    """A tensor about to be copied into `param` (header: its safetensors slice): the shape config.json implies and
    a dtype a weight can have (integers or bools would be converted to floats without a word)."""
    if tuple(header.get_shape()) != tuple(param.shape):
        raise SwarrError(f"{fn}: tensor {name} has shape {tuple(header.get_shape())}, "
                         f"config.json implies {tuple(param.shape)}")
    if header.get_dtype() not in WEIGHT_DTYPES:
        raise SwarrError(f"{fn}: tensor {name} has dtype {header.get_dtype()}; a weight is one of "
                         f"{', '.join(WEIGHT_DTYPES)}")


def check_finite(fn: str, name: str, param: torch.Tensor):
    """A tensor just copied in holds no NaN or inf: its float32 sum is finite (one pass, no copy), or, when the
    sum overflowed, every element is."""
    with torch.no_grad():
        if not bool(param.sum(dtype=torch.float32).isfinite()) and not bool(param.isfinite().all()):
            raise SwarrError(f"{fn}: tensor {name} holds NaN or inf values")


def check_size(cfg, files: dict, element_size: int, device, where: str):
    """Before building the model: the weights must hold num_hidden_layers layers, and the parameters that
    config.json implies must fit in the memory free on `device` (a config saying 10**9 layers or a hidden size
    of 10**7 is refused here instead of exhausting the machine)."""
    layers = {int(m[1]) for name in files if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if layers != set(range(cfg.n_layers)):
        raise SwarrError(f"{where}: num_hidden_layers is {cfg.n_layers}, the weights hold {len(layers)} layers")
    n = param_count(cfg)
    free = available_memory(device)
    if n * element_size > free:
        raise SwarrError(f"{where}: the model has {n:,} parameters ({n * element_size / 2**30:.1f} GiB), more than "
                         f"the {free / 2**30:.1f} GiB free on {device}")


def param_count(cfg) -> int:
    """Parameters of a swarr.Transformer with this config (q/k/v biases and Qwen3's q/k norms included), tied
    embeddings counted once. cfg: a swarr.Config (or any object with its fields)."""
    D, H, Hkv, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    attn = 2 * D * H * hd + 2 * D * Hkv * hd + (H * hd + 2 * Hkv * hd if cfg.qkv_bias else 0) \
        + (2 * hd if cfg.qk_norm else 0)
    layer = attn + 3 * D * cfg.hidden_dim + 2 * D
    return cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * layer + D


def context_length(max_pos: int, windows: list) -> tuple[int, str]:
    """The most positions (prompt + new tokens) a generation may fill, and why. A layer that looks further back
    than max_position_embeddings (full attention, or a wider window) would meet relative distances it never saw;
    a model whose every window fits inside it only ever meets distances below W, and is bounded by the positions
    float32 holds exactly (RoPE's angles are float32(position) * frequency)."""
    if (None in windows or max(windows) > max_pos) and max_pos <= POSITION_LIMIT:
        return max_pos, "max_position_embeddings"
    return POSITION_LIMIT, "2**24, the positions float32 holds exactly"


def check_context(cfg, windows: list, longest: int, max_new_tokens: int):
    """Refuse a generation longer than the model's context (context_length): a prompt of `longest` tokens that
    does not fit, or one that max_new_tokens more would take past it."""
    if longest > cfg.max_pos:
        raise SwarrError(f"a prompt of {longest} tokens is longer than the model's context "
                         f"({cfg.max_pos} positions, max_position_embeddings)")
    limit, why = context_length(cfg.max_pos, windows)
    if longest + max_new_tokens > limit:
        raise SwarrError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens passes the model's context "
                         f"({limit} positions, {why}): " + (f"lower --max-new-tokens to at most {limit - longest}"
                                                             if longest < limit else "no room is left for new tokens"))


def check_logits(model, where: str, n: int = 8):
    """One forward of the model on a probe of n tokens: logits that are not finite (weights or norms that
    overflow in this dtype) are refused before any generation."""
    p = next(model.parameters())
    probe = torch.arange(min(n, model.cfg.vocab_size), device=p.device)[None]
    with torch.no_grad():
        ok = bool(model(probe).isfinite().all())
    if not ok:
        raise SwarrError(f"{where}: the model's logits on a probe of {probe.shape[1]} tokens are not finite (NaN or "
                         f"inf) in {str(p.dtype).replace('torch.', '')}: its weights or config.json overflow")


def available_memory(device) -> float:
    """Bytes free for new tensors on `device`: the GPU's free memory, or the host's MemAvailable (inf if unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024.0 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return math.inf
