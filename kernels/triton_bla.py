"""BLA in Triton: fused chunked forward and backward, variable length, decode.

Per chunk of C tokens and kv head:

* the gates come from token positions inside the kernel (a few sines; no gate tensors);
* the intra-chunk decay prod_{s<u<=t} alpha_u[j] is factorised as A[t, j] * B[s, j] with
  A = exp(L), B = w exp(-L), L the chunk's cumulative log-decay with resets skipped; pairs
  (s, t) separated by a reset of slot j (a different "epoch" count) are masked, one matmul
  per epoch (two when W >= C). So the slot scores are matmuls, not a [C, C, m] tensor;
* the softmax over slots sits between the two passes on chip: z -> p -> o never leave it.

The chunk size is chosen per window so that |L| stays far inside fp32's exp range (a host-side
check over all phases); windows whose stride W/m is too coarse for even C = 16 are refused with
the reason (``backend="auto"`` then uses the torch backend).

Parallelism. Every slot is reset within any W consecutive tokens, so the state at a position
depends only on the W tokens before it (or on the document's start and initial state when
that is closer). The forward therefore splits each sequence into segments of at least
max(W, 512) tokens: a program rebuilds its segment's start state exactly from the preceding
W tokens (state updates only), then runs the segment with the state in registers, saving each
chunk's start state when gradients are needed. The backward is chunk-parallel in three
steps: (A) per chunk, dq and the intra-chunk parts of dk, dv, plus the chunk's own gradient
with respect to its start state; (B) a reverse scan of the state gradients over chunks (a few
[m, d] tiles per chunk); (C) per chunk, the state path's share of dk, dv.
"""

from __future__ import annotations

import functools
import os

import torch

try:  # a guarded import: exported models (bla export) run without Triton, on the torch backend
    import triton
    import triton.language as tl
except ImportError as exc:
    raise ImportError(f"the Triton BLA kernels need triton: {exc}") from exc

from .checks import Problem, State
from .gates import GATE_CODES, dirichlet_gates

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
LOG_RANGE_LIMIT = 50.0  # |cumulative log-decay| allowed inside a chunk (exp(50) ~ 5e21 in fp32)
CHUNK_CHOICES = (32, 16)  # 32 measured faster than 64 on H100 (docs/benchmarks.md)


# ----------------------------------------------------------------------------- host-side planning


@functools.lru_cache(maxsize=64)
def max_log_range(window: int, slots: int, chunk: int, gates: str) -> float:
    """Largest |cumulative log-decay| (resets skipped) over any chunk start phase and slot."""
    pos = torch.arange(window + chunk)
    _, alpha, reset = dirichlet_gates(pos, torch.tensor([window]), slots, gates=gates)
    la = torch.where(reset, torch.zeros_like(alpha), torch.log(alpha))[:, 0]  # [W + C, m]
    prefix = torch.cat([torch.zeros(1, slots, dtype=la.dtype), la.cumsum(0)])  # prefix[i] = sum la[:i]
    windows = prefix[1:].unfold(0, chunk, 1)[:window]  # [W, m, C]: sum la[:p0 + t + 1]
    rel = windows - prefix[:window, :, None]  # L(p0, t) = sum la[p0 : p0 + t + 1]
    return float(rel.abs().max())


def plan_chunk(windows: tuple[int, ...], slots: int, gates: str) -> tuple[int | None, str]:
    """The largest chunk size safe for every window, or None and the reason."""
    for chunk in CHUNK_CHOICES:
        worst = max(max_log_range(w, slots, chunk, gates) for w in set(windows))
        if worst <= LOG_RANGE_LIMIT:
            return chunk, f"chunk {chunk} (max |log decay| {worst:.1f})"
    return None, (
        f"stride W/m = {max(windows) // slots} is too coarse for the factorised Triton kernel: the "
        f"log-decay of gates={gates!r} inside a 16-token chunk reaches {worst:.0f} > {LOG_RANGE_LIMIT:.0f} "
        "(fp32 exp range of the factorised decays)"
    )


def supports(problem: Problem) -> tuple[bool, str]:
    if problem.slots == 1:
        return False, "one slot resets at every token (a degenerate BLA); the torch backend computes it"
    chunk, why = plan_chunk(problem.windows, problem.slots, problem.gates)
    return chunk is not None, why


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


# ----------------------------------------------------------------------------- shared device code


@triton.jit
def _chunk_gates(pos0, t_C, n_valid, W, r, j_M, mask_M, M: tl.constexpr, EVEN_M: tl.constexpr, GATES: tl.constexpr):
    """Gates of one chunk whose first token sits at position pos0 and has n_valid tokens.

    Returns s [C, BM] (writes), L [C, BM] (cumulative log-decay, resets skipped) and cnt [C, BM]
    (resets of slot j among tokens 0..t: the epoch). Tokens past the end and padded slots get
    s = 0 and log alpha = 0, and do not advance the epoch. GATES: 0 dirichlet (s = d,
    alpha = 1 - d^2), 1 fejer (s = d^2, alpha = 1 - d^2), 2 dirichlet_v1 (s = d, alpha = 1 - d).
    """
    valid_C = t_C < n_valid
    x0 = (pos0 % W - j_M * r + W) % W  # [BM] phase distance of token 0 from each node (% truncates in C)
    xr = x0[None, :] + tl.minimum(t_C, n_valid - 1)[:, None]  # [C, BM]
    x = xr % W
    cnt = xr // W + (x0[None, :] == 0).to(tl.int32)
    on_node = (x % r) == 0
    xf = tl.where(on_node, 0.5, x.to(tl.float32))
    num = tl.sin(3.141592653589793 * ((M * x) % (2 * W)).to(tl.float32) / W)
    ang = 3.141592653589793 * xf / W
    if EVEN_M:
        den = M * tl.sin(ang) / tl.cos(ang)
    else:
        den = M * tl.sin(ang)
    d = tl.where(on_node, tl.where(x == 0, 1.0, 0.0), num / den)
    keep = valid_C[:, None] & mask_M[None, :]
    d = tl.where(keep, d, 0.0)
    if GATES == 2:
        alpha = 1.0 - d
    else:
        alpha = 1.0 - d * d
    if GATES == 1:
        s = d * d
    else:
        s = d
    la = tl.log(tl.where(keep & (x != 0), alpha, 1.0))  # resets, padding: log 1 = 0
    L = tl.cumsum(la, axis=0)
    return s, L, cnt


@triton.jit
def _chunk_decays(pos0, t_C, n_valid, W, r, j_M, mask_M, M: tl.constexpr, EVEN_M: tl.constexpr, C: tl.constexpr,
                  GATES: tl.constexpr):
    """The factorised decays of one chunk.

    A [C, BM], B [C, BM]: prod_{s<u<=t} alpha_u[j] w_s[j] = A[t, j] B[s, j] within an epoch;
    g_start [C, BM]: decay of the chunk's start state up to t; g_end [BM]: over the whole chunk;
    B_end [C, BM]: weight of token s in the chunk's end state; cnt [C, BM]: epochs.
    """
    w, L, cnt = _chunk_gates(pos0, t_C, n_valid, W, r, j_M, mask_M, M, EVEN_M, GATES)
    A = tl.exp(L)
    B = w * tl.exp(-L)
    g_start = tl.where(cnt == 0, A, 0.0)
    A_last = tl.sum(tl.where(t_C[:, None] == C - 1, A, 0.0), axis=0)  # [BM]
    cnt_last = tl.max(cnt, axis=0)  # cnt never decreases along t
    g_end = tl.where(cnt_last == 0, A_last, 0.0)
    B_end = tl.where(cnt == cnt_last[None, :], B * A_last[None, :], 0.0)
    return A, B, g_start, g_end, B_end, cnt


@triton.jit
def _tile_indices(C: tl.constexpr, M: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr,
                  DV: tl.constexpr, BDV: tl.constexpr):  # fmt: skip
    """Index vectors and masks of every kernel: tokens of a chunk, slots, key and value columns."""
    t_C = tl.arange(0, C)
    j_M = tl.arange(0, BM)
    dk_D = tl.arange(0, BDK)
    dv_D = tl.arange(0, BDV)
    return t_C, j_M, j_M < M, dk_D, dv_D, dk_D < DK, dv_D < DV


@triton.jit
def _state_tile(row, j_M, dk_D, dv_D, mask_M, mask_DK, mask_DV, DK: tl.constexpr, DV: tl.constexpr):
    """Offsets and masks of one (K [m, d_k], V [m, d_v]) state whose first slot row is ``row``."""
    k_offs = (row + j_M[:, None]) * DK + dk_D[None, :]
    v_offs = (row + j_M[:, None]) * DV + dv_D[None, :]
    return k_offs, v_offs, mask_M[:, None] & mask_DK[None, :], mask_M[:, None] & mask_DV[None, :]


@triton.jit
def _mm(a, b, DT: tl.constexpr):
    """a @ b with fp32 accumulation: operands in DT (bf16/fp16 for half inputs), or exact fp32."""
    if DT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _load_tokens(ptr, tok_C, valid_C, head, d_D, mask_D, N_HEADS: tl.constexpr, D: tl.constexpr):
    offs = tok_C[:, None] * (N_HEADS * D) + head * D + d_D[None, :]
    return tl.load(ptr + offs, mask=valid_C[:, None] & mask_D[None, :], other=0.0)


@triton.jit
def _store_tokens(ptr, val, tok_C, valid_C, head, d_D, mask_D, N_HEADS: tl.constexpr, D: tl.constexpr):
    offs = tok_C[:, None] * (N_HEADS * D) + head * D + d_D[None, :]
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=valid_C[:, None] & mask_D[None, :])


@triton.jit
def _through_slots(X, B, cnt, E: tl.constexpr, DT: tl.constexpr):
    """sum_s X[t, s] B[s, j] over s in t's epoch of slot j: X [C, C] -> [C, BM]."""
    out = tl.zeros(B.shape, dtype=tl.float32)
    for e in tl.static_range(E):
        sel = cnt == e
        out += tl.where(sel, _mm(X, tl.where(sel, B, 0.0), DT), 0.0)
    return out


@triton.jit
def _pair_weights(Y, B, cnt, causal, E: tl.constexpr, DT: tl.constexpr):
    """sum_j Y[t, j] B[s, j] over slots where s and t share an epoch, causal: [C, BM] -> [C, C]."""
    out = tl.zeros([Y.shape[0], Y.shape[0]], dtype=tl.float32)
    for e in tl.static_range(E):
        sel = cnt == e
        out += _mm(tl.where(sel, Y, 0.0), tl.trans(tl.where(sel, B, 0.0)), DT)
    return tl.where(causal, out, 0.0)


@triton.jit
def _slot_probs(b_q, b_k, b_K, A, B, g_start, cnt, causal, mask_M, scale, E: tl.constexpr, DT: tl.constexpr):
    """Softmax over slots of scale * K_t q_t for every token of the chunk: [C, BM]."""
    S = tl.where(causal, _mm(b_q, tl.trans(b_k), DT), 0.0)  # [C, C]
    z = _mm(b_q, tl.trans(b_K), DT) * g_start + A * _through_slots(S, B, cnt, E, DT)
    z = tl.where(mask_M[None, :], scale * z, float("-inf"))
    p = tl.exp(z - tl.max(z, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


# ----------------------------------------------------------------------------- forward


@triton.jit
def _bla_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,
    h0k_ptr, h0v_ptr, hk_ptr, hv_ptr, kst_ptr, vst_ptr,
    seq_start_ptr, seq_len_ptr, offset_ptr, chunk_base_ptr, window_ptr, item_seq_ptr, item_chunk_ptr,
    scale,
    H: tl.constexpr, HKV: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
    DK: tl.constexpr, BDK: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    C: tl.constexpr, E: tl.constexpr, EVEN_M: tl.constexpr, GATES: tl.constexpr, SEG_CHUNKS: tl.constexpr, DT: tl.constexpr,
    USE_H0: tl.constexpr, STORE_CHUNKS: tl.constexpr,
):  # fmt: skip
    item = tl.program_id(0)
    g = tl.program_id(1)
    HPG: tl.constexpr = H // HKV
    n = tl.load(item_seq_ptr + item)
    c_first = tl.load(item_chunk_ptr + item)
    bos = tl.load(seq_start_ptr + n)
    seq_len = tl.load(seq_len_ptr + n)
    offset = tl.load(offset_ptr + n)
    chunk_base = tl.load(chunk_base_ptr + n)
    W = tl.load(window_ptr + g)
    r = W // M

    t_C, j_M, mask_M, dk_D, dv_D, mask_DK, mask_DV = _tile_indices(C, M, BM, DK, BDK, DV, BDV)
    causal = t_C[:, None] >= t_C[None, :]  # [C(t), C(s)]
    sk_offs, sv_offs, smask_k, smask_v = _state_tile((n * HKV + g) * M, j_M, dk_D, dv_D, mask_M, mask_DK, mask_DV, DK, DV)

    # The segment's start state: exact from the W tokens before it (every slot resets there),
    # or from the document's start and initial state when that is closer.
    seg_start = c_first * C
    warm_start = seg_start - W
    if warm_start <= 0:
        c_warm = 0
        if USE_H0:
            b_K = tl.load(h0k_ptr + sk_offs, mask=smask_k, other=0.0).to(tl.float32)  # [BM, BDK]
            b_V = tl.load(h0v_ptr + sv_offs, mask=smask_v, other=0.0).to(tl.float32)  # [BM, BDV]
        else:
            b_K = tl.zeros([BM, BDK], dtype=tl.float32)
            b_V = tl.zeros([BM, BDV], dtype=tl.float32)
    else:
        c_warm = warm_start // C
        b_K = tl.zeros([BM, BDK], dtype=tl.float32)
        b_V = tl.zeros([BM, BDV], dtype=tl.float32)
    for c in range(c_warm, c_first):
        t0 = c * C
        tok_C = bos + t0 + t_C
        valid_C = (t0 + t_C) < seq_len
        _, _, _, g_end, B_end, _ = _chunk_decays(offset + t0, t_C, seq_len - t0, W, r, j_M, mask_M, M, EVEN_M, C, GATES)
        b_k = _load_tokens(k_ptr, tok_C, valid_C, g, dk_D, mask_DK, HKV, DK)
        b_v = _load_tokens(v_ptr, tok_C, valid_C, g, dv_D, mask_DV, HKV, DV)
        b_K = g_end[:, None] * b_K + _mm(tl.trans(B_end), b_k, DT)
        b_V = g_end[:, None] * b_V + _mm(tl.trans(B_end), b_v, DT)

    c_stop = tl.minimum(c_first + SEG_CHUNKS, tl.cdiv(seq_len, C))
    for c in range(c_first, c_stop):
        t0 = c * C
        valid_C = (t0 + t_C) < seq_len
        tok_C = bos + t0 + t_C
        if STORE_CHUNKS:
            ck_offs, cv_offs, _, _ = _state_tile(((chunk_base + c) * HKV + g) * M, j_M, dk_D, dv_D, mask_M, mask_DK, mask_DV, DK, DV)
            tl.store(kst_ptr + ck_offs, b_K, mask=smask_k)
            tl.store(vst_ptr + cv_offs, b_V, mask=smask_v)
        A, B, g_start, g_end, B_end, cnt = _chunk_decays(offset + t0, t_C, seq_len - t0, W, r, j_M, mask_M, M, EVEN_M, C, GATES)
        b_k = _load_tokens(k_ptr, tok_C, valid_C, g, dk_D, mask_DK, HKV, DK)  # [C, BDK]
        b_v = _load_tokens(v_ptr, tok_C, valid_C, g, dv_D, mask_DV, HKV, DV)  # [C, BDV]
        for hh in tl.static_range(HPG):
            h = g * HPG + hh
            b_q = _load_tokens(q_ptr, tok_C, valid_C, h, dk_D, mask_DK, H, DK)  # [C, BDK]
            p = _slot_probs(b_q, b_k, b_K, A, B, g_start, cnt, causal, mask_M, scale, E, DT)
            P = _pair_weights(p * A, B, cnt, causal, E, DT)
            b_o = _mm(P, b_v, DT) + _mm(p * g_start, b_V, DT)
            _store_tokens(o_ptr, b_o, tok_C, valid_C, h, dv_D, mask_DV, H, DV)
        b_K = g_end[:, None] * b_K + _mm(tl.trans(B_end), b_k, DT)
        b_V = g_end[:, None] * b_V + _mm(tl.trans(B_end), b_v, DT)

    if c_stop * C >= seq_len:  # the sequence's last segment holds its final state
        tl.store(hk_ptr + sk_offs, b_K, mask=smask_k)
        tl.store(hv_ptr + sv_offs, b_V, mask=smask_v)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bla_bwd_chunk_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, dk_ptr, dv_ptr, kst_ptr, vst_ptr, dks_ptr, dvs_ptr,
    seq_start_ptr, seq_len_ptr, offset_ptr, window_ptr, chunk_seq_ptr, chunk_idx_ptr,
    scale,
    H: tl.constexpr, HKV: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
    DK: tl.constexpr, BDK: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    C: tl.constexpr, E: tl.constexpr, EVEN_M: tl.constexpr, GATES: tl.constexpr, DT: tl.constexpr,
):  # fmt: skip
    """Step A: dq, intra-chunk dk/dv (fp32) and the chunk's gradient w.r.t. its start state."""
    i = tl.program_id(0)
    g = tl.program_id(1)
    HPG: tl.constexpr = H // HKV
    n = tl.load(chunk_seq_ptr + i)
    c = tl.load(chunk_idx_ptr + i)
    bos = tl.load(seq_start_ptr + n)
    seq_len = tl.load(seq_len_ptr + n)
    offset = tl.load(offset_ptr + n)
    W = tl.load(window_ptr + g)
    r = W // M

    t_C, j_M, mask_M, dk_D, dv_D, mask_DK, mask_DV = _tile_indices(C, M, BM, DK, BDK, DV, BDV)
    causal = t_C[:, None] >= t_C[None, :]
    sk_offs, sv_offs, smask_k, smask_v = _state_tile((i * HKV + g) * M, j_M, dk_D, dv_D, mask_M, mask_DK, mask_DV, DK, DV)

    t0 = c * C
    valid_C = (t0 + t_C) < seq_len
    tok_C = bos + t0 + t_C
    b_K = tl.load(kst_ptr + sk_offs, mask=smask_k, other=0.0)
    b_V = tl.load(vst_ptr + sv_offs, mask=smask_v, other=0.0)
    A, B, g_start, g_end, B_end, cnt = _chunk_decays(offset + t0, t_C, seq_len - t0, W, r, j_M, mask_M, M, EVEN_M, C, GATES)
    b_k = _load_tokens(k_ptr, tok_C, valid_C, g, dk_D, mask_DK, HKV, DK)
    b_v = _load_tokens(v_ptr, tok_C, valid_C, g, dv_D, mask_DV, HKV, DV)

    b_dk = tl.zeros([C, BDK], dtype=tl.float32)
    b_dv = tl.zeros([C, BDV], dtype=tl.float32)
    dK_start = tl.zeros([BM, BDK], dtype=tl.float32)
    dV_start = tl.zeros([BM, BDV], dtype=tl.float32)
    for hh in tl.static_range(HPG):
        h = g * HPG + hh
        b_q = _load_tokens(q_ptr, tok_C, valid_C, h, dk_D, mask_DK, H, DK)
        b_do = _load_tokens(do_ptr, tok_C, valid_C, h, dv_D, mask_DV, H, DV)
        p = _slot_probs(b_q, b_k, b_K, A, B, g_start, cnt, causal, mask_M, scale, E, DT)
        # dp[t, j] = dO_t . V_t[j]
        dOv = tl.where(causal, _mm(b_do, tl.trans(b_v), DT), 0.0)
        dp = _mm(b_do, tl.trans(b_V), DT) * g_start + A * _through_slots(dOv, B, cnt, E, DT)
        dz = scale * p * (dp - tl.sum(p * dp, axis=1)[:, None])  # [C, BM]
        # o = sum_j p V_t[j]
        P = _pair_weights(p * A, B, cnt, causal, E, DT)
        b_dv += _mm(tl.trans(P), b_do, DT)
        dV_start += _mm(tl.trans(p * g_start), b_do, DT)
        # z = scale K_t q_t
        Pz = _pair_weights(dz * A, B, cnt, causal, E, DT)
        b_dq = _mm(dz * g_start, b_K, DT) + _mm(Pz, b_k, DT)
        b_dk += _mm(tl.trans(Pz), b_q, DT)
        dK_start += _mm(tl.trans(dz * g_start), b_q, DT)
        _store_tokens(dq_ptr, b_dq, tok_C, valid_C, h, dk_D, mask_DK, H, DK)
    _store_tokens(dk_ptr, b_dk, tok_C, valid_C, g, dk_D, mask_DK, HKV, DK)
    _store_tokens(dv_ptr, b_dv, tok_C, valid_C, g, dv_D, mask_DV, HKV, DV)
    tl.store(dks_ptr + sk_offs, dK_start, mask=smask_k)
    tl.store(dvs_ptr + sv_offs, dV_start, mask=smask_v)


@triton.jit
def _bla_bwd_scan_kernel(
    dks_ptr, dvs_ptr, dhk_ptr, dhv_ptr, dh0k_ptr, dh0v_ptr,
    seq_len_ptr, offset_ptr, chunk_base_ptr, window_ptr,
    HKV: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
    DK: tl.constexpr, BDK: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    C: tl.constexpr, EVEN_M: tl.constexpr, GATES: tl.constexpr,
):  # fmt: skip
    """Step B: state gradients at every chunk's end, in place of the chunks' own share.

    dS_end(c - 1) = dS_start(c) = g_end(c) dS_end(c) + own(c); the first chunk's dS_start is the
    gradient of the initial state.
    """
    n = tl.program_id(0)
    g = tl.program_id(1)
    seq_len = tl.load(seq_len_ptr + n)
    offset = tl.load(offset_ptr + n)
    chunk_base = tl.load(chunk_base_ptr + n)
    W = tl.load(window_ptr + g)
    r = W // M
    t_C, j_M, mask_M, dk_D, dv_D, mask_DK, mask_DV = _tile_indices(C, M, BM, DK, BDK, DV, BDV)
    sk_offs, sv_offs, smask_k, smask_v = _state_tile((n * HKV + g) * M, j_M, dk_D, dv_D, mask_M, mask_DK, mask_DV, DK, DV)
    dK = tl.load(dhk_ptr + sk_offs, mask=smask_k, other=0.0)
    dV = tl.load(dhv_ptr + sv_offs, mask=smask_v, other=0.0)
    n_chunks = tl.cdiv(seq_len, C)
    for ii in range(0, n_chunks):
        c = n_chunks - 1 - ii
        k_offs, v_offs, _, _ = _state_tile(((chunk_base + c) * HKV + g) * M, j_M, dk_D, dv_D, mask_M, mask_DK, mask_DV, DK, DV)
        own_K = tl.load(dks_ptr + k_offs, mask=smask_k, other=0.0)
        own_V = tl.load(dvs_ptr + v_offs, mask=smask_v, other=0.0)
        tl.store(dks_ptr + k_offs, dK, mask=smask_k)
        tl.store(dvs_ptr + v_offs, dV, mask=smask_v)
        _, _, _, g_end, _, _ = _chunk_decays(offset + c * C, t_C, seq_len - c * C, W, r, j_M, mask_M, M, EVEN_M, C, GATES)
        dK = g_end[:, None] * dK + own_K
        dV = g_end[:, None] * dV + own_V
    tl.store(dh0k_ptr + sk_offs, dK, mask=smask_k)
    tl.store(dh0v_ptr + sv_offs, dV, mask=smask_v)


@triton.jit
def _bla_bwd_state_kernel(
    dk_ptr, dv_ptr, dks_ptr, dvs_ptr,
    seq_start_ptr, seq_len_ptr, offset_ptr, window_ptr, chunk_seq_ptr, chunk_idx_ptr,
    HKV: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
    DK: tl.constexpr, BDK: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    C: tl.constexpr, EVEN_M: tl.constexpr, GATES: tl.constexpr, DT: tl.constexpr,
):  # fmt: skip
    """Step C: dk, dv += B_end dS_end (the tokens' share of the chunk's end state)."""
    i = tl.program_id(0)
    g = tl.program_id(1)
    n = tl.load(chunk_seq_ptr + i)
    c = tl.load(chunk_idx_ptr + i)
    bos = tl.load(seq_start_ptr + n)
    seq_len = tl.load(seq_len_ptr + n)
    offset = tl.load(offset_ptr + n)
    W = tl.load(window_ptr + g)
    r = W // M
    t_C, j_M, mask_M, dk_D, dv_D, mask_DK, mask_DV = _tile_indices(C, M, BM, DK, BDK, DV, BDV)
    t0 = c * C
    valid_C = (t0 + t_C) < seq_len
    tok_C = bos + t0 + t_C
    sk_offs, sv_offs, smask_k, smask_v = _state_tile((i * HKV + g) * M, j_M, dk_D, dv_D, mask_M, mask_DK, mask_DV, DK, DV)
    dK = tl.load(dks_ptr + sk_offs, mask=smask_k, other=0.0)
    dV = tl.load(dvs_ptr + sv_offs, mask=smask_v, other=0.0)
    _, _, _, _, B_end, _ = _chunk_decays(offset + t0, t_C, seq_len - t0, W, r, j_M, mask_M, M, EVEN_M, C, GATES)
    b_dk = _load_tokens(dk_ptr, tok_C, valid_C, g, dk_D, mask_DK, HKV, DK) + _mm(B_end, dK, DT)
    b_dv = _load_tokens(dv_ptr, tok_C, valid_C, g, dv_D, mask_DV, HKV, DV) + _mm(B_end, dV, DT)
    _store_tokens(dk_ptr, b_dk, tok_C, valid_C, g, dk_D, mask_DK, HKV, DK)
    _store_tokens(dv_ptr, b_dv, tok_C, valid_C, g, dv_D, mask_DV, HKV, DV)


# ----------------------------------------------------------------------------- decode


@triton.jit
def _bla_step_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, sk_ptr, sv_ptr, pos_ptr, window_ptr, scale,
    H: tl.constexpr, HKV: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
    DK: tl.constexpr, BDK: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, EVEN_M: tl.constexpr,
    GATES: tl.constexpr,
):  # fmt: skip
    """One token per sequence; updates the state in place."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    HPG: tl.constexpr = H // HKV
    W = tl.load(window_ptr + g)
    r = W // M
    pos = tl.load(pos_ptr + b)
    _, j_M, mask_M, dk_D, dv_D, mask_DK, mask_DV = _tile_indices(16, M, BM, DK, BDK, DV, BDV)
    one = tl.arange(0, 1)
    w, L, _ = _chunk_gates(pos, one, 1, W, r, j_M, mask_M, M, EVEN_M, GATES)  # [1, BM]
    alpha = tl.where(w == 1.0, 0.0, tl.exp(L))  # one token: L = log(alpha), skipped (0) at a reset
    alpha = tl.reshape(alpha, (BM,))
    w = tl.reshape(w, (BM,))

    sk_offs, sv_offs, smask_k, smask_v = _state_tile((b * HKV + g) * M, j_M, dk_D, dv_D, mask_M, mask_DK, mask_DV, DK, DV)
    b_K = tl.load(sk_ptr + sk_offs, mask=smask_k, other=0.0)
    b_V = tl.load(sv_ptr + sv_offs, mask=smask_v, other=0.0)
    b_k = tl.load(k_ptr + (b * HKV + g) * DK + dk_D, mask=mask_DK, other=0.0).to(tl.float32)
    b_v = tl.load(v_ptr + (b * HKV + g) * DV + dv_D, mask=mask_DV, other=0.0).to(tl.float32)
    b_K = alpha[:, None] * b_K + w[:, None] * b_k[None, :]
    b_V = alpha[:, None] * b_V + w[:, None] * b_v[None, :]
    tl.store(sk_ptr + sk_offs, b_K, mask=smask_k)
    tl.store(sv_ptr + sv_offs, b_V, mask=smask_v)
    for hh in tl.static_range(HPG):
        h = g * HPG + hh
        b_q = tl.load(q_ptr + (b * H + h) * DK + dk_D, mask=mask_DK, other=0.0).to(tl.float32)
        z = tl.where(mask_M, scale * tl.sum(b_K * b_q[None, :], axis=1), float("-inf"))
        p = tl.exp(z - tl.max(z, axis=0))
        p = p / tl.sum(p, axis=0)
        b_o = tl.sum(p[:, None] * b_V, axis=0)
        tl.store(o_ptr + (b * H + h) * DV + dv_D, b_o.to(o_ptr.dtype.element_ty), mask=mask_DV)


# ----------------------------------------------------------------------------- Python side

# Matmul operands for half inputs: bf16 for fp16 too, since the factorised decays exp(-L) reach
# values far beyond fp16's 65504 while bf16 has fp32's exponent range.
_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.bfloat16}


class _Layout:
    """Sequences, chunks and forward work items (segments) of one call, as int32 device tensors."""

    def __init__(self, problem: Problem, device, chunk: int, seg_chunks: int):
        p = problem
        if p.cu_seqlens is None:
            starts = torch.arange(p.batch, dtype=torch.int64) * p.seq_len
            lengths = torch.full((p.batch,), p.seq_len, dtype=torch.int64)
        else:
            cu = p.cu_seqlens.cpu()
            starts, lengths = cu[:-1], cu[1:] - cu[:-1]
        n_chunks = (lengths + chunk - 1) // chunk
        self.total_chunks = int(n_chunks.sum())
        chunk_base = torch.cumsum(n_chunks, 0) - n_chunks
        seq_ids = torch.arange(len(lengths))
        self.chunk_seq = torch.repeat_interleave(seq_ids, n_chunks)
        self.chunk_idx = torch.arange(self.total_chunks) - chunk_base[self.chunk_seq]
        n_items = torch.clamp((n_chunks + seg_chunks - 1) // seg_chunks, min=1)  # an empty sequence still has one
        self.item_seq = torch.repeat_interleave(seq_ids, n_items)
        item_base = torch.cumsum(n_items, 0) - n_items
        self.item_chunk = (torch.arange(int(n_items.sum())) - item_base[self.item_seq]) * seg_chunks
        as32 = lambda x: x.to(device=device, dtype=torch.int32).contiguous()  # noqa: E731
        self.starts, self.lengths, self.chunk_base = as32(starts), as32(lengths), as32(chunk_base)
        self.offsets = as32(p.offset)
        self.chunk_seq, self.chunk_idx = as32(self.chunk_seq), as32(self.chunk_idx)
        self.item_seq, self.item_chunk = as32(self.item_seq), as32(self.item_chunk)
        self.windows = as32(p.window_tensor(device))


def _constants(problem: Problem, chunk: int, dtype: torch.dtype) -> dict:
    p = problem
    return dict(
        H=p.num_heads, HKV=p.num_kv_heads, M=p.slots, BM=_pow2(p.slots),
        DK=p.head_dim_k, BDK=_pow2(p.head_dim_k), DV=p.head_dim_v, BDV=_pow2(p.head_dim_v),
        C=chunk, E=(chunk - 1) // min(p.windows) + 2, EVEN_M=p.slots % 2 == 0, GATES=GATE_CODES[p.gates],
        DT=tl.float32 if _INTERPRETING else _DOT_DTYPES.get(dtype, tl.float32),
    )  # fmt: skip


def _launch_opts(problem: Problem) -> dict:
    """8 warps, 2 stages: the fastest of the settings measured on H100 (docs/benchmarks.md);
    BLA_TRITON_WARPS / BLA_TRITON_STAGES override them for tuning experiments."""
    warps = int(os.environ.get("BLA_TRITON_WARPS", 8))
    return dict(num_warps=warps, num_stages=int(os.environ.get("BLA_TRITON_STAGES", 2)))


def _segment_chunks(problem: Problem, chunk: int) -> int:
    """Chunks per forward work item: at least 512 tokens, and at least W (bounds the warm-up)."""
    tokens = max(512, max(problem.windows))
    return -(-tokens // chunk)


def _pick(consts: dict, *names: str) -> dict:
    return {k: consts[k] for k in names}


class _BLATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, h0k, h0v, problem: Problem, chunk: int):
        p = problem
        dev = q.device
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        seg_chunks = _segment_chunks(p, chunk)
        lay = _Layout(p, dev, chunk, seg_chunks)
        consts = _constants(p, chunk, q.dtype)
        needs_grad = any(ctx.needs_input_grad[:5])
        o = torch.empty(q.shape[:-1] + (p.head_dim_v,), device=dev, dtype=q.dtype)
        hk = torch.empty(p.num_seqs, p.num_kv_heads, p.slots, p.head_dim_k, device=dev, dtype=torch.float32)
        hv = torch.empty(p.num_seqs, p.num_kv_heads, p.slots, p.head_dim_v, device=dev, dtype=torch.float32)
        n_st = lay.total_chunks if needs_grad else 0
        kst = torch.empty(n_st, p.num_kv_heads, p.slots, p.head_dim_k, device=dev, dtype=torch.float32)
        vst = torch.empty(n_st, p.num_kv_heads, p.slots, p.head_dim_v, device=dev, dtype=torch.float32)
        use_h0 = h0k is not None
        h0k_c = h0k.contiguous().float() if use_h0 else hk
        h0v_c = h0v.contiguous().float() if use_h0 else hv
        _bla_fwd_kernel[(lay.item_seq.numel(), p.num_kv_heads)](
            q, k, v, o, h0k_c, h0v_c, hk, hv, kst, vst,
            lay.starts, lay.lengths, lay.offsets, lay.chunk_base, lay.windows, lay.item_seq, lay.item_chunk, p.scale,
            SEG_CHUNKS=seg_chunks, USE_H0=use_h0, STORE_CHUNKS=needs_grad, **consts, **_launch_opts(p),
        )  # fmt: skip
        if needs_grad:
            ctx.save_for_backward(q, k, v, kst, vst)
        ctx.problem, ctx.chunk, ctx.use_h0, ctx.layout = p, chunk, use_h0, lay
        return o, hk, hv

    @staticmethod
    def backward(ctx, do, dhk, dhv):
        q, k, v, kst, vst = ctx.saved_tensors
        p, chunk, lay = ctx.problem, ctx.chunk, ctx.layout
        consts = _constants(p, chunk, q.dtype)
        opts = _launch_opts(p)
        dq = torch.empty_like(q)
        dk = torch.empty(k.shape, device=k.device, dtype=torch.float32)
        dv = torch.empty(v.shape, device=v.device, dtype=torch.float32)
        dks, dvs = torch.empty_like(kst), torch.empty_like(vst)  # each chunk's own share, then dS_end
        grid_chunks = (lay.total_chunks, p.num_kv_heads)
        if lay.total_chunks:
            _bla_bwd_chunk_kernel[grid_chunks](
                q, k, v, do.contiguous(), dq, dk, dv, kst, vst, dks, dvs,
                lay.starts, lay.lengths, lay.offsets, lay.windows, lay.chunk_seq, lay.chunk_idx, p.scale,
                **consts, **opts,
            )  # fmt: skip
        # autograd materialises the gradients of unused outputs as zeros
        dh0k = torch.empty(p.num_seqs, *kst.shape[1:], device=q.device, dtype=torch.float32)
        dh0v = torch.empty(p.num_seqs, *vst.shape[1:], device=q.device, dtype=torch.float32)
        _bla_bwd_scan_kernel[(p.num_seqs, p.num_kv_heads)](
            dks, dvs, dhk.contiguous().float(), dhv.contiguous().float(), dh0k, dh0v,
            lay.lengths, lay.offsets, lay.chunk_base, lay.windows,
            **_pick(consts, "HKV", "M", "BM", "DK", "BDK", "DV", "BDV", "C", "EVEN_M", "GATES"), **opts,
        )  # fmt: skip
        if lay.total_chunks:
            _bla_bwd_state_kernel[grid_chunks](
                dk, dv, dks, dvs, lay.starts, lay.lengths, lay.offsets, lay.windows, lay.chunk_seq, lay.chunk_idx,
                **_pick(consts, "HKV", "M", "BM", "DK", "BDK", "DV", "BDV", "C", "EVEN_M", "GATES", "DT"), **opts,
            )  # fmt: skip
        if not ctx.use_h0:
            dh0k = dh0v = None
        return dq, dk.to(k.dtype), dv.to(v.dtype), dh0k, dh0v, None, None


def bla_triton(q, k, v, problem: Problem, initial_state: State | None) -> tuple[torch.Tensor, State]:
    ok, why = supports(problem)
    if not ok:
        raise ValueError(f"backend='triton' cannot run this configuration: {why}")
    chunk = int(os.environ.get("BLA_TRITON_CHUNK", 0)) or plan_chunk(problem.windows, problem.slots, problem.gates)[0]
    h0k, h0v = initial_state if initial_state is not None else (None, None)
    dtype = q.dtype
    if _INTERPRETING and dtype == torch.bfloat16:
        # Triton's CPU interpreter multiplies bf16 matrices wrongly; there, run the fp32 kernel
        # on upcast inputs (autograd casts the gradients back). GPUs run bf16 natively.
        q, k, v = q.float(), k.float(), v.float()
    o, hk, hv = _BLATriton.apply(q, k, v, h0k, h0v, problem, chunk)
    return o.to(dtype), (hk, hv)


def bla_step_triton(q, k, v, state: State, problem: Problem) -> tuple[torch.Tensor, State]:
    p = problem
    sk, sv = (s.float().contiguous().clone() for s in state)
    o = torch.empty(p.batch, p.num_heads, p.head_dim_v, device=q.device, dtype=q.dtype)
    consts = _pick(_constants(p, 16, q.dtype), "H", "HKV", "M", "BM", "DK", "BDK", "DV", "BDV", "EVEN_M", "GATES")
    _bla_step_kernel[(p.batch, p.num_kv_heads)](
        q.contiguous(), k.contiguous(), v.contiguous(), o, sk, sv, p.offset.to(torch.int32).contiguous(),
        p.window_tensor(q.device).to(torch.int32), p.scale, **consts,
    )  # fmt: skip
    return o, (sk, sv)
