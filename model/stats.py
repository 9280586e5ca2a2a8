"""Parameter count, FLOPs per token and recurrent state size of a model config (spec section 3).

Computed from the config alone (no model is built), so presets up to billions of parameters
can be tabulated instantly; tests check ``param_count`` against a built model.
"""

from __future__ import annotations

from .config import ModelConfig


def mixer_params(cfg: ModelConfig, kind: str) -> int:
    D, H, Hkv, d = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    n = 2 * H * d * D + 2 * Hkv * d * D  # q, o, k, v
    if kind in ("bla", "gsa"):
        b = cfg.bla
        n += (D + 1) * Hkv * b.slots if kind == "gsa" else 0  # the decay projection
        n += H * d * D if b.output_gate else 0
        n += (H + 2 * Hkv) * d * b.short_conv
        n += d if b.output_norm else 0
    else:
        n += (H + 2 * Hkv) * d * cfg.attn_short_conv
    return n


def param_count(cfg: ModelConfig, include_embeddings: bool = True) -> int:
    """Trainable parameters (a tied head counted once)."""
    D = cfg.d_model
    per_block = [2 * D + 3 * D * cfg.mlp_hidden + mixer_params(cfg, kind) for kind in cfg.mixers]
    n = sum(per_block) + D
    if include_embeddings:
        n += cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    elif not cfg.tie_embeddings:
        n += cfg.vocab_size * D  # the head is a matrix product like any other
    return n


def mixer_flops_per_token(cfg: ModelConfig, kind: str, seq_len: int) -> float:
    """Forward FLOPs per token of one mixer's token mixing (projections excluded: they are in 6N)."""
    H, d = cfg.n_heads, cfg.head_dim
    if kind in ("bla", "gsa"):
        return 4 * H * cfg.bla.slots * (d + d)
    if kind == "attn":
        return 2 * H * d * seq_len  # half of the full square
    # swa: two matrix products over min(W, t + 1) keys, averaged over the sequence
    W, T = cfg.swa_window, seq_len
    keys = (min(W, T) * (min(W, T) + 1) / 2 + max(T - W, 0) * W) / T
    return 4 * H * d * keys


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 6N (2N forward) plus the mixers (x3 for forward + backward)."""
    n = param_count(cfg)
    mix = sum(mixer_flops_per_token(cfg, kind, seq_len) for kind in cfg.mixers)
    return (6 * n + 3 * mix) if training else (2 * n + mix)


def layer_state_elements(cfg: ModelConfig, kind: str, seq_len: int) -> int:
    Hkv, d = cfg.kv_heads, cfg.head_dim
    if kind in ("bla", "gsa"):
        return Hkv * cfg.bla.slots * (d + d)
    if kind == "swa":
        return Hkv * min(cfg.swa_window, seq_len) * (d + d)
    return Hkv * seq_len * (d + d)


def state_size(cfg: ModelConfig, seq_len: int, bytes_per_element: int = 2) -> dict[str, int]:
    """Recurrent state (BLA slots, KV caches) per sequence at context ``seq_len``, summed over layers."""
    elements = sum(layer_state_elements(cfg, kind, seq_len) for kind in cfg.mixers)
    return {"elements": elements, "bytes": elements * bytes_per_element}
