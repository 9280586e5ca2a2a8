"""The mixer kind ``gsa``: BLA's layer with GSA's learned, data-dependent slot decay in place of
the Dirichlet gates (the linear baseline of the state sweeps). A whole mixer kind in one module:
the class, its FLOPs, parameters and state, registered at import."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bla.kernels.gsa import gsa_chunked

from .config import ModelConfig
from .mixers import BLAMixer, bla_params, bla_validate, slot_flops, slot_state
from .registry import MixerKind, register

GSA_TAU = 8.0  # GSA's damping of the forget gate: alpha = sigmoid(x W)^(1/tau)


class GSAMixer(BLAMixer):
    """Same projections as the BLA layer, state ``m x 2d`` per kv head."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.decay_proj = nn.Linear(cfg.d_model, cfg.kv_heads * cfg.bla.slots, bias=True)

    def mix(self, q, k, v, x, positions, cu_seqlens, state, keep_state: bool, gates: dict):
        B, T = x.shape[:2]
        g = F.logsigmoid(self.decay_proj(x).float()).view(B, T, self.n_kv_heads, self.slots) / GSA_TAU
        if cu_seqlens is None:
            o, state = gsa_chunked(q, k, v, g, initial_state=state)
            return o, (state if keep_state else None)
        # packed documents: each from a zero state (a loop over documents; the sweeps do not pack)
        cu = cu_seqlens.tolist()
        outs = [gsa_chunked(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b])[0] for a, b in zip(cu[:-1], cu[1:]) if b > a]
        return torch.cat(outs, dim=1), None


def gsa_validate(cfg: ModelConfig) -> list[str]:
    steered = [name for name in ("write_gate", "forget_gate") if getattr(cfg.bla, name)] + (
        ["phase_shift"] if cfg.bla.phase_shift != "off" else [])  # fmt: skip
    return bla_validate(cfg) + [f"bla.{name} is BLA's (spec section 6); gsa layers learn their own decay" for name in steered]


register(MixerKind(
    "gsa", GSAMixer, lambda cfg: bla_params(cfg) + (cfg.d_model + 1) * cfg.kv_heads * cfg.bla.slots,
    slot_flops, slot_state, validate=gsa_validate,
    exchange=None,  # GSA's learned decay has no position-only Gamma to scan: not sequence-parallel
))  # fmt: skip
