"""The forward's chunk kernels: (1) ``_fwd_local_kernel``, each segment's own end state from a zero
start (and on the way every chunk's start state from the segment's start), and (3)
``_fwd_out_kernel``, every chunk's outputs in parallel from its start state. The scan between them,
(2), is ``triton_scan``; ``triton_bla.forward`` runs the three.

Inside a sub-chunk of S tokens, with l the cumulative log-decay from its start and T its total:

    z[t, j] = scale (e^{l_t,j} q_t . K[j] + sum_{u<=t} (q_t . k_u) s_u,j e^{l_t,j - l_u,j})
    o_t     = sum_j p[t, j] e^{l_t,j} V[j] + sum_{u<=t} (sum_j p[t, j] s_u,j e^{l_t,j - l_u,j}) v_u,  p = softmax_j z
    K'      = e^{T} K + (s e^{T - l})^T k
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import Problem
from .reference import run_sequences
from .triton_tiles import (
    _chunk_parts,
    _chunk_program,
    _end_weights,
    _item,
    _load_tokens,
    _mm,
    _pairs,
    _ranges,
    _scores,
    _softmax,
    _softmax_lse,
    _state_offsets,
    _store_tokens,
    _sub_chunk,
    _times_a,
    _times_el,
    _to_state,
    _write_state,
    _write_weighted,
)


@triton.jit
def _fwd_local_kernel(
    k_ptr, v_ptr, lk_ptr, lv_ptr, dec_ptr, ck_ptr, cv_ptr, before_ptr, cdec_ptr, cum_ptr, end_ptr, gs_ptr, gl_ptr,
    seq_start_ptr, seq_len_ptr, offset_ptr, chunk_base_ptr, window_ptr, toff_ptr, item_seq_ptr, item_chunk_ptr,
    HKV: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    C: tl.constexpr, S: tl.constexpr, NS: tl.constexpr, SEG_CHUNKS: tl.constexpr, DT: tl.constexpr, CUM: tl.constexpr,
):  # fmt: skip
    """(1) A segment's end state from a zero start, and its decay (per slot); on the way, every
    chunk's start state from the segment's zero start (in the operands' dtype), the decay of the
    segment's chunks before it (``before``), and its own decay. (Keys and values in one program:
    in two launches, one state each, it took 0.29 ms against 0.17 on an H100.)"""
    i = tl.program_id(0)
    g = tl.program_id(1)
    n, c_first, bos, seq_len, offset, W, toff = _item(item_seq_ptr, item_chunk_ptr, seq_start_ptr, seq_len_ptr,
                                                      offset_ptr, window_ptr, toff_ptr, i, g)  # fmt: skip
    chunk_base = tl.load(chunk_base_ptr + n)
    t_S, j_M, dk_D, dv_D = _ranges(S, BM, BDK, BDV)
    K = tl.zeros([BM, BDK], dtype=tl.float32)
    V = tl.zeros([BM, BDV], dtype=tl.float32)
    log_dec = tl.zeros([BM], dtype=tl.float32)
    c_stop = tl.minimum(c_first + SEG_CHUNKS, tl.cdiv(seq_len, C))
    for c in range(c_first, c_stop):
        crow = ((chunk_base + c) * HKV + g) * BM
        tl.store(ck_ptr + _state_offsets(crow, j_M, dk_D, BDK), K.to(ck_ptr.dtype.element_ty))
        tl.store(cv_ptr + _state_offsets(crow, j_M, dv_D, BDV), V.to(cv_ptr.dtype.element_ty))
        tl.store(before_ptr + crow + j_M, tl.exp(log_dec))
        chunk_log_dec = tl.zeros([BM], dtype=tl.float32)
        for a in tl.static_range(NS):
            t0 = c * C + a * S
            valid = (t0 + t_S) < seq_len
            w_end, T = _end_weights(gs_ptr, gl_ptr, cum_ptr, end_ptr, toff, offset + t0, t_S, seq_len - t0, W, j_M, S, BM,
                                    CUM, DT)  # fmt: skip
            k = _load_tokens(k_ptr, bos + t0 + t_S, valid, g, dk_D, dk_D < DK, HKV, DK)
            v = _load_tokens(v_ptr, bos + t0 + t_S, valid, g, dv_D, dv_D < DV, HKV, DV)
            K = _write_weighted(K, w_end, T, k, DT)
            V = _write_weighted(V, w_end, T, v, DT)
            chunk_log_dec += T
        tl.store(cdec_ptr + crow + j_M, tl.exp(chunk_log_dec))
        log_dec += chunk_log_dec
    row = (i * HKV + g) * BM
    tl.store(lk_ptr + _state_offsets(row, j_M, dk_D, BDK), K)
    tl.store(lv_ptr + _state_offsets(row, j_M, dv_D, BDV), V)
    tl.store(dec_ptr + row + j_M, tl.exp(log_dec))



@triton.jit
def _fwd_out_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, ck_ptr, cv_ptr, before_ptr, sk_ptr, sv_ptr, cum_ptr, cen_ptr, gs_ptr, gl_ptr,
    seq_start_ptr, seq_len_ptr, offset_ptr, window_ptr, toff_ptr, chunk_seq_ptr, chunk_idx_ptr, chunk_item_ptr,
    scale,
    H: tl.constexpr, HKV: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
    DK: tl.constexpr, BDK: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    C: tl.constexpr, S: tl.constexpr, NS: tl.constexpr, DT: tl.constexpr, PAIRS: tl.constexpr, CUM: tl.constexpr,
    SPLIT: tl.constexpr, NT: tl.constexpr, FACTOR_EL: tl.constexpr,
):  # fmt: skip
    """(3) Outputs of a chunk, from its start state: its own from the segment's zero start (Kl)
    plus the segment's start state (Ks) times the decay before the chunk. The two are used apart,
    in two products each, never summed into one fp32 [m, d] tile (that sum cost 0.24 of 0.65 ms
    at 32-token chunks on an H100). No state is carried from chunk to chunk, so every chunk runs
    in parallel. With NT > 1 slot tiles in the backward, each query's log-sum-exp over slots is
    stored for it (lse, fp32 [tokens, H])."""
    HPG: tl.constexpr = H // HKV
    i, g, n, c, bos, seq_len, offset, W, toff, t_S, j_M, dk_D, dv_D, causal, second, mask_M = _chunk_program(
        chunk_seq_ptr, chunk_idx_ptr, seq_start_ptr, seq_len_ptr, offset_ptr, window_ptr, toff_ptr, S, BM, BDK, BDV, M,
        PAIRS)
    Kl, Vl, Ks, Vs, before = _chunk_parts(ck_ptr, cv_ptr, sk_ptr, sv_ptr, before_ptr, chunk_item_ptr, i, g,
                                          j_M, dk_D, dv_D, HKV, BM, BDK, BDV, SPLIT)  # fmt: skip
    for a in tl.static_range(NS):
        t0 = c * C + a * S
        valid, tok, s, l, T, em, el, A, B, r1, r2, E, k, v = _sub_chunk(
            k_ptr, v_ptr, gs_ptr, gl_ptr, cum_ptr, cen_ptr, toff, offset, bos, t0, seq_len, W, g, t_S, second, j_M, dk_D, dv_D,
            HKV, BM, DK, DV, S, CUM, PAIRS,
        )  # fmt: skip
        for hh in tl.static_range(HPG):
            h = g * HPG + hh
            q = _load_tokens(q_ptr, tok, valid, h, dk_D, dk_D < DK, H, DK)
            z = _scores(q, k, Kl, Ks, before, em, el, A, B, r1, r2, E, causal, second, scale, mask_M, PAIRS, DT, SPLIT,
                        FACTOR_EL)  # fmt: skip
            if NT > 1:
                p, lse = _softmax_lse(z)
                tl.store(lse_ptr + tok * H + h, lse, mask=valid)
            else:
                p = _softmax(z)
            pA = _times_a(p, A, PAIRS)
            o = _to_state(_times_el(p, pA, em, el, PAIRS, FACTOR_EL), Vl, Vs, before, DT, SPLIT)
            o += _mm(_pairs(pA, B, r1, r2, E, causal, second, PAIRS, DT), v, DT)
            _store_tokens(o_ptr, o, tok, valid, h, dv_D, dv_D < DV, H, DV)
        if a < NS - 1:
            Kl = _write_state(Kl, s, l, T, k, DT)
            Vl = _write_state(Vl, s, l, T, v, DT)
            before = before * tl.exp(T)


def chunks_ref(q, k, v, states, problem: Problem, chunk: int, seg_chunks: int):
    """Dense rows, float64: each chunk's (row, tokens t0:t1, start state K0, V0) with K0 = ck +
    before * start_k, V0 alike (the decay per slot), and a function giving its outputs from
    (q, k, v, K0, V0) through the recurrence (``bla.kernels.reference``) at its offset."""
    p = problem
    ck, cv, before, start_k, start_v = (x.double().cpu() for x in states)
    m, dk, dv = p.slots, p.head_dim_k, p.head_dim_v
    B, T = q.shape[:2]
    chunks, items = -(-T // chunk), -(-T // (chunk * seg_chunks))
    offsets = p.offset.reshape(-1).cpu()
    for b in range(B):
        for c in range(chunks):
            row, item = b * chunks + c, b * items + c // seg_chunks
            dec = before[row, :, :m, None]
            K0 = ck[row, :, :m, :dk] + dec * start_k[item, :, :m, :dk]
            V0 = cv[row, :, :m, :dv] + dec * start_v[item, :, :m, :dv]
            t0, t1 = c * chunk, min(c * chunk + chunk, T)
            offset = (offsets[b if len(offsets) > 1 else 0] + t0).reshape(1)

            def outputs(qc, kc, vc, K0, V0, offset=offset):
                return run_sequences(qc, kc, vc, (K0[None], V0[None]), offset, p.window_tensor("cpu"), m, p.scale, p.gates,
                                     p.shift_tensor("cpu"), None, None)[0][0]  # fmt: skip

            yield row, b, t0, t1, K0, V0, outputs


def chunk_outputs_ref(q, k, v, states, problem: Problem, chunk: int, seg_chunks: int) -> torch.Tensor:
    """Stage (3)'s reference, dense rows only, in float64: chunk c of row b (``chunk`` tokens, in
    forward segment c // ``seg_chunks``) starts from K0 = ck + before * start_k (and V0 alike,
    the decay per slot), and its outputs are the recurrence's (``bla.kernels.reference``) from
    that state at its offset."""
    o = torch.zeros(q.shape[:-1] + (problem.head_dim_v,), dtype=torch.float64)
    for _, b, t0, t1, K0, V0, outputs in chunks_ref(q, k, v, states, problem, chunk, seg_chunks):
        o[b, t0:t1] = outputs(*(x[b : b + 1, t0:t1].double().cpu() for x in (q, k, v)), K0, V0)
    return o
