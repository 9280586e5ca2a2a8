"""Parameter count, FLOPs per token and recurrent state size of a model config (spec section 3).

Computed from the config alone (no model is built), so presets up to billions of parameters
can be tabulated instantly; each mixer kind declares its own share (``bla.model.registry``);
tests check ``param_count`` against a built model.
"""

from __future__ import annotations

from .config import ModelConfig
from .registry import mixer_kind


def param_count(cfg: ModelConfig, include_embeddings: bool = True) -> int:
    """Trainable parameters (a tied head counted once)."""
    D = cfg.d_model
    per_block = [2 * D + 3 * D * cfg.mlp_hidden + mixer_kind(kind).params(cfg) for kind in cfg.mixers]
    n = sum(per_block) + D
    if include_embeddings:
        n += cfg.vocab_size * D * (1 if cfg.tie_embeddings else 2)
    elif not cfg.tie_embeddings:
        n += cfg.vocab_size * D  # the head is a matrix product like any other
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token: 6N (2N forward) plus the mixers (x3 for forward + backward)."""
    n = param_count(cfg)
    mix = sum(mixer_kind(kind).flops_per_token(cfg, seq_len) for kind in cfg.mixers)
    return (6 * n + 3 * mix) if training else (2 * n + mix)


def state_size(cfg: ModelConfig, seq_len: int, bytes_per_element: int = 2) -> dict[str, int]:
    """Recurrent state (BLA slots, KV caches) per sequence at context ``seq_len``, summed over layers."""
    elements = sum(mixer_kind(kind).state_elements(cfg, seq_len) for kind in cfg.mixers)
    return {"elements": elements, "bytes": elements * bytes_per_element}
