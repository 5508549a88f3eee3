"""Reading a checkpoint folder strictly, and the mapping between HF config.json fields and the model's.

(Being filled in: config.json validation, weight-file checks, size checks and the export mapping move here
from swarr.py.)
"""
from __future__ import annotations


def param_count(cfg) -> int:
    """Parameters of a swarr.Transformer with this config (q/k/v biases and Qwen3's q/k norms included), tied
    embeddings counted once. cfg: a swarr.Config."""
    D, H, Hkv, hd = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    attn = 2 * D * H * hd + 2 * D * Hkv * hd + (H * hd + 2 * Hkv * hd if cfg.qkv_bias else 0) \
        + (2 * hd if cfg.qk_norm else 0)
    layer = attn + 3 * D * cfg.hidden_dim + 2 * D
    return cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2) + cfg.n_layers * layer + D
