"""SWARR: convert a pretrained transformer to sliding-window attention, then win back its accuracy with RL.

The model, read top to bottom: config -> RMSNorm, RoPE, attention with a per-layer window, SwiGLU MLP ->
attention backends (the readable reference | the compiled kernels) -> KV caches (full | a ring buffer of W slots),
prefill and decode through the same forward, generation -> load / save HF checkpoint folders by HF tensor names.
Checking what it reads is one call into support/checkpoint.py. See README.md.
"""
from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from csrc import ops  # the compiled attention kernels, as torch.library custom ops
from support import checkpoint  # reading and checking a checkpoint folder; the HF config.json mapping
from support.flags import check_window
from support.safe_io import SwarrError, write_folder  # SwarrError: bad input, one line (users catch swarr.SwarrError)
from support.tokenizer import Tokenizer  # tokenizer.json (byte-level or SentencePiece BPE) and chat templates


# =====================================================================================================
# config: the few numbers that define a Llama / Mistral / Qwen2 / Qwen3 decoder
# =====================================================================================================
@dataclass
class Config:
    arch: str                         # LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM or Qwen3ForCausalLM
    vocab_size: int                   # rows of the embedding and of the output layer
    dim: int                          # hidden_size
    n_layers: int                     # transformer blocks
    n_heads: int                      # query heads
    n_kv_heads: int                   # key/value heads; fewer than n_heads: grouped-query attention
    head_dim: int                     # size of each head (even: RoPE rotates pairs)
    hidden_dim: int                   # intermediate_size of the SwiGLU MLP
    norm_eps: float = 1e-6            # RMSNorm epsilon
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})  # RoPE parameters
    max_pos: int = 4096               # max_position_embeddings (the longest prompt generate accepts)
    qkv_bias: bool = False            # Qwen2: biases on q, k and v
    qk_norm: bool = False             # Qwen3: RMSNorm over each head's q and k
    tie_embeddings: bool = False      # the output layer shares the embedding's weights
    windows: list = field(default_factory=list)  # per layer: int W or None (full attention)
    hf: dict = field(default_factory=dict)       # the original config.json, kept for saving

    @classmethod
    def from_hf(cls, hf: dict, where: str = "config.json") -> "Config":
        """The config of a config.json, every field checked (one SwarrError naming the file and the field)."""
        return cls(**checkpoint.config_fields(hf, where))


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
        ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / ((hi - lo) or 1e-3)).clamp(0, 1)  # as HF
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
        inv_freq, self._rope_scale = rope_frequencies(cfg)
        self.register_buffer("_inv_freq", inv_freq, persistent=False)  # float32 whatever the model's dtype: _apply
        self.checkpointing = False  # activation checkpointing per block (training memory vs compute)

    def _apply(self, fn, recurse=True):
        """.to(), .half(), .cuda() and .to_empty() pass every parameter and buffer through fn. The RoPE frequencies
        follow the device but are computed again in float32: a bfloat16 copy would shift every angle, and to_empty()
        (Transformer.empty) would leave them uninitialised."""
        super()._apply(fn, recurse)
        self._inv_freq = rope_frequencies(self.cfg)[0].to(self._inv_freq.device)
        return self

    @classmethod
    def empty(cls, cfg: Config, device="cpu", dtype=torch.float32) -> "Transformer":
        """The model with uninitialised weights, built on the meta device first (no memory, no random init) and then
        given storage on `device`: the one way to build a model whose weights are about to be copied in."""
        with torch.device("meta"):
            model = cls(cfg).to(dtype)
        model.to_empty(device=device)
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
        """cos, sin (B, 1, T, D) for absolute positions pos (B, T), computed in float32."""
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
# attention backends: the readable PyTorch reference (the specification) | the compiled kernels
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


# csrc/ implements the same two functions (and the backward) as compiled kernels, C++ on the CPU and CUDA on a GPU,
# registered as torch.library custom ops (csrc/ops.py), so autograd, fake tensors and torch.compile see them.
# ops.available(t, op) is the backend choice: whether a kernel covers t's device and dtype under the backend setting
# (SWARR_BACKEND=auto|ext|ref, ops.set_backend). Where none does, the reference computes the same thing.
def attention(q, k, v, window: int | None, scale: float | None = None) -> torch.Tensor:
    """Windowed causal attention (differentiable), same contract as attention_ref:
    q (B,Hq,N,D), k/v (B,Hkv,N,D) -> (B,Hq,N,D); window None = full causal attention."""
    if ops.available(q, "fwd"):
        return ops.attention(q, k, v, window, scale)
    return attention_ref(q, k, v, window, scale)


def decode(q, k_cache, v_cache, valid, scale: float | None = None) -> torch.Tensor:
    """One-token attention over a cache, same contract as decode_ref: q (B,Hq,D), caches (B,Hkv,S,D),
    valid (B,) = number of filled slots per row (1 <= valid <= S) -> (B,Hq,D)."""
    if ops.available(q, "decode"):
        return ops.decode(q, k_cache, v_cache, valid, scale)
    return decode_ref(q, k_cache, v_cache, valid, scale)


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
    if bool(probs.sum(-1).isnan().any()):  # (multinomial would fail on it, on CUDA with a device-side assert)
        if bool(logits.isnan().any()):
            raise SwarrError("the model's logits are NaN (its weights or activations overflow): nothing to sample")
        # a temperature so small that logits / T overflows (1e-40) leaves a row of NaN: its limit, greedy, instead
        probs = torch.where(probs.isnan().any(-1, keepdim=True),
                            torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0), probs)
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


def check_generation(model: Transformer, prompts: list[list[int]], max_new_tokens: int, n_samples: int = 1):
    """Refuse, before allocating anything, a generation that cannot run: KV caches (plus the token buffers) larger
    than the memory free on the model's device, or a prompt + max_new_tokens past the model's context."""
    c, p = model.cfg, next(model.parameters())
    longest = max(map(len, prompts), default=0)
    rows, total = len(prompts) * n_samples, longest + max_new_tokens
    slots = sum(cache_slots(w, total) for w in model.windows)  # what make_caches will allocate
    need = rows * (2 * slots * c.n_kv_heads * c.head_dim * p.element_size() + 8 * max_new_tokens)
    free = checkpoint.available_memory(p.device)
    if need > free:
        raise SwarrError(f"generating {max_new_tokens} tokens for {rows} sequences needs {need / 2**30:.1f} GiB of "
                         f"KV cache, {free / 2**30:.1f} GiB is free on {p.device}: lower --max-new-tokens or the batch")
    checkpoint.check_context(c, model.windows, longest, max_new_tokens)  # prompt + new tokens within the context


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, *, eos_ids=(), temperature: float = 0.0,
             top_p: float = 1.0, n_samples: int = 1, seed: int | list | None = None, constrain=None) -> Generation:
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
                       top_p=top_p, generator=gen, constrain=constrain)


@torch.no_grad()
def decode_loop(model: Transformer, caches: list[KVCache], logits, max_new_tokens: int, *, eos_ids=(),
                temperature: float = 0.0, top_p: float = 1.0, generator=None, constrain=None) -> Generation:
    """Sample from `logits` (B, vocab), feed the token back one step at a time until every row has hit a stop
    token or max_new_tokens. constrain(logits, tokens so far (B, t)) -> logits, if given, masks each step's choice
    (constrained decoding: a masked token gets logit -inf). On CUDA the one-token step is replayed from a captured
    CUDA graph (at small batch, launching ~20 kernels per layer would otherwise cost more than the step's memory
    traffic)."""
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
        tok = sample(logits if constrain is None else constrain(logits, out[:, :t]), temperature, top_p, generator)
        out[:, t] = torch.where(done, out[:, t], tok)
        lengths += (~done).long()
        done |= torch.isin(tok, eos)
        if t == max_new_tokens - 1 or (eos_ids and bool(done.all())):
            break
        logits = step(tok)
    return Generation(out[:, :int(lengths.max()) if B else 0], lengths, done, caches)


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


# =====================================================================================================
# checkpoint I/O: HF folders (config.json + safetensors, single or sharded) in and out, by HF tensor names
# =====================================================================================================
def load(path: str, dtype=torch.float32, device="cpu") -> tuple[Transformer, Tokenizer]:
    """Load a local HF model folder: config.json, safetensors weights, tokenizer.json. Each tensor is read
    from disk straight into its parameter (no second full copy of the model is ever held)."""
    ck = checkpoint.read(path, dtype, device)  # config.json, tokenizer.json and the shard index, each checked
    cfg = Config(**ck.config)
    model = Transformer.empty(cfg, device, ck.dtype)
    params = dict(model.named_parameters())
    for fn in sorted(set(ck.files.values())):
        def copy_all(f, fn=fn):
            for name in f.keys():
                if name.endswith("rotary_emb.inv_freq"):  # (computed from config.json, see rope_frequencies)
                    continue
                if name not in params:
                    raise SwarrError(f"{fn}: tensor {name} does not belong to a {cfg.arch} with this config.json")
                checkpoint.check_tensor(fn, name, f.get_slice(name), params[name])  # shape and dtype
                with torch.no_grad():
                    params[name].copy_(f.get_tensor(name))
                checkpoint.check_finite(fn, name, params.pop(name))  # no NaN or inf
        checkpoint.read_safetensors(fn, copy_all)
    if cfg.tie_embeddings:
        params.pop("lm_head.weight", None)
    if params:
        raise SwarrError(f"{path}: tensor {next(iter(params))} is missing from the checkpoint")
    return model.eval(), ck.tokenizer


def save(model: Transformer, tok: Tokenizer, path: str, extra_files: dict[str, str] | None = None):
    """Write an HF folder (model.safetensors, config.json, the tokenizer's files, + extra_files name -> text) at `path`.

    Atomic at every instant (safe_io.write_folder): `path` becomes a symlink to the complete folder `.NAME.vN`
    beside it. Load the checkpoint through `path`, with swarr.load or transformers' from_pretrained."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    dtype = next(iter(state.values())).dtype
    # config.json with the windows as transformers and vLLM read them; raises before anything is written
    config = json.dumps(checkpoint.export_config(model.cfg, model.windows, dtype), indent=2)
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


def main(argv=None):
    """`python swarr.py generate|eval ...`. The command line lives beside evaluation and the grader, in
    support/evaluate.py, imported only here; it is handed `load` (the support folder never imports swarr)."""
    from support import evaluate
    evaluate.main(argv, load)


if __name__ == "__main__":
    main()
