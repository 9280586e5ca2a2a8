"""The backward's chunk kernels: (A) ``_bwd_chunk_kernel``, per chunk dq and the in-chunk parts of dk,
dv and of the gradient of its start state (sub-chunks in reverse, states recomputed); (C)
``_bwd_tokens_kernel``, per chunk the state path's share of dk, dv. The reverse scans of the state
gradients between them, (B), are ``triton_scan``'s; ``triton_bla.backward`` runs the three.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .checks import Problem
from .gates import dirichlet_gates
from .triton_forward import chunks_ref
from .triton_tiles import (
    _all_gates,
    _chunk_parts,
    _chunk_program,
    _end_weights,
    _from_state,
    _item,
    _load_tokens,
    _mix,
    _mm,
    _pairs,
    _ranges,
    _scores,
    _softmax,
    _state_offsets,
    _store_tokens,
    _sub_chunk,
    _times_a,
    _times_el,
    _to_state,
    _write_state,
)


@triton.jit
def _chunk_end_grad(own_ptr, seg_ptr, after_ptr, chunk_item_ptr, i, g, j_M, d_D,
                    HKV: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr):  # fmt: skip
    """A chunk's end-state gradient (fp32 [BM, BD]): its own from the later chunks of its segment
    plus the gradient of the segment's end state times the decay between the two (``after``)."""
    row = (i * HKV + g) * BM
    seg_row = (tl.load(chunk_item_ptr + i) * HKV + g) * BM
    after = tl.load(after_ptr + row + j_M)[:, None]
    own = tl.load(own_ptr + _state_offsets(row, j_M, d_D, BD)).to(tl.float32)
    return own + after * tl.load(seg_ptr + _state_offsets(seg_row, j_M, d_D, BD))



@triton.jit
def _bwd_chunk_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, o_ptr, lse_ptr, dq_ptr, dq32_ptr, dk_ptr, dv_ptr, ck_ptr, cv_ptr, before_ptr, sk_ptr,
    sv_ptr, dks_ptr, dvs_ptr, cum_ptr, cen_ptr, gs_ptr, gl_ptr, seq_start_ptr, seq_len_ptr, offset_ptr, window_ptr, toff_ptr,
    chunk_seq_ptr, chunk_idx_ptr, chunk_item_ptr, scale, part_q, part_k, part_v,
    H: tl.constexpr, HKV: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
    DK: tl.constexpr, BDK: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr,
    C: tl.constexpr, S: tl.constexpr, NS: tl.constexpr, DT: tl.constexpr, PAIRS: tl.constexpr, CUM: tl.constexpr,
    SPLIT: tl.constexpr, NT: tl.constexpr, TILE_GRID: tl.constexpr, TILE0: tl.constexpr, TILES: tl.constexpr,
    FACTOR_EL: tl.constexpr,
):  # fmt: skip
    """(A) dq, the in-chunk parts of dk and dv (fp32), and the gradient of the chunk's start state
    from the chunk's own outputs. Sub-chunks run in reverse, their states recomputed.

    With NT > 1 the slots run as NT tiles of BM / NT, so that no tile larger than 64 slots is
    live (a [64, 128] tile took 255 registers and half of m = 128's backward). The softmax then
    comes from the forward's log-sum-exp, and its row term sum_j p dp is do . o (o = sum_j p_j u_j
    and dp_j = do . u_j), as in flash attention's backward. A program runs tiles TILE0 ..
    TILE0 + TILES - 1: each tile's share of dq (fp32 scratch), dk and dv (fp32) is added to the
    earlier tiles' in memory, written by this program (after a barrier) or by an earlier launch.
    With TILE_GRID each tile is a program of its own (grid axis 2) and stores its shares in its
    own part of fp32 buffers of NT parts (dq32, dk, dv; part_q, part_k, part_v elements apart),
    which (C) sums in a fixed order. Either way the sums run in one order: the same bits every run."""
    HPG: tl.constexpr = H // HKV
    TILE: tl.constexpr = BM // NT
    i, g, n, c, bos, seq_len, offset, W, toff, t_S, j_T, dk_D, dv_D, causal, second, _ = _chunk_program(
        chunk_seq_ptr, chunk_idx_ptr, seq_start_ptr, seq_len_ptr, offset_ptr, window_ptr, toff_ptr, S, TILE, BDK, BDV, M,
        PAIRS)
    mask_DK, mask_DV = dk_D < DK, dv_D < DV
    row = (i * HKV + g) * BM
    for tt in tl.static_range(TILES):
        if TILE_GRID:
            tile = tl.program_id(2)
            dq_part, dk_part, dv_part = dq32_ptr + tile * part_q, dk_ptr + tile * part_k, dv_ptr + tile * part_v
        else:
            tile = TILE0 + tt
            if tt > 0:
                tl.debug_barrier()  # the previous tile's dq, dk, dv partials, stored by other threads, are read below
        j_M = tile * TILE + j_T
        mask_M = j_M < M
        Kl0, Vl0, Ks, Vs, before0 = _chunk_parts(ck_ptr, cv_ptr, sk_ptr, sv_ptr, before_ptr, chunk_item_ptr, i, g,
                                                 j_M, dk_D, dv_D, HKV, BM, BDK, BDV, SPLIT)  # fmt: skip
        dK = tl.zeros([TILE, BDK], dtype=tl.float32)  # gradient of the state after the current sub-chunk
        dV = tl.zeros([TILE, BDV], dtype=tl.float32)
        for a in tl.static_range(NS - 1, -1, -1):
            Kl = Kl0
            Vl = Vl0
            before = before0
            for b in tl.static_range(a):  # the state before sub-chunk a
                tb = c * C + b * S
                vb = (tb + t_S) < seq_len
                sb, lb, Tb = _all_gates(gs_ptr, gl_ptr, cum_ptr, toff, offset + tb, t_S, seq_len - tb, W, j_M, S, BM, CUM)
                Kl = _write_state(Kl, sb, lb, Tb, _load_tokens(k_ptr, bos + tb + t_S, vb, g, dk_D, mask_DK, HKV, DK), DT)
                Vl = _write_state(Vl, sb, lb, Tb, _load_tokens(v_ptr, bos + tb + t_S, vb, g, dv_D, mask_DV, HKV, DV), DT)
                before = before * tl.exp(Tb)
            t0 = c * C + a * S
            valid, tok, s, l, T, em, el, A, B, r1, r2, E, k, v = _sub_chunk(
                k_ptr, v_ptr, gs_ptr, gl_ptr, cum_ptr, cen_ptr, toff, offset, bos, t0, seq_len, W, g, t_S, second, j_M, dk_D, dv_D,
                HKV, BM, DK, DV, S, CUM, PAIRS,
            )  # fmt: skip
            if a == NS - 1:  # the chunk's last sub-chunk: no later one to reach through the state
                b_dk = tl.zeros([S, BDK], dtype=tl.float32)
                b_dv = tl.zeros([S, BDV], dtype=tl.float32)
            else:
                B_end = s * tl.exp(T[None, :] - l)  # weight of token u in the sub-chunk's end state
                b_dk = _mm(B_end, dK, DT)  # the state path to later sub-chunks of this chunk
                b_dv = _mm(B_end, dV, DT)
                dK = tl.exp(T)[:, None] * dK
                dV = tl.exp(T)[:, None] * dV
            for hh in tl.static_range(HPG):
                h = g * HPG + hh
                q = _load_tokens(q_ptr, tok, valid, h, dk_D, mask_DK, H, DK)
                do = _load_tokens(do_ptr, tok, valid, h, dv_D, mask_DV, H, DV)
                z = _scores(q, k, Kl, Ks, before, em, el, A, B, r1, r2, E, causal, second, scale, mask_M, PAIRS, DT, SPLIT,
                            FACTOR_EL)  # fmt: skip
                dp = _mix(_from_state(do, Vl, Vs, before, DT, SPLIT), _mm(do, tl.trans(v), DT), A, em, el, B, r1, r2, E,
                          causal, second, PAIRS, DT, FACTOR_EL)  # fmt: skip
                if NT > 1:
                    p = tl.exp(z - tl.load(lse_ptr + tok * H + h, mask=valid, other=0.0)[:, None])
                    o = _load_tokens(o_ptr, tok, valid, h, dv_D, mask_DV, H, DV)
                    row_term = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
                else:
                    p = _softmax(z)
                    row_term = tl.sum(p * dp, axis=1)
                Y = scale * p * (dp - row_term[:, None])  # d(scale z)/dz times dz
                pA = _times_a(p, A, PAIRS)
                YA = _times_a(Y, A, PAIRS)
                P = _pairs(pA, B, r1, r2, E, causal, second, PAIRS, DT)
                Pz = _pairs(YA, B, r1, r2, E, causal, second, PAIRS, DT)
                Yel = _times_el(Y, YA, em, el, PAIRS, FACTOR_EL)
                dq = _to_state(Yel, Kl, Ks, before, DT, SPLIT) + _mm(Pz, k, DT)
                if TILE_GRID:
                    _store_tokens(dq_part, dq, tok, valid, h, dk_D, mask_DK, H, DK)
                else:
                    if tile > 0:
                        dq += _load_tokens(dq32_ptr, tok, valid, h, dk_D, mask_DK, H, DK)
                    if tile == NT - 1:
                        _store_tokens(dq_ptr, dq, tok, valid, h, dk_D, mask_DK, H, DK)
                    else:
                        _store_tokens(dq32_ptr, dq, tok, valid, h, dk_D, mask_DK, H, DK)
                b_dk += _mm(tl.trans(Pz), q, DT)
                b_dv += _mm(tl.trans(P), do, DT)
                dK += _mm(tl.trans(Yel), q, DT)
                dV += _mm(tl.trans(_times_el(p, pA, em, el, PAIRS, FACTOR_EL)), do, DT)
            if TILE_GRID:
                _store_tokens(dk_part, b_dk, tok, valid, g, dk_D, mask_DK, HKV, DK)
                _store_tokens(dv_part, b_dv, tok, valid, g, dv_D, mask_DV, HKV, DV)
            else:
                if tile > 0:
                    b_dk += _load_tokens(dk_ptr, tok, valid, g, dk_D, mask_DK, HKV, DK)
                    b_dv += _load_tokens(dv_ptr, tok, valid, g, dv_D, mask_DV, HKV, DV)
                _store_tokens(dk_ptr, b_dk, tok, valid, g, dk_D, mask_DK, HKV, DK)
                _store_tokens(dv_ptr, b_dv, tok, valid, g, dv_D, mask_DV, HKV, DV)
        tl.store(dks_ptr + _state_offsets(row, j_M, dk_D, BDK), dK.to(dks_ptr.dtype.element_ty))
        tl.store(dvs_ptr + _state_offsets(row, j_M, dv_D, BDV), dV.to(dvs_ptr.dtype.element_ty))



@triton.jit
def _bwd_tokens_kernel(
    dk_ptr, dv_ptr, dk_out_ptr, dv_out_ptr, dq32_ptr, dq_ptr, dks_ptr, dvs_ptr, segk_ptr, segv_ptr, after_ptr, chunk_item_ptr,
    cum_ptr, end_ptr, gs_ptr, gl_ptr, seq_start_ptr, seq_len_ptr, offset_ptr, window_ptr, toff_ptr, chunk_seq_ptr, chunk_idx_ptr,
    part_q, part_k, part_v,
    H: tl.constexpr, HKV: tl.constexpr, BM: tl.constexpr, DK: tl.constexpr, BDK: tl.constexpr, DV: tl.constexpr,
    BDV: tl.constexpr, C: tl.constexpr, S: tl.constexpr, NS: tl.constexpr, DT: tl.constexpr, CUM: tl.constexpr,
    PARTS: tl.constexpr,
):  # fmt: skip
    """(C) dk, dv (fp32 partials) + the tokens' share of the chunk's end-state gradient, written in
    the inputs' dtype. That gradient: the part from the later chunks of its segment (dks, dvs)
    plus the decayed gradient of the segment's end state (seg k, v). With PARTS > 1, (A)'s slot
    tiles left dk, dv and dq in that many parts: summed here, in order, and dq written too."""
    HPG: tl.constexpr = H // HKV
    i = tl.program_id(0)
    g = tl.program_id(1)
    n, c, bos, seq_len, offset, W, toff = _item(chunk_seq_ptr, chunk_idx_ptr, seq_start_ptr, seq_len_ptr,
                                                offset_ptr, window_ptr, toff_ptr, i, g)  # fmt: skip
    t_S, j_M, dk_D, dv_D = _ranges(S, BM, BDK, BDV)
    dK = _chunk_end_grad(dks_ptr, segk_ptr, after_ptr, chunk_item_ptr, i, g, j_M, dk_D, HKV, BM, BDK)
    dV = _chunk_end_grad(dvs_ptr, segv_ptr, after_ptr, chunk_item_ptr, i, g, j_M, dv_D, HKV, BM, BDV)
    for a in tl.static_range(NS - 1, -1, -1):
        t0 = c * C + a * S
        valid = (t0 + t_S) < seq_len
        tok = bos + t0 + t_S
        B_end, T = _end_weights(gs_ptr, gl_ptr, cum_ptr, end_ptr, toff, offset + t0, t_S, seq_len - t0, W, j_M, S, BM, CUM, DT)
        b_dk = _mm(B_end, dK, DT)
        b_dv = _mm(B_end, dV, DT)
        for part in tl.static_range(PARTS):
            b_dk += _load_tokens(dk_ptr + part * part_k, tok, valid, g, dk_D, dk_D < DK, HKV, DK)
            b_dv += _load_tokens(dv_ptr + part * part_v, tok, valid, g, dv_D, dv_D < DV, HKV, DV)
        if PARTS > 1:
            for hh in tl.static_range(HPG):
                h = g * HPG + hh
                dq = _load_tokens(dq32_ptr, tok, valid, h, dk_D, dk_D < DK, H, DK)
                for part in tl.static_range(1, PARTS):
                    dq += _load_tokens(dq32_ptr + part * part_q, tok, valid, h, dk_D, dk_D < DK, H, DK)
                _store_tokens(dq_ptr, dq, tok, valid, h, dk_D, dk_D < DK, H, DK)
        _store_tokens(dk_out_ptr, b_dk, tok, valid, g, dk_D, dk_D < DK, HKV, DK)
        _store_tokens(dv_out_ptr, b_dv, tok, valid, g, dv_D, dv_D < DV, HKV, DV)
        dK = tl.exp(T)[:, None] * dK
        dV = tl.exp(T)[:, None] * dV


def chunk_grads_ref(q, k, v, do, states, problem: Problem, chunk: int, seg_chunks: int):
    """Stage (A)'s reference, dense rows only, in float64: autograd through ``chunk_outputs_ref``'s
    chunks with their start states held as inputs: dq, the in-chunk dk and dv, and each chunk's
    start-state gradients dK0, dV0 ([chunks, kv heads, m, d])."""
    grads = [torch.zeros(x.shape, dtype=torch.float64) for x in (q, k, v)]
    dK0, dV0 = [], []
    for _, b, t0, t1, K0, V0, outputs in chunks_ref(q, k, v, states, problem, chunk, seg_chunks):
        x = [t[b : b + 1, t0:t1].double().cpu().requires_grad_() for t in (q, k, v)] + [K0.requires_grad_(), V0.requires_grad_()]
        o = outputs(*x)
        got = torch.autograd.grad((o * do[b : b + 1, t0:t1].double().cpu()).sum(), x)
        for acc, g in zip(grads, got[:3]):
            acc[b : b + 1, t0:t1] = g
        dK0.append(got[3])
        dV0.append(got[4])
    return (*grads, torch.stack(dK0), torch.stack(dV0))


def token_grads_ref(k, v, dk_parts, dv_parts, end_grads, problem: Problem, chunk: int, seg_chunks: int):
    """Stage (C)'s reference, dense rows only, in float64: chunk c's end-state gradient is
    dK_c = dks_c + after_c * seg_k (its segment's), and token t of the chunk gets
    s_t e^(l_end - l_t) dK_c, its weight in the chunk's end state (the product of the later
    tokens' decays, from ``dirichlet_gates``), on top of (A)'s parts summed."""
    p = problem
    dks, dvs, seg_k, seg_v, after = (x.double().cpu() for x in end_grads)
    m, d_k, d_v = p.slots, p.head_dim_k, p.head_dim_v
    B, T = k.shape[:2]
    dk, dv = dk_parts.double().sum(0).cpu(), dv_parts.double().sum(0).cpu()
    chunks, items = -(-T // chunk), -(-T // (chunk * seg_chunks))
    offsets = p.offset.reshape(-1).cpu()
    for b in range(B):
        for c in range(chunks):
            row, item = b * chunks + c, b * items + c // seg_chunks
            t0, t1 = c * chunk, min(c * chunk + chunk, T)
            dec = after[row, :, :m, None]
            dK = dks[row, :, :m, :d_k] + dec * seg_k[item, :, :m, :d_k]
            dV = dvs[row, :, :m, :d_v] + dec * seg_v[item, :, :m, :d_v]
            positions = offsets[b if len(offsets) > 1 else 0] + torch.arange(t0, t1)
            s, alpha, reset = dirichlet_gates(positions, p.window_tensor("cpu"), m, gates=p.gates, shift=p.shift_tensor("cpu"))
            alpha = torch.where(reset, 0.0, alpha)  # [t, G, m]
            later = torch.cat([alpha[1:], torch.ones_like(alpha[:1])]).flip(0).cumprod(0).flip(0)  # decays after t
            w = s * later
            dk[b, t0:t1] += torch.einsum("tgj,gjd->tgd", w, dK)
            dv[b, t0:t1] += torch.einsum("tgj,gjd->tgd", w, dV)
    return dk, dv
