"""SWARR: convert a pretrained transformer to sliding-window attention, then win back its accuracy with RL.

One file, meant to be read top to bottom: config -> model -> attention (reference | compiled extension)
-> KV caches, prefill and decode through the same forward, generation -> checkpoint I/O -> eval
-> command line; then an appendix with the plumbing (building the extension, CUDA graphs).
The tokenizer and chat templates live in tokenizer.py, the math grader in grader.py. See README.md.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from support import grader
# strict reads and crash-safe writes (re-exported: swarr.SwarrError, swarr.read_json, swarr.recover, ...)
from support.safe_io import (SwarrError, check_out_folder, pid_alive, read_json, read_text, recover, write_folder,
                     write_text_atomic)
# tokenizer.json (byte-level or SentencePiece BPE) and chat templates
from support.tokenizer import Tokenizer
from support.checkpoint import param_count




# =====================================================================================================
# config: the few numbers that define a Llama / Mistral / Qwen2 / Qwen3 decoder
# =====================================================================================================
MAX_LAYERS = 10_000  # far above any released decoder (Llama 3.1 405B has 126 layers)
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass
class Config:
    arch: str                         # one of SUPPORTED
    vocab_size: int
    dim: int                          # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int                   # < n_heads: grouped-query attention
    head_dim: int
    hidden_dim: int                   # intermediate_size of the SwiGLU MLP
    norm_eps: float = 1e-6
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_pos: int = 4096               # max_position_embeddings (only informative: RoPE extrapolates)
    qkv_bias: bool = False            # Qwen2
    qk_norm: bool = False             # Qwen3: RMSNorm over each head's q and k
    tie_embeddings: bool = False
    windows: list = field(default_factory=list)  # per layer: int W or None (full attention)
    hf: dict = field(default_factory=dict)       # the original config.json, kept for saving

    @staticmethod
    def from_hf(hf: dict, where: str = "config.json") -> "Config":
        """Read and check a config.json: every number that shapes the model, its RoPE and its windows.
        A field that cannot mean anything raises one SwarrError naming the file and the field."""
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
        cfg = Config(arch=arch, vocab_size=num("vocab_size"), dim=dim, n_layers=n_layers, n_heads=n_heads,
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
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < cfg.vocab_size:
                raise SwarrError(f"{where}: eos_token_id {eos!r} is not a token id below vocab_size {cfg.vocab_size}")
        cfg.rope = config_rope(hf, where)
        cfg.windows = config_windows(hf, arch, n_layers, where)
        return cfg


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


def config_rope(hf: dict, where: str) -> dict:
    """The RoPE parameters. transformers 5 writes `rope_parameters`; released checkpoints use `rope_theta` +
    `rope_scaling`. Scaled types need their factors (llama3: four numbers)."""
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
    for name in ("original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow"):
        if rope.get(name) is not None:
            rope[name] = config_number(rope, name, f"{where}: {key}", kind=float)
    if (rope.get("attention_factor") or 0) > 16:  # it multiplies q and k, so every logit by its square
        raise SwarrError(f"{where}: {key}: attention_factor {rope['attention_factor']:g} is not plausible (YaRN's own "
                         f"is 0.1 ln(factor) + 1; above 16 the attention logits grow over 256x)")
    if rope["rope_type"] == "llama3" and rope["low_freq_factor"] == rope["high_freq_factor"]:
        raise SwarrError(f"{where}: {key}: low_freq_factor and high_freq_factor must differ")
    return rope


LAYER_TYPES = ("full_attention", "sliding_attention")


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


def check_window(window) -> int | None:
    """A window is None (full attention) or a positive int: the number of keys a query sees, itself included."""
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or not 0 < window < 2 ** 31:
        raise SwarrError(f"window must be an integer in [1, 2**31) or None, got {window!r}")
    return window


# =====================================================================================================
# model: RMSNorm, RoPE, attention with a per-layer window, SwiGLU MLP. Module names follow HF's, so a
# checkpoint's tensor names are our parameter names (model.layers.0.self_attn.q_proj.weight, ...).
# =====================================================================================================
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_frequencies(cfg: Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin scale, for the rope types Llama 3.x and Qwen use."""
    r, d = cfg.rope, cfg.head_dim
    inv = 1.0 / (r["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    kind, scale = r["rope_type"], 1.0
    if kind == "linear":
        inv = inv / r["factor"]
    elif kind == "llama3":  # smooth interpolation between low and high frequencies
        f, lo, hi, old = r["factor"], r["low_freq_factor"], r["high_freq_factor"], r["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv = torch.where(wavelen > old / lo, inv / f, (1 - smooth) * inv / f + smooth * inv)
    elif kind == "yarn":  # NTK-by-parts interpolation plus an attention temperature
        f = r["factor"]
        old = r.get("original_max_position_embeddings") or cfg.max_pos
        scale = r.get("attention_factor") or (0.1 * math.log(f) + 1.0 if f > 1 else 1.0)

        def dim_of(rot):  # the dimension index whose wavelength makes `rot` turns over `old` positions
            return d * math.log(old / (rot * 2 * math.pi)) / (2 * math.log(r["rope_theta"]))
        lo, hi = dim_of(r.get("beta_fast") or 32), dim_of(r.get("beta_slow") or 1)
        if r.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
        inv = inv / f * ramp + inv * (1 - ramp)
    return inv, scale


def apply_rope(x, cos, sin):
    """x (B, H, T, D); cos/sin (B, 1, T, D). HF's rotate-half convention (not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: Config, window: int | None):
        super().__init__()
        self.cfg, self.window = cfg, window
        H, Hkv, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, H * D, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, Hkv * D, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, Hkv * D, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * D, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(D, cfg.norm_eps), RMSNorm(D, cfg.norm_eps)

    def forward(self, x, cos, sin, cache: "KVCache | None" = None):
        B, T, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(B, T, c.n_heads, c.head_dim)
        k = self.k_proj(x).view(B, T, c.n_kv_heads, c.head_dim)
        v = self.v_proj(x).view(B, T, c.n_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # at absolute positions, before any caching
        if cache is not None and T == 1:  # decode: the new key joins the cache, the query attends over the cache
            cache.write(k, v)
            y = decode(q[:, :, 0], cache.k, cache.v, cache.valid())[:, :, None]
        else:  # the whole sequence at once: training, or a prompt (prefill), whose keys then fill the cache
            y = attention(q, k, v, self.window)
            if cache is not None:
                cache.write(k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config, window: int | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, window)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        windows = cfg.windows or [None] * cfg.n_layers
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.dim),
            layers=nn.ModuleList(Block(cfg, w) for w in windows),
            norm=RMSNorm(cfg.dim, cfg.norm_eps)))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.checkpointing = False  # activation checkpointing per block (training memory vs compute)

    @classmethod
    def empty(cls, cfg: Config, device="cpu", dtype=torch.float32) -> "Transformer":
        """The model with uninitialised weights, built on the meta device first (no memory, no random init) and then
        given storage on `device`: the one way to build a model whose weights are about to be copied in."""
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device).to(dtype)
        if cfg.tie_embeddings:  # to_empty() gives every parameter its own storage: tie them again
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    @property
    def windows(self) -> list:
        return [blk.self_attn.window for blk in self.model.layers]

    def set_window(self, window: int | None, layers=None) -> "Transformer":
        """Convert to SWA: give `layers` (default all) the window W (None = back to full attention)."""
        window = check_window(window)
        layers = range(self.cfg.n_layers) if layers is None else layers
        for i in layers:
            if not (isinstance(i, int) and 0 <= i < self.cfg.n_layers):
                raise SwarrError(f"layer {i!r} does not exist (the model has {self.cfg.n_layers} layers)")
            self.model.layers[i].self_attn.window = window
        self.cfg.windows = self.windows
        return self

    def rope(self, pos: torch.Tensor, dtype):
        """cos, sin (B, 1, T, D) for absolute positions pos (B, T)."""
        if getattr(self, "_inv_freq", None) is None or self._inv_freq.device != pos.device:
            inv, self._rope_scale = rope_frequencies(self.cfg)
            self._inv_freq = inv.to(pos.device)
        freqs = pos[..., None].float() * self._inv_freq           # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]           # (B, 1, T, D)
        return (emb.cos() * self._rope_scale).to(dtype), (emb.sin() * self._rope_scale).to(dtype)

    def forward(self, idx, pos=None, caches=None, last_only: bool = False):
        """idx (B, T) token ids -> logits (B, T, vocab), or (B, 1, vocab) with last_only (generation needs no more,
        and a long prompt's (T, vocab) logits can outweigh the model). pos (B, T): absolute positions, by default
        0..T-1, or with `caches` each row's next positions. With `caches` (one per layer) every layer writes its
        new keys/values into its cache: T > 1 is a prompt filling empty caches (prefill), T = 1 a decode step."""
        B, T = idx.shape
        if caches is not None and T > 1 and bool(caches[0].pos.any()):
            raise SwarrError(f"{T} tokens at once need empty caches (a prompt); continue one token at a time")
        if pos is None:
            start = caches[0].pos[:, None] if caches is not None else 0
            pos = start + torch.arange(T, device=idx.device).expand(B, T)
        x = self.model.embed_tokens(idx)
        cos, sin = self.rope(pos, x.dtype)
        for i, blk in enumerate(self.model.layers):
            cache = None if caches is None else caches[i]
            if self.checkpointing and self.training and cache is None:
                x = torch.utils.checkpoint.checkpoint(blk, x, cos, sin, use_reentrant=False)
            else:
                x = blk(x, cos, sin, cache)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))


# =====================================================================================================
# attention backends: the readable PyTorch reference (the specification) and the compiled extension
# =====================================================================================================
# Window W = number of keys a query sees, including itself: query i attends to key j iff
# j <= i and i - j < W (HF `sliding_window`; flash-attn window_size=(W-1, 0)). window None = full.
# Layouts: q (B, Hq, N, D), k/v (B, Hkv, N, D), Hq a multiple of Hkv (grouped-query attention).


def window_mask(n_q: int, n_k: int, window: int | None, device=None) -> torch.Tensor:
    """Boolean (n_q, n_k) mask, True = attend. Queries are the last n_q of the n_k positions."""
    i = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    keep = j <= i
    if window is not None:
        keep &= (i - j) < window
    return keep


def attention_ref(q, k, v, window: int | None, scale: float | None = None) -> torch.Tensor:
    """Reference windowed causal attention. q (B,Hq,N,D), k/v (B,Hkv,N,D) -> (B,Hq,N,D)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = window_mask(q.shape[2], k.shape[2], window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def decode_ref(q, k_cache, v_cache, valid, scale: float | None = None) -> torch.Tensor:
    """Reference one-token attention over a cache. q (B,Hq,D); caches (B,Hkv,S,D); valid (B,) int64:
    row b attends to slots [0, valid[b]). Slot order does not matter (RoPE is applied before caching)."""
    rep = q.shape[1] // k_cache.shape[1]
    if rep > 1:
        k_cache, v_cache = k_cache.repeat_interleave(rep, 1), v_cache.repeat_interleave(rep, 1)
    S = k_cache.shape[2]
    mask = torch.arange(S, device=q.device)[None, :] < valid[:, None]  # (B, S)
    out = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache,
                                         attn_mask=mask[:, None, None, :], scale=scale)
    return out[:, :, 0]


# ---- the compiled extension (csrc/) ----
# csrc/ implements the same two functions (plus the backward) as compiled kernels: C++ on the CPU everywhere,
# CUDA where a GPU (compute capability >= 8.0) and nvcc are present, registered as torch.ops.swarr.fwd / bwd /
# decode. load_extension (in the appendix at the end of this file) builds them on first use; if the build fails,
# one line on stderr says why and the reference computes the same thing. SWARR_BACKEND=auto|ext|ref picks the
# backend (set_backend does the same); SWARR_POISON=1 makes the kernels NaN-fill their outputs before writing
# them (tests use it to catch unwritten elements).
_BACKEND = os.environ.get("SWARR_BACKEND", "auto")
# Under auto, the ops named in SWARR_CUDA_REF_OPS (fwd, bwd, decode; default none) take the reference on CUDA:
# csrc/gpu_check.py times both paths per op and prints the setting that picks the faster one of each.
_REF_OPS = {"cuda": {op for op in os.environ.get("SWARR_CUDA_REF_OPS", "").split(",") if op}}


def set_backend(name: str):
    """'auto' (the extension if it builds, else the reference), 'ext' (the extension, or an error) or 'ref'."""
    global _BACKEND
    if name not in ("auto", "ext", "ref"):
        raise SwarrError(f"unknown attention backend {name!r}: use auto, ext or ref")
    if _REF_OPS["cuda"] - {"fwd", "bwd", "decode"}:
        raise SwarrError(f"SWARR_CUDA_REF_OPS={','.join(sorted(_REF_OPS['cuda']))}: name ops among fwd, bwd, decode")
    if name == "ext" and load_extension() is None:
        raise SwarrError(f"the compiled attention extension is unavailable: {_EXT['why']}")
    _BACKEND = name


def backend_name() -> str:
    """'ext' or 'ref': the backend attention() and decode() use (inputs the extension does not cover, such as
    float64 on a GPU or another device, still go to the reference)."""
    set_backend(_BACKEND)  # validates SWARR_BACKEND and, for auto/ext, builds or loads the extension
    return "ref" if _BACKEND == "ref" or load_extension() is None else "ext"


def _ref_op(op: str, t: torch.Tensor) -> bool:
    """Does `op` take the reference for tensors on t's device, by SWARR_CUDA_REF_OPS (under the auto backend)?"""
    return _BACKEND == "auto" and op in _REF_OPS.get(t.device.type, ())


def _ext_dtype(t: torch.Tensor, op: str):
    """The dtype the extension computes t's dtype in on t's device for `op`, or None: use the reference."""
    if _BACKEND == "ref" or _ref_op(op, t) or load_extension() is None:
        return None
    if t.device.type == "cpu":  # float32 kernels (float64 for checking); 16-bit inputs are computed in float32
        return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32
    if t.device.type == "cuda" and _EXT["cuda"] and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return t.dtype
    return None


class _WindowedAttention(torch.autograd.Function):
    """Autograd wiring: the forward saves (q, k, v, out, lse); the backward recomputes the probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, window: int, scale: float):
        out, lse = torch.ops.swarr.fwd(q, k, v, window, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.window, ctx.scale = window, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        if _ref_op("bwd", q):  # the reference's backward: autograd through SDPA, recomputing the forward
            with torch.enable_grad():
                qkv = [t.detach().requires_grad_() for t in (q, k, v)]
                return *torch.autograd.grad(attention_ref(*qkv, ctx.window, ctx.scale), qkv, dout), None, None
        dq, dk, dv = torch.ops.swarr.bwd(dout.contiguous(), q, k, v, out, lse, ctx.window, ctx.scale)
        return dq, dk, dv, None, None


def attention(q, k, v, window: int | None, scale: float | None = None) -> torch.Tensor:
    """Windowed causal attention (differentiable), same contract as attention_ref:
    q (B,Hq,N,D), k/v (B,Hkv,N,D) -> (B,Hq,N,D); window None = full causal attention."""
    dt = _ext_dtype(q, "fwd")
    if dt is None:
        return attention_ref(q, k, v, window, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    W = max(1, q.shape[2]) if window is None else int(window)
    out = _WindowedAttention.apply(q.to(dt).contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous(), W, scale)
    return out.to(q.dtype)


def decode(q, k_cache, v_cache, valid, scale: float | None = None) -> torch.Tensor:
    """One-token attention over a cache, same contract as decode_ref: q (B,Hq,D), caches (B,Hkv,S,D),
    valid (B,) = number of filled slots per row (1 <= valid <= S) -> (B,Hq,D)."""
    dt = _ext_dtype(q, "decode")
    if dt is None:
        return decode_ref(q, k_cache, v_cache, valid, scale)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    valid = valid.to(device=q.device, dtype=torch.long).contiguous()
    out = torch.ops.swarr.decode(q.to(dt).contiguous(), k_cache.to(dt).contiguous(), v_cache.to(dt).contiguous(),
                                 valid, scale)
    return out.to(q.dtype)


# =====================================================================================================
# KV caches and generation. A full-attention layer caches every position; a sliding-window layer caches
# exactly W slots, slot = position % W, so its memory stays constant however long generation runs.
# Keys are cached after RoPE at their absolute position, so the order of the slots does not matter.
# Prefill and decode are both Transformer.forward with caches: a prompt is attended at once by the windowed
# kernel and leaves its keys in the caches (the last W for a window); a decode step adds one key and attends
# over the cache, whose W slots are exactly the window.
# =====================================================================================================
class KVCache:
    def __init__(self, B: int, n_kv_heads: int, head_dim: int, slots: int, window: int | None, dtype, device):
        self.window = window
        self.k = torch.zeros(B, n_kv_heads, slots, head_dim, dtype=dtype, device=device)  # (B, Hkv, S, D)
        self.v = torch.zeros_like(self.k)
        self.pos = torch.zeros(B, dtype=torch.long, device=device)  # tokens seen so far, per row

    @property
    def slots(self) -> int:
        return self.k.shape[2]

    def valid(self) -> torch.Tensor:
        """(B,) number of filled slots per row: min(tokens seen, slots)."""
        return self.pos.clamp(max=self.slots)

    def write(self, k, v):
        """Store T new keys/values per row (B, Hkv, T, D) at positions pos .. pos+T-1, slot = position % S, then
        advance pos by T. Of a prompt longer than a window only the last W are stored: the rest would be overwritten."""
        T = k.shape[2]
        if T > 1 and self.window is None and int(self.pos.max()) + T > self.slots:  # (decode_loop checks T = 1 once)
            raise SwarrError(f"a prompt of {T} tokens does not fit the cache of {self.slots}")
        keep = torch.arange(max(0, T - self.slots), T, device=k.device)
        slot = (self.pos[:, None] + keep) % self.slots                    # (B, T')
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, slot] = k[:, :, keep].transpose(1, 2)             # indexed (B, T', Hkv, D)
        self.v[rows, :, slot] = v[:, :, keep].transpose(1, 2)
        self.pos += T

    def row(self, r: int) -> "KVCache":
        """Row r of this cache as a cache of one row that shares its memory: writes to it land in this one."""
        view = copy.copy(self)
        view.k, view.v, view.pos = self.k[r:r + 1], self.v[r:r + 1], self.pos[r:r + 1]
        return view

    def repeat_rows(self, n: int) -> "KVCache":
        """Each row repeated n times (row r -> rows r*n .. r*n+n-1): G samples from one prefill."""
        self.k, self.v = self.k.repeat_interleave(n, 0), self.v.repeat_interleave(n, 0)
        self.pos = self.pos.repeat_interleave(n, 0)
        return self

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def cache_slots(window: int | None, max_len: int) -> int:
    """Positions a layer's cache holds: W for a windowed layer (fewer if max_len is shorter), max_len otherwise."""
    return min(window, max_len) if window else max_len


def make_caches(model: Transformer, B: int, max_len: int) -> list[KVCache]:
    """One cache per layer, of cache_slots(W, max_len) positions."""
    c, p = model.cfg, next(model.parameters())
    return [KVCache(B, c.n_kv_heads, c.head_dim, cache_slots(w, max_len), w, p.dtype, p.device)
            for w in model.windows]


@torch.no_grad()
def prefill(model: Transformer, prompts: list[list[int]], caches: list[KVCache]) -> torch.Tensor:
    """Run each prompt through the model's forward, which fills row r of every cache, and return the logits of
    each prompt's last token (B, vocab). Rows of different lengths are simply run one by one."""
    dev = next(model.parameters()).device
    if not all(prompts):
        raise SwarrError("cannot generate from an empty prompt")
    return torch.cat([model(torch.tensor([toks], device=dev), caches=[c.row(r) for c in caches], last_only=True)[:, -1]
                      for r, toks in enumerate(prompts)])


def sample(logits, temperature: float, top_p: float, gen: torch.Generator | list | None):
    """(B, V) logits -> (B,) tokens. temperature 0 = greedy; top_p < 1 keeps the smallest nucleus. gen: one
    generator, or a list of them that split the rows into equal consecutive groups (one per prompt)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        sp[(sp.cumsum(-1) - sp) > top_p] = 0  # drop tokens once the mass before them exceeds top_p
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    if isinstance(gen, list):
        return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs.chunk(len(gen)), gen)])[:, 0]
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


@dataclass
class Generation:
    tokens: torch.Tensor    # (B, T) generated tokens, padded with eos after each row's end
    lengths: torch.Tensor   # (B,) tokens generated per row, the stop token included
    stopped: torch.Tensor   # (B,) True if the row ended on a stop token, False if max_new_tokens cut it
    caches: list            # the KV caches, for inspection (bytes, shapes)


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


def check_generation(model: Transformer, prompts: list[list[int]], max_new_tokens: int, n_samples: int = 1):
    """Refuse, before allocating anything, a generation that cannot run: a prompt longer than the model's
    context, or KV caches (plus the token buffers) larger than the memory free on the model's device."""
    c, p = model.cfg, next(model.parameters())
    longest = max(map(len, prompts), default=0)
    if longest > c.max_pos:
        raise SwarrError(f"a prompt of {longest} tokens is longer than the model's context "
                         f"({c.max_pos} positions, max_position_embeddings)")
    rows, total = len(prompts) * n_samples, longest + max_new_tokens
    slots = sum(cache_slots(w, total) for w in model.windows)  # what make_caches will allocate
    need = rows * (2 * slots * c.n_kv_heads * c.head_dim * p.element_size() + 8 * max_new_tokens)
    free = available_memory(p.device)
    if need > free:
        raise SwarrError(f"generating {max_new_tokens} tokens for {rows} sequences needs {need / 2**30:.1f} GiB of "
                         f"KV cache, {free / 2**30:.1f} GiB is free on {p.device}: lower --max-new-tokens or the batch")


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, eos_ids=(), temperature: float = 0.0,
             top_p: float = 1.0, n_samples: int = 1, seed: int | list | None = None) -> Generation:
    """Batched sampling. Prompts may differ in length. n_samples > 1 prefills each prompt once and clones
    its cache into n_samples rows (rows r*n .. r*n+n-1 belong to prompt r), as group sampling in RL wants.

    >>> g = generate(model, [[1, 2, 3], [4, 5]], 8, eos_ids=[0])   # greedy
    >>> g.tokens.shape, g.lengths                                   # (2, 8), tensor([8, 3]) e.g.
    """
    dev = next(model.parameters()).device
    check_generation(model, prompts, max_new_tokens, n_samples)
    caches = make_caches(model, len(prompts), max(map(len, prompts)) + max_new_tokens)
    logits = prefill(model, prompts, caches)
    if n_samples > 1:
        caches = [c.repeat_rows(n_samples) for c in caches]
        logits = logits.repeat_interleave(n_samples, 0)
    # seed: one for the batch, or one per prompt (its rows then draw the same samples in any batch, e.g. when the
    # prompts are split over processes)
    gen = [torch.Generator(device=dev).manual_seed(s) for s in seed] if isinstance(seed, list) else \
        torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    return decode_loop(model, caches, logits, max_new_tokens, eos_ids=eos_ids, temperature=temperature,
                       top_p=top_p, generator=gen)


@torch.no_grad()
def decode_loop(model: Transformer, caches: list[KVCache], logits, max_new_tokens: int, *, eos_ids=(),
                temperature: float = 0.0, top_p: float = 1.0, generator=None) -> Generation:
    """Sample from `logits` (B, vocab), feed the token back one step at a time until every row has hit a stop
    token or max_new_tokens. On CUDA the one-token step is replayed from a captured CUDA graph (at small batch,
    launching ~20 kernels per layer would otherwise cost more than the step's memory traffic)."""
    B, dev = logits.shape[0], logits.device
    for c in caches:
        if c.window is None and int(c.pos.max()) + max_new_tokens - 1 > c.slots:
            raise SwarrError(f"the full-attention cache ({c.slots} slots) cannot hold {max_new_tokens} more tokens")
    step = CudaGraphStep(model, caches, B) if dev.type == "cuda" else \
        (lambda tok: model(tok[:, None], caches=caches)[:, -1])
    eos = torch.tensor(list(eos_ids) or [-1], device=dev)
    out = torch.full((B, max_new_tokens), int(eos[0].clamp(min=0)), dtype=torch.long, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        tok = sample(logits, temperature, top_p, generator)
        out[:, t] = torch.where(done, out[:, t], tok)
        lengths += (~done).long()
        done |= torch.isin(tok, eos)
        if t == max_new_tokens - 1 or (eos_ids and bool(done.all())):
            break
        logits = step(tok)
    return Generation(out[:, :int(lengths.max()) if B else 0], lengths, done, caches)


# =====================================================================================================
# checkpoint I/O: HF folders (config.json + safetensors, single or sharded) in and out
# =====================================================================================================
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _weight_files(path: str) -> dict[str, str]:
    """tensor name -> safetensors file, from model.safetensors or model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.lexists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) and f for f in weight_map.values()):
            raise SwarrError(f"{index}: weight_map must map tensor names to file names")
        files = {n: os.path.join(path, f) for n, f in weight_map.items()}
    else:
        single = os.path.join(path, "model.safetensors")
        if not os.path.exists(single):
            raise SwarrError(f"{path}: no model.safetensors or model.safetensors.index.json")
        files = {n: single for n in _safe(single, lambda f: list(f.keys()))}
    for fn in set(files.values()):
        if not os.path.exists(fn):
            raise SwarrError(f"{fn}: shard listed in the index is missing")
        if not os.path.isfile(fn):  # a folder, FIFO or device: safetensors would fail or block on it
            raise SwarrError(f"{fn}: not a regular file")
    return files


def _safe(fn: str, use):
    """Open a safetensors file and apply `use` to it, turning a truncated/corrupt file into one clear error."""
    try:
        with safe_open(fn, framework="pt") as f:
            return use(f)
    except SwarrError:
        raise
    except Exception as e:  # safetensors raises its own error types for header/size problems
        raise SwarrError(f"{fn}: cannot read safetensors file ({str(e).splitlines()[0]})") from None


def check_size(cfg: Config, files: dict, element_size: int, device, where: str):
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


def load(path: str, dtype=torch.float32, device="cpu") -> tuple[Transformer, Tokenizer]:
    """Load a local HF model folder: config.json, safetensors weights, tokenizer.json. Each tensor is read
    from disk straight into its parameter (no second full copy of the model is ever held)."""
    dtype = DTYPES.get(dtype, dtype)
    if not path:
        raise SwarrError("no model folder given (--model)")
    recover(path, clean=False)  # a save interrupted at its switch leaves `path` missing for an instant: finish it
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise SwarrError(f"{path}: model folder not found" if not os.path.exists(path) else f"{path}: not a folder")
    cfg = Config.from_hf(read_json(cfg_path), cfg_path)
    tok = Tokenizer(os.path.join(path, "tokenizer.json"))
    if tok.vocab_size > cfg.vocab_size:  # an id past the embedding would fail only at generation
        raise SwarrError(f"{tok.path}: token ids go up to {tok.vocab_size - 1}, but config.json's vocab_size "
                         f"(the embedding) is {cfg.vocab_size}")
    files = _weight_files(path)
    check_size(cfg, files, torch.empty(0, dtype=dtype).element_size(), device, cfg_path)
    model = Transformer.empty(cfg, device, dtype)
    params = dict(model.named_parameters())
    for fn in sorted(set(files.values())):
        def copy_all(f, fn=fn):
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name not in params:
                    raise SwarrError(f"{fn}: tensor {name} does not belong to a {cfg.arch} with this config.json")
                t = f.get_slice(name)
                if tuple(t.get_shape()) != tuple(params[name].shape):
                    raise SwarrError(f"{fn}: tensor {name} has shape {tuple(t.get_shape())}, "
                                     f"config.json implies {tuple(params[name].shape)}")
                with torch.no_grad():
                    params[name].copy_(f.get_tensor(name))
                params.pop(name)
        _safe(fn, copy_all)
    if cfg.tie_embeddings:
        params.pop("lm_head.weight", None)
    if params:
        raise SwarrError(f"{path}: tensor {next(iter(params))} is missing from the checkpoint")
    return model.eval(), tok


def export_config(model: Transformer, dtype) -> dict:
    """config.json for the model as it is now, windows included, in the form transformers and vLLM read."""
    cfg, windows = model.cfg, model.windows
    hf = dict(cfg.hf)
    hf["dtype"] = hf["torch_dtype"] = str(dtype).replace("torch.", "")
    ws = {w for w in windows if w is not None}
    if len(ws) > 1:
        raise SwarrError(f"HF configs hold one sliding_window for all windowed layers; this model has {sorted(ws)}")
    W = ws.pop() if ws else None
    if W is not None and None in windows:  # README "Exports": what transformers and vLLM each read
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


def save(model: Transformer, tok: Tokenizer, path: str, extra_files: dict[str, str] | None = None):
    """Write an HF folder (model.safetensors, config.json, the tokenizer's files, + extra_files name -> text) at `path`.

    Atomic at every instant (safe_io.write_folder): `path` becomes a symlink to the complete folder `.NAME.vN`
    beside it. Load the checkpoint through `path`, with swarr.load or transformers' from_pretrained."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    dtype = next(iter(state.values())).dtype
    config = json.dumps(export_config(model, dtype), indent=2)  # raises before anything is written
    # every tokenizer / chat template / generation-defaults file the checkpoint came with, byte for byte
    files = {"tokenizer.json": tok.json_text, **tok.files, **(extra_files or {}), "config.json": config}

    def write(folder: str):
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        for fname, data in files.items():
            with open(os.path.join(folder, fname), "wb") as f:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
    write_folder(path, write)


# Code outside this file (the support folder) generates, saves and loads through the model object it is given:
# model.generate(prompts, ...), model.save(tok, path), type(model).load(path). The same functions as above.
Transformer.generate, Transformer.save, Transformer.load = generate, save, staticmethod(load)


# =====================================================================================================
# command line
# =====================================================================================================
def check_device(name: str) -> torch.device:
    """--device as a torch.device that exists here: 'cpu', 'cuda', 'cuda:1' (if there are 2 GPUs), 'mps'."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise SwarrError(f"--device {name!r} is not a device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SwarrError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SwarrError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise SwarrError(f"--device {name}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise SwarrError(f"--device {name}: only cpu, cuda and mps are supported")
    return dev


SEED_LIMIT = 2 ** 32  # seeds are combined (seed * k + step) into torch/random seeds, which must stay < 2**64


def check_flags(a):
    """Numbers a command line cannot mean: one error line each, before anything loads."""
    for flag, ok, want in (("--samples", getattr(a, "samples", 1) >= 1, "at least 1"),
                           ("--temperature", 0 <= a.temperature < math.inf, "0 (greedy) or a finite positive number"),
                           ("--top-p", 0 < getattr(a, "top_p", 1.0) <= 1, "in (0, 1]"),
                           ("--max-new-tokens", a.max_new_tokens >= 1, "at least 1"),
                           ("--batch-size", getattr(a, "batch_size", 1) >= 1, "at least 1"),
                           ("--limit", getattr(a, "limit", None) is None or a.limit >= 1, "at least 1"),
                           ("--seed", 0 <= getattr(a, "seed", 0) < SEED_LIMIT, "in [0, 2**32)")):
        if not ok:
            raise SwarrError(f"{flag} must be {want}")
    if getattr(a, "window", None) is not None:
        check_window(a.window)
    check_device(a.device)


def model_from_flags(a) -> tuple[Transformer, Tokenizer]:
    """Check the flags, then load --model (in --dtype, on --device) and apply --window to every layer."""
    check_flags(a)
    model, tok = load(a.model, a.dtype, a.device)
    if a.window is not None:
        model.set_window(a.window)
    return model, tok


def cmd_eval(a):
    from support.evaluate import evaluate  # (the grader comes with it: only when evaluating)
    check_flags(a)
    out = a.out or os.path.join("runs", "eval-" + os.path.basename(a.model.rstrip("/")))
    check_out_folder(out)
    for name in ("summary.json", "samples.jsonl"):
        if os.path.isdir(os.path.join(out, name)):
            raise SwarrError(f"--out {out}: {name} there is a folder")
    try:
        records = grader.load_dataset(a.data)[:a.limit]
    except (ValueError, OSError) as e:  # malformed line (file:line in the message) or unreadable file
        raise SwarrError(str(e)) from None
    if not records:
        raise SwarrError(f"{a.data}: no records to evaluate")
    model, tok = model_from_flags(a)
    summary, rows = evaluate(model, tok, records, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                             samples=a.samples, temperature=a.temperature, chat=not a.raw, system=a.system,
                             seed=a.seed)
    summary.update(model=a.model, data=a.data, window=a.window, windows=model.windows)  # windows: as run, per layer
    os.makedirs(out, exist_ok=True)
    write_text_atomic(os.path.join(out, "samples.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    write_text_atomic(os.path.join(out, "summary.json"), json.dumps(summary, indent=2))
    line = f"accuracy {summary['accuracy']:.4f} on {summary['n']} problems"
    if a.samples > 1:
        line += f" (mean of {a.samples} samples {summary['mean_accuracy']:.4f}, majority {summary['majority_accuracy']:.4f})"
    print(f"{line}; mean length {summary['mean_length']:.1f} tokens; truncated {summary['truncated']:.1%}; "
          f"wrote {out}/summary.json and {out}/samples.jsonl")


def cmd_generate(a):
    model, tok = model_from_flags(a)
    ids = tok.encode(a.prompt, add_special_tokens=True) if a.raw else tok.encode(tok.chat(a.prompt, a.system))
    g = generate(model, [ids], a.max_new_tokens, eos_ids=tok.stop_ids(model.cfg),
                 temperature=a.temperature, top_p=a.top_p, seed=a.seed)
    print(tok.decode(g.tokens[0, :int(g.lengths[0])].tolist()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarr.py", description=__doc__.split("\n\n")[0],
                                epilog="The whole recipe on the embedded tiny model and task: python demo.py",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    def common(sp):
        sp.add_argument("--model", required=True, help="local HF model folder (config.json, *.safetensors, tokenizer.json)")
        sp.add_argument("--window", type=int, default=None, help="sliding window W for every layer (keys per query)")
        sp.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
        sp.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--system", default=None, help="system message for the chat template (default: its own)")

    g = sub.add_parser("generate", help="sample a completion for one prompt")
    common(g)
    g.add_argument("--prompt", required=True)
    g.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat format")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("eval", help="generate and grade completions for a math dataset (GSM8K, MATH, JSONL)")
    common(e)
    e.add_argument("--data", required=True, help="JSONL: GSM8K (question/answer), MATH (problem/solution), or prompt/answer")
    e.add_argument("--limit", type=int, default=None, help="first N problems only")
    e.add_argument("--samples", type=int, default=1, help="completions per problem (mean and majority accuracy)")
    e.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    e.add_argument("--max-new-tokens", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--raw", action="store_true", help="do not wrap prompts in the model's chat format")
    e.add_argument("--out", default=None, help="folder for summary.json and samples.jsonl (default runs/eval-MODEL)")
    e.set_defaults(func=cmd_eval)

    return p


def run_cli(fn, *args):
    """fn(*args) for a command line: bad input (a SwarrError) becomes one `error: ...` line and exit status 2."""
    try:
        return fn(*args)
    except SwarrError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    args = build_parser().parse_args(argv)
    run_cli(args.func, args)


# =====================================================================================================
# appendix: plumbing. Building and loading the compiled extension; the CUDA-graph decode step.
# =====================================================================================================
_ROOT = os.path.dirname(os.path.abspath(__file__))
_EXT: dict = {}  # filled by load_extension: {"ops": torch.ops.swarr or None, "cuda": bool, "why": str, "name": str}


def _build_name(with_cuda: bool) -> str:
    """Library name, unique per CPU + torch version, and with CUDA per GPU architecture + torch's CUDA version: the
    CPU code is built with -march=native and the CUDA code for one GPU, so a build folder shared between machines
    must never hand one a library compiled for another."""
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):  # Linux: the model name and the instruction-set flags
        with open("/proc/cpuinfo") as f:
            cpu = "".join(sorted({line for line in f if line.startswith(("model name", "flags", "Features"))}))
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    tag = hashlib.sha1(f"{cpu}|{platform.machine()}|{torch.__version__}|{arch_list}".encode()).hexdigest()[:10]
    if not with_cuda:
        return f"swarr_ext_{tag}"
    major, minor = torch.cuda.get_device_capability()
    return f"swarr_ext_{tag}_cuda_sm{major}{minor}_cu{(torch.version.cuda or '').replace('.', '')}"


def _cuda_plan(cpp_extension) -> tuple[bool, str]:
    """(build the CUDA kernels?, why not): a one-line reason whenever a GPU is there but they cannot be built."""
    if not torch.cuda.is_available():
        return False, ""
    cc, archs = torch.cuda.get_device_capability(), os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    listed = [tuple(map(int, a.split("."))) for a in re.findall(r"\d+\.\d+", archs)]
    if cc < (8, 0) or any(a < (8, 0) for a in listed):  # cp.async, bf16 tensor cores
        return False, f"they need sm_80 or newer; this GPU is sm_{cc[0]}{cc[1]}, TORCH_CUDA_ARCH_LIST={archs!r}"
    if listed and "PTX" not in archs and not any(a[0] == cc[0] and a <= cc for a in listed):  # no code it can run
        return False, f"TORCH_CUDA_ARCH_LIST={archs!r} builds no code this GPU (sm_{cc[0]}{cc[1]}) can run"
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
        release = re.search(r"release (\d+)\.", out).group(1)
    except (OSError, subprocess.SubprocessError, AttributeError):
        return False, f"no working nvcc at {nvcc!r} (set CUDA_HOME)"
    if release != (torch.version.cuda or "").split(".")[0]:  # torch's build refuses other CUDA major versions
        return False, f"nvcc is CUDA {release}.x but torch was built with CUDA {torch.version.cuda}"
    return True, ""


def load_extension():
    """Build csrc/ (the first time: torch.utils.cpp_extension and ninja, into ./build/; later processes load the
    cached library instantly) and load it; returns torch.ops.swarr, or None if it cannot be built."""
    if _EXT:
        return _EXT["ops"]
    from torch.utils import cpp_extension  # imported on first use: it brings in setuptools (~0.5 s)
    with_cuda, no_cuda_why = _cuda_plan(cpp_extension)
    if no_cuda_why:  # the CPU kernels are still built; CUDA tensors take the reference
        print(f"swarr: CUDA kernels not built: {no_cuda_why}; CUDA tensors use the PyTorch reference", file=sys.stderr)
    name = _build_name(with_cuda)
    build_dir = os.path.join(_ROOT, "build", name)
    sources = [os.path.join(_ROOT, "csrc", "swa_cpu.cpp")]
    sources += [os.path.join(_ROOT, "csrc", f) for f in ("swa_cuda.cpp", "swa_cuda.cu")] if with_cuda else []
    # -fopenmp: at::parallel_for is header code and threads only when compiled with OpenMP (the process's one
    # libgomp, already loaded by torch, is shared). -ffp-contract=fast: fused multiply-adds (off in ISO C++ mode).
    cflags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    if platform.machine() in ("x86_64", "AMD64"):
        cflags += ["-march=native", "-mprefer-vector-width=512"]  # built where it runs; see _build_name
    try:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
        cpp_extension.verify_ninja_availability()
        os.makedirs(build_dir, exist_ok=True)
        if not os.path.exists(os.path.join(build_dir, name + ".so")):
            print(f"swarr: compiling csrc/ into build/{name} (first use only, under a minute)", file=sys.stderr)
        cpp_extension.load(name=name, sources=sources, build_directory=build_dir, with_cuda=with_cuda,
                           extra_cflags=cflags, extra_ldflags=["-fopenmp"], extra_cuda_cflags=["-O3", "-lineinfo"],
                           is_python_module=False)
        _EXT.update(ops=torch.ops.swarr, cuda=with_cuda, why=no_cuda_why, name=name)
    except Exception as e:  # a failed build must never stop the library: the reference computes the same thing
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "error:" in ln), lines[0] if lines else type(e).__name__)  # 1st diagnostic
        _EXT.update(ops=None, cuda=False, why=why[:300])
        print(f"swarr: compiled attention unavailable ({_EXT['why']}); using the PyTorch reference", file=sys.stderr)
    return _EXT["ops"]


class CudaGraphStep:
    """The decode step `tok (B,) -> logits (B, vocab)` captured once as a CUDA graph and replayed. The caches are
    preallocated and updated in place (positions included), so the graph's memory addresses never change. The
    first two calls run eagerly (they are real steps, and warm up cuBLAS and the kernels before capture)."""

    def __init__(self, model, caches, B):
        self.model, self.caches, self.calls, self.graph = model, caches, 0, None
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=caches[0].k.device)

    def run(self):
        return self.model(self.tok, caches=self.caches)[:, -1]

    def __call__(self, tok):
        self.tok.copy_(tok[:, None])
        self.calls += 1
        if self.calls == 1:  # warm-up on a side stream, as CUDA graph capture requires
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                out = self.run()
            torch.cuda.current_stream().wait_stream(s)
            return out
        if self.graph is None:
            out = self.run()  # a real step, then capture (capturing records kernels without running them)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self.run()
            return out
        self.graph.replay()
        return self.logits.clone()


if __name__ == "__main__":
    sys.modules.setdefault("swarr", sys.modules[__name__])  # `import swarr` elsewhere gets this module, not a copy
    main()
