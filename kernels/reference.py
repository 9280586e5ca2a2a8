"""The recurrent definition of BLA, one token at a time (spec section 1).

Slow and obviously correct: every other backend is tested against this one. It computes in the
inputs' dtype (float64 inputs give a float64 oracle).
"""

from __future__ import annotations

import torch

from .checks import Problem, State
from .gates import DEFAULT_GATES, dirichlet_gates


def step_reference(
    q_BHK: torch.Tensor,
    k_BGK: torch.Tensor,
    v_BGV: torch.Tensor,
    state: State,
    position_B: torch.Tensor,
    windows: torch.Tensor,
    slots: int,
    scale: float,
    valid_B: torch.Tensor | None = None,
    gates: str = DEFAULT_GATES,
    shift_G: torch.Tensor | None = None,
    beta_BG: torch.Tensor | None = None,
    log_gamma_BG: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """One recurrent step for a batch of sequences; G = kv heads. Returns o [B, H, d_v] and the new
    state. ``shift_G``, ``beta_BG`` and ``log_gamma_BG``: spec section 6's extensions (None: off)."""
    K_BGMK, V_BGMV = state
    w, alpha, _ = dirichlet_gates(position_B, windows, slots, valid_B, gates, shift_G, beta_BG, log_gamma_BG)  # [B, G, m]
    w, alpha = w.to(K_BGMK.dtype), alpha.to(K_BGMK.dtype)
    K_BGMK = alpha[..., None] * K_BGMK + w[..., None] * k_BGK[:, :, None, :].to(K_BGMK.dtype)
    V_BGMV = alpha[..., None] * V_BGMV + w[..., None] * v_BGV[:, :, None, :].to(V_BGMV.dtype)
    B, H, dk = q_BHK.shape
    G = k_BGK.shape[1]
    q_BGhK = q_BHK.reshape(B, G, H // G, dk).to(K_BGMK.dtype)
    z = scale * torch.einsum("bghk,bgmk->bghm", q_BGhK, K_BGMK)
    p = torch.softmax(z, dim=-1)
    o = torch.einsum("bghm,bgmv->bghv", p, V_BGMV).reshape(B, H, -1)
    return o, (K_BGMK, V_BGMV)


def run_sequences(q, k, v, state, offset_N, windows, slots, scale, gates, shift, beta, log_gamma) -> tuple[torch.Tensor, State]:
    """Sequences of one length T side by side: q [N, T, H, d]; beta, log_gamma [N, T, G] or None."""
    outs = []
    for t in range(q.shape[1]):
        at = lambda x: None if x is None else x[:, t]  # noqa: E731
        o, state = step_reference(q[:, t], k[:, t], v[:, t], state, offset_N + t, windows, slots, scale, gates=gates,
                                  shift_G=shift, beta_BG=at(beta), log_gamma_BG=at(log_gamma))  # fmt: skip
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(q.shape[0], 0, q.shape[2], v.shape[-1])
    return o, state


def bla_reference(q, k, v, problem: Problem, initial_state: State | None, beta=None, log_gamma=None) -> tuple[torch.Tensor, State]:
    p = problem
    windows, shift = p.window_tensor(q.device), p.shift_tensor(q.device)
    state_dtype = q.dtype
    if initial_state is None:
        K0 = q.new_zeros(p.num_seqs, p.num_kv_heads, p.slots, p.head_dim_k, dtype=state_dtype)
        V0 = q.new_zeros(p.num_seqs, p.num_kv_heads, p.slots, p.head_dim_v, dtype=state_dtype)
    else:
        K0, V0 = (s.to(state_dtype) for s in initial_state)
    if p.cu_seqlens is None:
        o, state = run_sequences(q, k, v, (K0, V0), p.offset, windows, p.slots, p.scale, p.gates, shift, beta, log_gamma)
        return o.to(q.dtype), state
    outs, Ks, Vs = [], [], []
    bounds = p.cu_seqlens.tolist()
    for n in range(p.num_seqs):
        a, b = bounds[n], bounds[n + 1]
        doc = lambda x: None if x is None else x[:, a:b]  # noqa: E731
        o, (Kn, Vn) = run_sequences(q[:, a:b], k[:, a:b], v[:, a:b], (K0[n : n + 1], V0[n : n + 1]), p.offset[n : n + 1],
                                     windows, p.slots, p.scale, p.gates, shift, doc(beta), doc(log_gamma))  # fmt: skip
        outs.append(o)
        Ks.append(Kn)
        Vs.append(Vn)
    return torch.cat(outs, dim=1).to(q.dtype), (torch.cat(Ks), torch.cat(Vs))
