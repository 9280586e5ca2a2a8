"""Chunked, vectorised BLA in pure torch: the CPU training path (autograd differentiates it).

Each slot j follows a scalar-gated linear recurrence, K_t[j] = alpha_t[j] K_{t-1}[j] + w_t[j] k_t
(w is the write ``s`` of the chosen ``gates``), so inside a chunk of C tokens

    K_t[j] = g_t[j] K_start[j] + sum_{s <= t} M[t, s, j] k_s,     M[t, s, j] = w_s[j] prod_{s < u <= t} alpha_u[j]

with g_t[j] = prod_{u <= t} alpha_u[j]. The slot scores and the output of token t are then

    z[t, j] = scale * (sum_s (q_t . k_s) M[t, s, j] + g_t[j] (q_t . K_start[j]))
    o[t]    = sum_s (sum_j p[t, j] M[t, s, j]) v_s + sum_j p[t, j] g_t[j] V_start[j],   p = softmax_j z

M, g and the chunk's state update depend only on positions (never on data), so they are built
once in float64 and shared across the batch and across heads that share a window.

Products across a reset (alpha = 0) are exactly zero. Rather than taking log(0), the cumulative
log-decay skips resets and a cumulative reset count tells whether a reset lies between s and t.
Variable-length batches are laid out one document per row (padding tokens have w = 0 and
alpha = 1, so they change no state) and scattered back.

Spec section 6's write and forget gates make w and alpha depend on data: then M and g are built
per row from the gates (``data_tables``), with autograd, instead of taken from the cache.
"""

from __future__ import annotations

import math

import torch

from .checks import Problem, State
from .device_cache import device_cache
from .gates import dirichlet_gates

DEFAULT_CHUNK = 64
DATA_CHUNK = 32  # with data-dependent gates: per-row [C, C, m] tables, cheaper at half the chunk


def chunk_tables(
    positions_KC: torch.Tensor, valid_KC: torch.Tensor, windows: torch.Tensor, slots: int, gates: str,
    shifts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position-only tables for K chunks of C tokens each, float64.

    Returns M [K, Hw, C, C, m] (row t, column s) and g [K, Hw, C, m] (decay of the chunk's start
    state up to token t, inclusive; g[..., -1, :] decays the start state over the whole chunk).
    """
    w, alpha, reset = (x.transpose(1, 2) for x in dirichlet_gates(positions_KC, windows, slots, valid_KC, gates, shifts))
    return decay_tables(w, alpha, reset)


def decay_tables(w: torch.Tensor, alpha: torch.Tensor, reset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M [..., C, C, m] and g [..., C, m] from each token's writes, decays and resets [..., C, m]."""
    C = w.shape[-2]
    log_alpha = torch.log(torch.where(reset, torch.ones_like(alpha), alpha))  # a reset's 0 never meets log
    cum_log = log_alpha.cumsum(dim=-2)  # sum over u <= t, resets skipped
    cum_rst = reset.to(torch.int32).cumsum(dim=-2)  # number of resets at u <= t

    # decay[t, s] = prod_{s < u <= t} alpha_u: zero when a reset lies in (s, t].
    same_segment = cum_rst[..., :, None, :] == cum_rst[..., None, :, :]
    causal = torch.ones(C, C, dtype=torch.bool, device=w.device).tril()[:, :, None]
    keep = same_segment & causal
    log_decay = torch.where(keep, cum_log[..., :, None, :] - cum_log[..., None, :, :], torch.zeros_like(w[..., None, :]))
    M = torch.where(keep, torch.exp(log_decay), torch.zeros_like(log_decay)) * w[..., None, :, :]
    g = torch.where(cum_rst == 0, torch.exp(cum_log), torch.zeros_like(cum_log))
    return M, g


def data_tables(offsets_R, lengths_R, Lp: int, windows: tuple[int, ...], slots: int, gates: str, shifts, beta_RLG,
                log_gamma_RLG, chunk: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """M [R, NC, G, C, C, m] and g [R, NC, G, C, m] when the gates depend on data (spec section 6:
    beta and log_gamma per token and kv head, [R, Lp, G] or None): one table per row and chunk,
    the gates in float64 and the tables in ``dtype``, with autograd (no cache: they differ per batch)."""
    dev = offsets_R.device
    t = torch.arange(Lp, device=dev)
    window_t = torch.tensor(windows, device=dev)
    shift_t = None if shifts is None else torch.tensor(shifts, device=dev)
    w, alpha, _ = dirichlet_gates(offsets_R[:, None] + t, window_t, slots, t[None, :] < lengths_R[:, None], gates, shift_t,
                                  beta_RLG, log_gamma_RLG)  # fmt: skip
    R, G, m = w.shape[0], w.shape[2], w.shape[3]
    # [R, NC, G, C, m], in the compute dtype: float32 tables for float32 inputs halve the traffic
    # of the [C, C, m] products (the products over one chunk lose nothing that matters there)
    w, alpha = (x.to(dtype).reshape(R, Lp // chunk, chunk, G, m).transpose(2, 3) for x in (w, alpha))
    return decay_tables(w, alpha, alpha == 0)  # zero decays (a node's full overwrite, or underflow) as resets


@device_cache(maxsize=16)  # kept across calls: built outside CUDA graph pools (bla.kernels.device_cache)
def _table_bank(keys: tuple[tuple[int, int], ...], windows: tuple[int, ...], slots: int, gates: str, chunk: int, device: str, dtype,
                shifts: tuple[int, ...] | None = None):  # fmt: skip
    """Tables for distinct chunks, each given as (start position mod period, valid tokens)."""
    k = torch.tensor(keys, dtype=torch.int64, device=device)
    t = torch.arange(chunk, device=device)
    shift_t = None if shifts is None else torch.tensor(shifts, device=device)
    M, g = chunk_tables(k[:, :1] + t, t[None, :] < k[:, 1:], torch.tensor(windows, device=device), slots, gates, shift_t)
    return M.to(dtype), g.to(dtype)


def tables_for_rows(
    offsets_R: torch.Tensor,
    lengths_R: torch.Tensor,
    num_chunks: int,
    windows: tuple[int, ...],
    slots: int,
    gates: str,
    chunk: int,
    dtype,
    shifts: tuple[int, ...] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """M [R, NC, Hw, C, C, m] and g [R, NC, Hw, C, m] for rows starting at ``offsets_R``.

    A chunk's tables depend only on its start phase (mod the windows' common period) and on how
    many of its tokens are valid, so only the distinct ones are computed, and they are cached.
    """
    period = math.lcm(*windows)
    n = torch.arange(num_chunks, device=offsets_R.device)
    start = torch.remainder(offsets_R[:, None] + n * chunk, period)  # [R, NC]
    n_valid = (lengths_R[:, None] - n * chunk).clamp(0, chunk)
    keys_RN = torch.stack([start, n_valid], dim=-1).reshape(-1, 2)
    unique, inverse = torch.unique(keys_RN, dim=0, return_inverse=True)
    keys = tuple(map(tuple, unique.tolist()))
    M, g = _table_bank(keys, windows, slots, gates, chunk, str(offsets_R.device), dtype, shifts)
    R = offsets_R.shape[0]
    return M[inverse].unflatten(0, (R, num_chunks)), g[inverse].unflatten(0, (R, num_chunks))


def _to_rows(x: torch.Tensor, problem: Problem, index_RL: torch.Tensor, valid_RL: torch.Tensor) -> torch.Tensor:
    """[1, T, H, d] packed documents -> [N, L, H, d] one document a row, zeros past each end."""
    rows = x[0][index_RL]
    return rows * valid_RL[..., None, None].to(rows.dtype)


def bla_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    problem: Problem,
    initial_state: State | None,
    chunk: int | None = None,
    beta: torch.Tensor | None = None,
    log_gamma: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State]:
    """``beta``, ``log_gamma`` [B, T, H_kv]: the data-dependent gates of spec section 6 (None: off).
    ``chunk`` None: DEFAULT_CHUNK, or DATA_CHUNK with either gate."""
    p = problem
    dev = q.device
    cdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    data_gated = beta is not None or log_gamma is not None
    C = chunk or (DATA_CHUNK if data_gated else DEFAULT_CHUNK)

    # ---- lay sequences out as rows of length L (a multiple of C) ----
    if p.cu_seqlens is None:
        R, L = p.batch, p.seq_len
        qr, kr, vr = q, k, v
        lengths = torch.full((R,), L, dtype=torch.int64, device=dev)
        index_RL = None
    else:
        R = p.num_seqs
        lengths = p.cu_seqlens[1:] - p.cu_seqlens[:-1]
        L = int(lengths.max()) if R > 0 else 0
        t = torch.arange(L, device=dev)
        valid = t[None, :] < lengths[:, None]
        index_RL = torch.where(valid, p.cu_seqlens[:-1, None] + t[None, :], torch.zeros_like(t[None, :]))
        qr, kr, vr = (_to_rows(x, p, index_RL, valid) for x in (q, k, v))
    Lp = max(C, -(-L // C) * C)
    pad = Lp - L
    if pad:
        qr, kr, vr = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (qr, kr, vr))
    NC = Lp // C

    if data_gated:  # ---- tables from data, per row ----
        def gate_rows(x):  # [B, T, G] -> [R, Lp, G], as q's rows (past a row's end: masked as padding)
            if x is None:
                return None
            x = x if index_RL is None else x[0][index_RL]
            return torch.nn.functional.pad(x, (0, 0, 0, pad))

        M, g = data_tables(p.offset, lengths, Lp, p.windows, p.slots, p.gates, p.shifts, gate_rows(beta), gate_rows(log_gamma), C, cdtype)
    else:  # ---- position-only tables, shared across rows when every row has the same phases ----
        shared_rows = p.cu_seqlens is None and bool((p.offset == p.offset[0]).all())
        offsets, lens = (p.offset[:1], lengths[:1]) if shared_rows else (p.offset, lengths)
        same = len(set(p.windows)) == 1 and p.shifts is None
        windows = p.windows[:1] if same else p.windows  # one table serves every head
        M, g = tables_for_rows(offsets, lens, NC, windows, p.slots, p.gates, C, cdtype, p.shifts)
    g_last = g[..., -1, :]
    # M [Rg, NC, Hw, C, C, m]; g [Rg, NC, Hw, C, m]; g_last [Rg, NC, Hw, m]

    G, hpg = p.num_kv_heads, p.group_size
    qc = qr.to(cdtype).reshape(R, NC, C, G, hpg, p.head_dim_k).permute(0, 1, 3, 4, 2, 5)  # [R, NC, G, h, C, dk]
    kc = kr.to(cdtype).reshape(R, NC, C, G, p.head_dim_k).permute(0, 1, 3, 2, 4)  # [R, NC, G, C, dk]
    vc = vr.to(cdtype).reshape(R, NC, C, G, p.head_dim_v).permute(0, 1, 3, 2, 4)  # [R, NC, G, C, dv]

    # ---- inter-chunk scan of slot states (cheap: [R, G, m, d] per chunk) ----
    last_row = M[..., -1, :, :]  # [Rg, NC, Hw, C(s), m]: weight of token s in the chunk's end state
    K_local = torch.einsum("rnhsj,rnhsd->rnhjd", last_row, kc)
    V_local = torch.einsum("rnhsj,rnhsd->rnhjd", last_row, vc)
    if initial_state is None:
        K = qc.new_zeros(R, G, p.slots, p.head_dim_k)
        V = qc.new_zeros(R, G, p.slots, p.head_dim_v)
    else:
        K, V = (s.to(cdtype) for s in initial_state)
    K_starts, V_starts = [], []
    for n in range(NC):
        K_starts.append(K)
        V_starts.append(V)
        decay = g_last[:, n, :, :, None]
        K = decay * K + K_local[:, n]
        V = decay * V + V_local[:, n]
    K_st = torch.stack(K_starts, dim=1)  # [R, NC, G, m, dk]
    V_st = torch.stack(V_starts, dim=1)

    # ---- scores over slots, softmax, output ----
    S = torch.einsum("rnghtd,rngsd->rnghts", qc, kc)
    z = torch.einsum("rnghts,rngtsj->rnghtj", S, M)
    z = z + g[:, :, :, None] * torch.einsum("rnghtd,rngjd->rnghtj", qc, K_st)
    prob = torch.softmax(p.scale * z, dim=-1)
    P = torch.einsum("rnghtj,rngtsj->rnghts", prob, M)
    o = torch.einsum("rnghts,rngsd->rnghtd", P, vc)
    o = o + torch.einsum("rnghtj,rngjd->rnghtd", prob * g[:, :, :, None], V_st)

    o = o.permute(0, 1, 4, 2, 3, 5).reshape(R, Lp, p.num_heads, p.head_dim_v)[:, :L]
    if index_RL is not None:
        flat = o.new_zeros(p.seq_len, p.num_heads, p.head_dim_v)
        valid_rows = torch.arange(L, device=dev)[None, :] < lengths[:, None]
        flat = flat.index_put((index_RL[valid_rows],), o[valid_rows])
        o = flat[None]
    return o.to(q.dtype), (K, V)
