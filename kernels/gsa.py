"""Gated Slot Attention (GSA, Zhang et al. 2024) with data-dependent gates: the linear baseline
of the state-size sweeps. BLA is GSA whose decay comes from Dirichlet kernels of the position;
here the decay is learned from the input, as in GSA itself.

Per kv head, with slot decays ``alpha_t = exp(g_t)`` (``g_t`` in R^m, ``g <= 0``) and writes
``1 - alpha_t``:

    K_t = diag(alpha_t) K_{t-1} + (1 - alpha_t) k_t^T      V_t likewise with v_t
    o_t = V_t^T softmax(scale * K_t q_t)

The state is ``m x (d_k + d_v)`` per kv head, the same as BLA's with m slots. ``gsa_recurrent``
is the reference (one token at a time); ``gsa_chunked`` computes chunks of C tokens with matrix
products and carries the state across chunks. Inside a chunk the decay is factored as
``exp(b_t) * exp(-b_s)`` (``b`` the cumulative log decay from the chunk start); ``g`` is clamped
at ``LOG_DECAY_MIN`` per token so that ``exp(-b)`` stays inside float32 over a chunk. A decay that
strong (alpha < 0.007) erases the slot in one token either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK = 16
LOG_DECAY_MIN = -5.0  # x CHUNK = -80: exp(80) ~ 5.5e34 < float32 max


def _check(q, k, v, log_decay):
    B, T, H, dk = q.shape
    if k.shape[:2] != (B, T) or v.shape[:3] != k.shape[:3] or log_decay.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"gsa: expected q [B,T,H,d], k [B,T,Hkv,d], v [B,T,Hkv,dv], log_decay [B,T,Hkv,m]; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(log_decay.shape)}"
        )
    if H % k.shape[2]:
        raise ValueError(f"gsa: kv heads {k.shape[2]} must divide query heads {H}")


def _initial(q, k, v, log_decay, initial_state):
    B, _, Hkv, dk = k.shape
    m, dv = log_decay.shape[-1], v.shape[-1]
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if initial_state is None:
        return q.new_zeros(B, Hkv, m, dk, dtype=dtype), q.new_zeros(B, Hkv, m, dv, dtype=dtype)
    return tuple(s.to(dtype) for s in initial_state)


def gsa_recurrent(q, k, v, log_decay, scale=None, initial_state=None):
    """Reference: o [B, T, H, d_v] and the final state (K [B, Hkv, m, d_k], V [B, Hkv, m, d_v])."""
    _check(q, k, v, log_decay)
    B, T, H, dk = q.shape
    G = H // k.shape[2]
    scale = dk**-0.5 if scale is None else scale
    K, V = _initial(q, k, v, log_decay, initial_state)
    dtype = K.dtype
    out = []
    for t in range(T):
        alpha = log_decay[:, t].to(dtype).clamp(min=LOG_DECAY_MIN).exp()[..., None]  # [B, Hkv, m, 1]
        K = alpha * K + (1 - alpha) * k[:, t, :, None, :].to(dtype)
        V = alpha * V + (1 - alpha) * v[:, t, :, None, :].to(dtype)
        qt = q[:, t].to(dtype).unflatten(1, (-1, G))  # [B, Hkv, G, dk]
        p = torch.softmax(scale * qt @ K.transpose(-1, -2), dim=-1)  # [B, Hkv, G, m]
        out.append((p @ V).flatten(1, 2))
    return torch.stack(out, 1).to(q.dtype), (K, V)


def gsa_chunked(q, k, v, log_decay, scale=None, initial_state=None, chunk: int = CHUNK):
    """Same result as ``gsa_recurrent``, C tokens at a time (autograd gives the backward)."""
    _check(q, k, v, log_decay)
    B, T, H, dk = q.shape
    Hkv, dv = k.shape[2], v.shape[-1]
    G = H // Hkv
    scale = dk**-0.5 if scale is None else scale
    K, V = _initial(q, k, v, log_decay, initial_state)
    dtype = K.dtype
    pad = -T % chunk
    N = (T + pad) // chunk

    def blocks(x):  # [B, T, Hkv, ...] -> [B, Hkv, N, C, ...], zero-padded to whole chunks
        x = F.pad(x.to(dtype), (0, 0) * (x.dim() - 2) + (0, pad))
        return x.unflatten(1, (N, chunk)).movedim(3, 1)

    # padded tokens keep the state (decay 0 in log space, write 0)
    g = blocks(log_decay.clamp(min=LOG_DECAY_MIN))  # [B, Hkv, N, C, m]
    b = g.cumsum(3)  # log decay from the chunk start through t
    write = -torch.expm1(g)  # 1 - alpha
    kc, vc = blocks(k), blocks(v)  # [B, Hkv, N, C, d]
    qc = blocks(q.unflatten(2, (Hkv, G)).flatten(3)).unflatten(-1, (G, dk)).transpose(3, 4)  # [B, Hkv, N, G, C, dk]
    into = write * torch.exp(-b)  # how token s enters, seen from the chunk start
    tail = torch.exp(b[:, :, :, -1:] - b) * write  # how token s is held at the chunk end

    # the state at every chunk start: a short loop over chunks
    K_starts, V_starts = [], []
    for n in range(N):
        K_starts.append(K)
        V_starts.append(V)
        keep = torch.exp(b[:, :, n, -1])[..., None]  # [B, Hkv, m, 1]
        K = keep * K + tail[:, :, n].transpose(-1, -2) @ kc[:, :, n]
        V = keep * V + tail[:, :, n].transpose(-1, -2) @ vc[:, :, n]
    K0, V0 = torch.stack(K_starts, 2), torch.stack(V_starts, 2)  # [B, Hkv, N, m, d]

    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    eb = torch.exp(b)[:, :, :, None]  # [B, Hkv, N, 1, C, m]
    # scores z = K_t q_t: the carried state, then this chunk's tokens
    A = (qc @ kc[:, :, :, None].transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, Hkv, N, G, C, C]
    z = eb * (qc @ K0[:, :, :, None].transpose(-1, -2) + A @ into[:, :, :, None])
    p = torch.softmax(scale * z, dim=-1)  # [B, Hkv, N, G, C, m]
    # o = V_t^T p: the carried state, then this chunk's tokens
    pe = p * eb
    M = (pe @ into[:, :, :, None].transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, Hkv, N, G, C, C]
    o = pe @ V0[:, :, :, None] + M @ vc[:, :, :, None]  # [B, Hkv, N, G, C, dv]
    o = o.permute(0, 2, 4, 1, 3, 5).reshape(B, N * chunk, H, dv)[:, :T]
    return o.to(q.dtype), (K, V)
