"""The device code the chunked kernels share: gates of a sub-chunk, the factorised pair decays
(centred, halves, elementwise), the masked matrix products, token and state loads and stores, the
softmax, a program's place in the layout, and a chunk's start state and sub-chunk.

With l the cumulative log-decay from a sub-chunk's start, the pairs u <= t are factorised,
e^{l_t - l_u} = e^{l_t - c} e^{c - l_u}, so they are tensor-core products; CENTRED: c is each
slot's mid log-decay over the sub-chunk; HALVES: each half on its own mid, the pairs across on the
boundary's; ELEMENTWISE: an [S, S, m] tile of decays (``triton_tables.sub_chunking`` picks).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _sub_gates(gs_ptr, gl_ptr, toff, pos0, t_S, n_valid, W, j_M, BM: tl.constexpr):
    """Writes s [SUB, BM], cumulative log-decay l [SUB, BM] and total T [BM] of the sub-chunk whose
    first token sits at position pos0 and has n_valid tokens (the rest: s = 0, log alpha = 0)."""
    valid = t_S < n_valid
    offs = (toff + (pos0 + t_S) % W)[:, None] * BM + j_M[None, :]
    s = tl.load(gs_ptr + offs, mask=valid[:, None], other=0.0)
    la = tl.load(gl_ptr + offs, mask=valid[:, None], other=0.0)
    return s, tl.cumsum(la, axis=0), tl.sum(la, axis=0)


@triton.jit
def _all_gates(gs_ptr, gl_ptr, cum_ptr, toff, pos0, t_S, n_valid, W, j_M, S: tl.constexpr, BM: tl.constexpr,
               CUM: tl.constexpr):  # fmt: skip
    """s, l, T of a sub-chunk as _sub_gates, for callers whose inputs past the sequence's end are
    zero (so those tokens' gates do not matter): read from the per-phase table of cumulative
    log-decays when CUM (no cumulative sum, no masks), else summed here."""
    if CUM:
        row = (toff + pos0 % W) * S
        s = tl.load(gs_ptr + (toff + (pos0 + t_S) % W)[:, None] * BM + j_M[None, :])
        l = tl.load(cum_ptr + (row + t_S)[:, None] * BM + j_M[None, :])
        return s, l, tl.load(cum_ptr + (row + S - 1) * BM + j_M)
    return _sub_gates(gs_ptr, gl_ptr, toff, pos0, t_S, n_valid, W, j_M, BM)


@triton.jit
def _end_weights(gs_ptr, gl_ptr, cum_ptr, end_ptr, toff, pos0, t_S, n_valid, W, j_M, S: tl.constexpr, BM: tl.constexpr,
                 CUM: tl.constexpr, DT: tl.constexpr):  # fmt: skip
    """Each token's weight s e^{T - l} in the state after a sub-chunk ([S, BM], in DT) and the
    sub-chunk's total log-decay T, exact for its valid tokens whatever lies past the sequence's
    end (for the kernels that carry the state after it: (1) and (C)): a whole sub-chunk's from the
    per-phase tables when CUM (no cumulative sum, no exponentials), the sequence's last, partial
    one from its gates."""
    if CUM:
        if n_valid >= S:
            row = (toff + pos0 % W) * S
            w = tl.load(end_ptr + (row + t_S)[:, None] * BM + j_M[None, :])
            T = tl.load(cum_ptr + (row + S - 1) * BM + j_M)
        else:
            w, T = _end_weights_summed(gs_ptr, gl_ptr, toff, pos0, t_S, n_valid, W, j_M, BM, DT)
    else:
        w, T = _end_weights_summed(gs_ptr, gl_ptr, toff, pos0, t_S, n_valid, W, j_M, BM, DT)
    return w, T


@triton.jit
def _end_weights_summed(gs_ptr, gl_ptr, toff, pos0, t_S, n_valid, W, j_M, BM: tl.constexpr, DT: tl.constexpr):
    """_end_weights from the sub-chunk's gates, summed here (its valid tokens only)."""
    s, l, T = _sub_gates(gs_ptr, gl_ptr, toff, pos0, t_S, n_valid, W, j_M, BM)
    return (s * tl.exp(T[None, :] - l)).to(DT), T


@triton.jit
def _pair_decays(s, l, t_S):
    """E[t, u, j] = s_u,j e^{l_t,j - l_u,j} for u <= t, else 0: [SUB, SUB, BM] (the elementwise form)."""
    causal = (t_S[:, None] >= t_S[None, :])[:, :, None]
    diff = tl.where(causal, l[:, None, :] - l[None, :, :], 0.0)
    return tl.where(causal, tl.exp(diff), 0.0) * s[None, :, :]


@triton.jit
def _centred(s, l, mid):
    """A [SUB, BM], B [SUB, BM] with A_t B_u = s_u e^{l_t - l_u}, centred on ``mid`` (per slot, or per
    row and slot): both stay within e^(range / 2) of the rows they pair (the host checks the range)."""
    return tl.exp(l - mid), s * tl.exp(mid - l)


@triton.jit
def _split_factors(s, l, second, cen_ptr, crow, j_M, BM: tl.constexpr, CUM: tl.constexpr):
    """The halves form (PAIRS = 2), for sub-chunks whose decays' range is too wide for one centre.
    Pairs inside a half: A, B centred on that half's mid log-decay (their products are valid inside
    a half only). Pairs across the halves (t in the second, u in the first) are centred on the
    log-decay c at the boundary, where e^{l_t - c} <= 1 and e^{c - l_u} <= 1, so nothing can
    overflow at any stride: A2_t = A_t r2 (t in the second half) and B2_u = B_u r1 (u in the
    first), with r2 = e^{mid2 - c} <= 1 and r1 = e^{c - mid1} <= 1 (per slot). Only r1, r2 are
    kept: A2 and B2 are formed where they are used (fewer live tiles). mid1, mid2 and c come from
    the per-phase table of centres when CUM (row ``crow``), else are reduced here."""
    if CUM:
        mid1 = tl.load(cen_ptr + (crow * 4 + 1) * BM + j_M)
        mid2 = tl.load(cen_ptr + (crow * 4 + 2) * BM + j_M)
        c = tl.load(cen_ptr + (crow * 4 + 3) * BM + j_M)
    else:
        lo = tl.where(second, float("inf"), l)
        mid1 = (tl.max(tl.where(second, float("-inf"), l), axis=0) + tl.min(lo, axis=0)) * 0.5
        mid2 = (tl.max(tl.where(second, l, float("-inf")), axis=0) + tl.min(tl.where(second, l, float("inf")), axis=0)) * 0.5
        c = tl.min(lo, axis=0)  # l is non-increasing: its last value in the first half
    A, B = _centred(s, l, tl.where(second, mid2[None, :], mid1[None, :]))
    em = tl.where(second, tl.exp(mid2)[None, :], tl.exp(mid1)[None, :])
    return A, B, tl.exp(tl.minimum(c - mid1, 0.0)), tl.exp(tl.minimum(mid2 - c, 0.0)), em


@triton.jit
def _mix(F, X, A, em, el, B, r1, r2, E, causal, second, PAIRS: tl.constexpr, DT: tl.constexpr, FACTOR_EL: tl.constexpr):
    """e^{l_t,j} F[t, j] + sum_{u<=t} X[t, u] s_u,j e^{l_t,j - l_u,j}: [SUB, BM] and [SUB, SUB] -> [SUB, BM].
    In the factorised forms e^l = A em, so with FACTOR_EL A multiplies once, outside: A (em F + X B),
    and the [SUB, BM] tile el = e^l need not exist. (With PAIRS = 2, ``causal`` keeps only pairs
    inside a half; r1, r2 carry the pairs across the halves.)"""
    if PAIRS == 0:
        return el * F + tl.sum(X[:, :, None] * E, axis=1)
    out = _mm(tl.where(causal, X, 0.0), B, DT)
    if PAIRS == 2:
        out += tl.where(second, r2[None, :], 0.0) * _mm(X, tl.where(second, 0.0, B * r1[None, :]), DT)
    if FACTOR_EL:
        return A * (em * F + out)
    return el * F + A * out


@triton.jit
def _times_el(Y, YA, em, el, PAIRS: tl.constexpr, FACTOR_EL: tl.constexpr):
    """Y e^l, from YA = _times_a(Y) when FACTOR_EL (e^l = A em)."""
    if FACTOR_EL and PAIRS != 0:
        return YA * em
    return Y * el


@triton.jit
def _times_a(Y, A, PAIRS: tl.constexpr):
    """Y A, what _pairs and the state products take (Y itself in the elementwise form)."""
    if PAIRS == 0:
        return Y
    return Y * A


@triton.jit
def _pairs(YA, B, r1, r2, E, causal, second, PAIRS: tl.constexpr, DT: tl.constexpr):
    """sum_j Y[t, j] s_u,j e^{l_t,j - l_u,j} for u <= t, from YA = _times_a(Y): [SUB, BM] -> [SUB, SUB]."""
    if PAIRS == 0:
        return tl.sum(YA[:, None, :] * E, axis=2)
    out = tl.where(causal, _mm(YA, tl.trans(B), DT), 0.0)
    if PAIRS == 2:
        cross = _mm(tl.where(second, YA * r2[None, :], 0.0), tl.trans(tl.where(second, 0.0, B * r1[None, :])), DT)
        out += cross
    return out


@triton.jit
def _sub_tiles(s, l, t_S, second, cen_ptr, crow, j_M, BM: tl.constexpr, PAIRS: tl.constexpr, CUM: tl.constexpr):
    """What the in-sub-chunk pairs need: the elementwise decay tile E (PAIRS = 0), one centre's
    factors A, B (1), or the halves' A, B, r1, r2 (2). Unused names repeat a used value. The
    centres are the table's (row ``crow``: the sub-chunk's phase) when CUM: no reductions over
    the sub-chunk's tokens."""
    if PAIRS == 0:
        E = _pair_decays(s, l, t_S)
        A = E
        B = E
        r1 = E
        r2 = E
        em = E
    elif PAIRS == 1:
        if CUM:
            mid = tl.load(cen_ptr + crow * 4 * BM + j_M)
        else:
            mid = (tl.max(l, axis=0) + tl.min(l, axis=0)) * 0.5
        A, B = _centred(s, l, mid[None, :])
        em = tl.exp(mid)[None, :]
        r1 = A
        r2 = A
        E = A
    else:
        A, B, r1, r2, em = _split_factors(s, l, second, cen_ptr, crow, j_M, BM, CUM)
        E = A
    return A, B, r1, r2, E, em


@triton.jit
def _mm(a, b, DT: tl.constexpr):
    """a @ b with fp32 accumulation: operands in DT (bf16 for half inputs), or exact fp32."""
    if DT == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(DT), b.to(DT))


@triton.jit
def _load_tokens(ptr, tok, valid, head, d_D, mask_D, N_HEADS: tl.constexpr, D: tl.constexpr):
    offs = tok[:, None] * (N_HEADS * D) + head * D + d_D[None, :]
    return tl.load(ptr + offs, mask=valid[:, None] & mask_D[None, :], other=0.0)


@triton.jit
def _store_tokens(ptr, val, tok, valid, head, d_D, mask_D, N_HEADS: tl.constexpr, D: tl.constexpr):
    offs = tok[:, None] * (N_HEADS * D) + head * D + d_D[None, :]
    tl.store(ptr + offs, val.to(ptr.dtype.element_ty), mask=valid[:, None] & mask_D[None, :])


@triton.jit
def _state_offsets(row, j_M, d_D, D: tl.constexpr):
    """Offsets of one [m, d] state whose first slot row is ``row`` (buffers are padded to BM, BD)."""
    return (row + j_M[:, None]) * D + d_D[None, :]


@triton.jit
def _write_state(X, s, l, T, x, DT: tl.constexpr):
    """The state after a sub-chunk: e^T X + (s e^{T - l})^T x."""
    return tl.exp(T)[:, None] * X + _mm(tl.trans(s * tl.exp(T[None, :] - l)), x, DT)


@triton.jit
def _write_weighted(X, w_end, T, x, DT: tl.constexpr):
    """The state after a sub-chunk from its tokens' end weights (``_end_weights``): e^T X + w_end^T x."""
    return tl.exp(T)[:, None] * X + _mm(tl.trans(w_end), x, DT)


@triton.jit
def _from_state(x, Xl, Xs, before, DT: tl.constexpr, SPLIT: tl.constexpr):
    """x against each slot of the state Xl + before * Xs (kept apart when SPLIT: no [m, d] sum is
    formed; else Xl is the whole state): [SUB, D] -> [SUB, BM]."""
    if SPLIT:
        return _mm(x, tl.trans(Xl), DT) + before[None, :] * _mm(x, tl.trans(Xs), DT)
    return _mm(x, tl.trans(Xl), DT)


@triton.jit
def _to_state(w, Xl, Xs, before, DT: tl.constexpr, SPLIT: tl.constexpr):
    """Slot weights times the state Xl + before * Xs (or Xl alone, unless SPLIT): [SUB, BM] -> [SUB, D]."""
    if SPLIT:
        return _mm(w, Xl, DT) + _mm(w * before[None, :], Xs, DT)
    return _mm(w, Xl, DT)


@triton.jit
def _scores(q, k, Kl, Ks, before, em, el, A, B, r1, r2, E, causal, second, scale, mask_M, PAIRS: tl.constexpr,
            DT: tl.constexpr, SPLIT: tl.constexpr, FACTOR_EL: tl.constexpr):
    """scale * z of a sub-chunk's queries against the state Kl + before * Ks and the sub-chunk's
    keys, -inf at padded slots: [SUB, BM]."""
    z = _mix(_from_state(q, Kl, Ks, before, DT, SPLIT), _mm(q, tl.trans(k), DT), A, em, el, B, r1, r2, E, causal, second,
             PAIRS, DT, FACTOR_EL)  # fmt: skip
    return tl.where(mask_M[None, :], scale * z, float("-inf"))


@triton.jit
def _softmax(z):
    p = tl.exp(z - tl.max(z, axis=1)[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _softmax_lse(z):
    """softmax over slots and its log-sum-exp per row (what a slot-tiled backward needs)."""
    mx = tl.max(z, axis=1)
    e = tl.exp(z - mx[:, None])
    total = tl.sum(e, axis=1)
    return e / total[:, None], mx + tl.log(total)


@triton.jit
def _ranges(S: tl.constexpr, BM: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr):
    """Index vectors of every kernel: tokens of a sub-chunk, slots, key and value columns."""
    return tl.arange(0, S), tl.arange(0, BM), tl.arange(0, BDK), tl.arange(0, BDV)


@triton.jit
def _item(seq_ptr, idx_ptr, start_ptr, len_ptr, off_ptr, win_ptr, toff_ptr, i, g):
    """A work item's sequence, index, first token, length, offset and its kv head's window and
    first gate row. (Offsets passed as int64 and reduced modulo W here, saving the host a cast
    per call, made ptxas spill more in (A): 456 -> 528 stack bytes, benchmarks/lab/registers.py;
    not timed, so not taken.)"""
    n = tl.load(seq_ptr + i)
    return (n, tl.load(idx_ptr + i), tl.load(start_ptr + n), tl.load(len_ptr + n), tl.load(off_ptr + n),
            tl.load(win_ptr + g), tl.load(toff_ptr + g))  # fmt: skip


@triton.jit
def _chunk_program(chunk_seq_ptr, chunk_idx_ptr, seq_start_ptr, seq_len_ptr, offset_ptr, window_ptr, toff_ptr,
                   S: tl.constexpr, BM: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, M: tl.constexpr,
                   PAIRS: tl.constexpr):  # fmt: skip
    """What a (chunk, kv head) program of (3) and (A) starts from: its ids, its chunk's item, the
    index vectors, the causal mask of a sub-chunk's factorised pairs (inside each half only in the
    halves form), the rows of the second half ([S, 1]) and the mask of real slots."""
    i = tl.program_id(0)
    g = tl.program_id(1)
    n, c, bos, seq_len, offset, W, toff = _item(chunk_seq_ptr, chunk_idx_ptr, seq_start_ptr, seq_len_ptr,
                                                offset_ptr, window_ptr, toff_ptr, i, g)  # fmt: skip
    t_S, j_M, dk_D, dv_D = _ranges(S, BM, BDK, BDV)
    causal = t_S[:, None] >= t_S[None, :]
    half = t_S >= S // 2
    if PAIRS == 2:
        causal = causal & (half[:, None] == half[None, :])
    return i, g, n, c, bos, seq_len, offset, W, toff, t_S, j_M, dk_D, dv_D, causal, half[:, None], j_M < M



@triton.jit
def _chunk_parts(ck_ptr, cv_ptr, sk_ptr, sv_ptr, before_ptr, chunk_item_ptr, i, g, j_M, dk_D, dv_D,
                 HKV: tl.constexpr, BM: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, SPLIT: tl.constexpr):  # fmt: skip
    """A chunk's start state in parts (operand dtype): its own keys' and values' states from the
    segment's zero start, the segment's start states, and the decay between the two. Unless
    SPLIT, the first two are the whole states (summed here, rounded to the operand dtype) and the
    others unused."""
    row = (i * HKV + g) * BM
    seg_row = (tl.load(chunk_item_ptr + i) * HKV + g) * BM
    Kl = tl.load(ck_ptr + _state_offsets(row, j_M, dk_D, BDK))
    Vl = tl.load(cv_ptr + _state_offsets(row, j_M, dv_D, BDV))
    Ks = tl.load(sk_ptr + _state_offsets(seg_row, j_M, dk_D, BDK))
    Vs = tl.load(sv_ptr + _state_offsets(seg_row, j_M, dv_D, BDV))
    before = tl.load(before_ptr + row + j_M)
    if not SPLIT:
        Kl = (Kl.to(tl.float32) + before[:, None] * Ks.to(tl.float32)).to(Kl.dtype)
        Vl = (Vl.to(tl.float32) + before[:, None] * Vs.to(tl.float32)).to(Vl.dtype)
    return Kl, Vl, Ks, Vs, before



@triton.jit
def _sub_chunk(k_ptr, v_ptr, gs_ptr, gl_ptr, cum_ptr, cen_ptr, toff, offset, bos, t0, seq_len, W, g, t_S, second, j_M, dk_D, dv_D,
               HKV: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, S: tl.constexpr,
               CUM: tl.constexpr, PAIRS: tl.constexpr):  # fmt: skip
    """What (3) and (A) need of the sub-chunk starting at token t0 of a sequence: its valid tokens
    and their rows, gates (s, l, T, e^l and the pair tiles), keys and values."""
    valid = (t0 + t_S) < seq_len
    tok = bos + t0 + t_S
    s, l, T = _all_gates(gs_ptr, gl_ptr, cum_ptr, toff, offset + t0, t_S, seq_len - t0, W, j_M, S, BM, CUM)
    A, B, r1, r2, E, em = _sub_tiles(s, l, t_S, second, cen_ptr, toff + (offset + t0) % W, j_M, BM, PAIRS, CUM)
    k = _load_tokens(k_ptr, tok, valid, g, dk_D, dk_D < DK, HKV, DK)
    v = _load_tokens(v_ptr, tok, valid, g, dv_D, dv_D < DV, HKV, DV)
    return valid, tok, s, l, T, em, tl.exp(l), A, B, r1, r2, E, k, v
