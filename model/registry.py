"""The one registry of token-mixer kinds.

A kind is everything the stack needs to know about one mixer, declared once beside its class:
how to build it, its parameters, FLOPs and state size (``bla.model.stats``, MFU, the sweeps'
state axis), what its config must satisfy, and which sequence-parallel exchange it needs
(``bla.train.sequence_parallel`` supplies one per exchange name). Nothing else lists kinds.

Adding a mixer is one module: define the ``nn.Module`` (``forward(x, positions, cu_seqlens,
cache, rope) -> (y, cache)``, ``rope`` being RoPE's shared (cos, sin) table or None, and
``new_cache(max_context)``; for ``bla.model.decode``'s static decoding also ``static_buffers``,
``load_static`` and ``decode_step``), then ``register(MixerKind(...))`` at import.
``tests/test_architecture.py`` adds one that way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # the config module imports this one lazily (validation), not the reverse at run time
    from torch import nn

    from .config import ModelConfig

# what crosses a slice boundary under sequence parallelism; the short convolution's halo comes with each
EXCHANGES = ("state_scan", "kv_gather", "kv_halo")


@dataclass(frozen=True)
class MixerKind:
    name: str
    build: Callable[["ModelConfig"], "nn.Module"]
    params: Callable[["ModelConfig"], int]  # trainable parameters of one layer
    flops_per_token: Callable[["ModelConfig", int], float]  # forward token mixing at context T (projections excluded)
    state_elements: Callable[["ModelConfig", int], int]  # decode state per sequence at context T
    validate: Callable[["ModelConfig"], list[str]] = lambda cfg: []  # what this kind needs of the config
    exchange: str | None = None  # sequence-parallel exchange (EXCHANGES); None: not sequence-parallel


MIXERS: dict[str, MixerKind] = {}


def register(kind: MixerKind) -> MixerKind:
    if kind.name in MIXERS:
        raise ValueError(f"mixer kind {kind.name!r} is registered already")
    if kind.exchange is not None and kind.exchange not in EXCHANGES:
        raise ValueError(f"mixer kind {kind.name!r}: exchange must be one of {EXCHANGES} or None, got {kind.exchange!r}")
    MIXERS[kind.name] = kind
    return kind


def mixer_kind(name: str) -> MixerKind:
    try:
        return MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; expected one of {tuple(MIXERS)}") from None


def projection_params(cfg: "ModelConfig") -> int:
    """q, k, v and o of any attention-like mixer."""
    D, H, Hkv, d = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
    return 2 * H * d * D + 2 * Hkv * d * D
