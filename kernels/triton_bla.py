"""BLA in Triton: chunked forward and backward for every stride, variable length, decode.

The operator's launch code, top to bottom: ``forward`` runs (1) each segment's own end state, (2)
the scan over segments, (3) every chunk's outputs; ``backward`` runs (A) each chunk's dq and
in-chunk gradients, (B) the reverse scans of the state gradients, (C) the state path's share of
dk, dv; ``step`` is one decode step. The stages live beside this module, each readable alone:

    triton_tuning.py    the tuning table: every default, and the one override for experiments
    triton_tables.py    gate and per-phase tables (host, float64, built once per (W, m, gates))
    triton_tiles.py     the device code the chunked kernels share (gates, pair factors, products)
    triton_forward.py   (1) and (3), and (3)'s float64 reference ``chunk_outputs_ref``
    triton_scan.py      (2) and (B), with their float64 reference ``scan_ref``
    triton_backward.py  (A) and (C), and their float64 references ``chunk_grads_ref``, ``token_grads_ref``
    triton_decode.py    the decode step
    triton_layout.py    sequences, chunks and segments of a call, as device tensors
    triton_plan.py      what a call's shapes decide (constants, launch options, saved shapes), and launches

Work runs in sub-chunks of S = 64, 32 or 16 tokens, the unit of every matrix product; a chunk is
one sub-chunk, the unit of parallel work and of stored states. Forward: (1) each segment of
chunks computes its own end state from zero and its decay (parallel over segments and kv heads),
storing on the way each chunk's start state from the segment's zero start and the decay before
it; (2) a short scan over segments gives every segment's start state; (3) every chunk, in
parallel, forms its start state (its own plus its segment's times the decay between them) and
writes its outputs: no state is carried from chunk to chunk there, so the GPU is full at B=1.
The backward is chunk-parallel too: (A) per chunk, dq and the in-chunk parts of dk, dv and of the
gradient of its start state; (B) reverse scans of the state gradients, two levels deep so that no
dependent chain is longer than a segment's chunks or a sequence's segments; (C) per chunk, the
state path's share of dk, dv. Stages (3), (A) and (C) also run alone (``chunk_outputs``,
``chunk_grads``, ``token_grads``), for their tests against the references. How each choice was measured: benchmarks/reports/2026-11-to-12.md.
"""

from __future__ import annotations

import torch

from .checks import Problem
from .triton_backward import (
    _bwd_chunk_kernel,
    _bwd_tokens_kernel,
    chunk_grads_ref,
    token_grads_ref,
)
from .triton_decode import step
from .triton_forward import _fwd_local_kernel, _fwd_out_kernel, chunk_outputs_ref
from .triton_layout import layout as call_layout
from .triton_plan import grad_parts, launch, rows_per_call, saved_layout
from .triton_plan import plan as plan_for
from .triton_scan import scan, segment_scan

__all__ = ["forward", "backward", "step", "chunk_outputs", "chunk_outputs_ref", "chunk_grads", "chunk_grads_ref", "token_grads",
           "token_grads_ref", "rows_per_call", "saved_layout"]


def _padded_state(x: torch.Tensor | None, n: int, hkv: int, bm: int, bd: int, device) -> torch.Tensor:
    """[N, H_kv, m, d] (or zeros) -> fp32 [n >= N, H_kv, BM, BD], zero padded."""
    out = torch.zeros(n, hkv, bm, bd, device=device, dtype=torch.float32)
    if x is not None:
        out[: x.shape[0], :, : x.shape[2], : x.shape[3]] = x  # a static layout's dummy sequence starts from zeros
    return out



def _setup(q: torch.Tensor, p: Problem):
    """What every stage of a call reads: its plan, layout, per-sequence offsets and tables (gs, gl,
    toff, cum, cen, end), each built once and cached where it can be."""
    plan = plan_for(p, q.dtype)
    lay = call_layout(p, q.device, plan.consts["C"], plan.seg_chunks)
    return plan, lay, lay.seq_offsets(p.offset), plan.tables(p, q.device)


def _grad_buffers(q, k, v, consts: dict):
    """dq, the slot tiles' fp32 dq parts (dq itself with one tile) and the fp32 dk, dv parts that
    (A) fills and (C) sums: one part, or one per slot tile when the tiles run as programs."""
    parts = grad_parts(consts)
    dq = torch.empty_like(q)
    dq32 = torch.empty((parts, *q.shape), device=q.device, dtype=torch.float32) if consts["NT"] > 1 else dq
    dk = torch.empty((parts, *k.shape), device=q.device, dtype=torch.float32)
    dv = torch.empty((parts, *v.shape), device=q.device, dtype=torch.float32)
    return dq, dq32, dk, dv


def forward(q, k, v, h0k, h0v, problem: Problem):
    """o, the final state (hk, hv; fp32, contiguous) and the 8 buffers the backward reads."""
    p = problem
    dev = q.device
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    plan, lay, offsets, (gs, gl, toff, cum, cen, end) = _setup(q, p)
    consts = plan.consts
    BM, BDK, BDV, HKV = consts["BM"], consts["BDK"], consts["BDV"], p.num_kv_heads
    common = (gs, gl, lay.starts, lay.lengths, offsets, lay.windows, toff)

    # (1) each segment's own end state and decay, and each chunk's start state from the
    # segment's zero start (stored in the matrix products' operand dtype: (3) and the backward
    # read them as operands); (2) the scan turns the segments' end states into start states
    layout = plan.saved
    new = torch.empty if p.cu_seqlens is None else torch.zeros  # rows past the documents' chunks stay defined
    ck, cv, before, chunk_dec = (new(shape, device=dev, dtype=dtype) for shape, dtype in layout[:4])
    # the segments' end states from (1), in fp32 for the scan
    seg_k, seg_v, seg_dec = (new(shape, device=dev, dtype=torch.float32) for shape, _ in layout[4:7])
    items = lay.total_items
    launch(_fwd_local_kernel, (items, HKV),
            (k, v, seg_k, seg_v, seg_dec, ck, cv, before, chunk_dec, cum, end, *common[:5], lay.chunk_base, *common[5:],
             lay.item_seq, lay.item_chunk), plan.fwd_local)  # fmt: skip
    # what later steps write is allocated while (1) runs: less host time before the GPU's first kernel.
    # The segments' start states, from the scan, in the operands' dtype; each query's log-sum-exp over
    # slots (every row written), else a defined one-element placeholder
    start_k, start_v = (new(shape, device=dev, dtype=dtype) for shape, dtype in layout[4:6])
    lse = (new if consts["NT"] > 1 else torch.zeros)(layout[7][0], device=dev, dtype=torch.float32)
    use_h0 = h0k is not None
    h0k_p = _padded_state(h0k, lay.num_seqs, HKV, BM, BDK, dev) if use_h0 else None
    h0v_p = _padded_state(h0v, lay.num_seqs, HKV, BM, BDV, dev) if use_h0 else None
    hk, hv = segment_scan(seg_k, seg_v, seg_dec, h0k_p, h0v_p, lay, plan, reverse=False, out=(start_k, start_v))

    o = _outputs(q, k, v, lse, (ck, cv, before, start_k, start_v), (cum, cen), common, lay, plan, p)
    hk = hk[: p.num_seqs, :, : p.slots, : p.head_dim_k].contiguous()  # a static layout's dummy sequence left out
    hv = hv[: p.num_seqs, :, : p.slots, : p.head_dim_v].contiguous()
    return o, hk, hv, (ck, cv, before, chunk_dec, start_k, start_v, seg_dec, lse)


def _outputs(q, k, v, lse, states, cum_tables, common, lay, plan, p: Problem) -> torch.Tensor:
    """(3) outputs, every chunk in parallel from its start state: ``states`` = (ck, cv, before,
    start_k, start_v) as (1) and (2) leave them."""
    o = torch.empty(q.shape[:-1] + (p.head_dim_v,), device=q.device, dtype=q.dtype)
    if lay.total_chunks:
        launch(_fwd_out_kernel, (lay.total_chunks, p.num_kv_heads),
                (q, k, v, o, lse, *states, *cum_tables, *common, lay.chunk_seq, lay.chunk_idx, lay.chunk_item, p.scale),
                plan.fwd_out)  # fmt: skip
    return o


def chunk_outputs(q, k, v, states, problem: Problem) -> torch.Tensor:
    """Stage (3) alone, for its test: every chunk's outputs from the start states ``states`` =
    (ck, cv, before, start_k, start_v) in the forward's saved layout (``forward``'s 4 first and
    5th and 6th buffers), whatever they hold; ``chunk_outputs_ref`` is its reference."""
    p = problem
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    plan, lay, offsets, (gs, gl, toff, cum, cen, _) = _setup(q, p)
    common = (gs, gl, lay.starts, lay.lengths, offsets, lay.windows, toff)
    lse = torch.zeros(plan.saved[7][0], device=q.device, dtype=torch.float32)
    return _outputs(q, k, v, lse, states, (cum, cen), common, lay, plan, p)


def chunk_grads(q, k, v, do, o, states, problem: Problem):
    """Stage (A) alone, for its test: dq, (A)'s fp32 dk and dv parts ([parts, *k.shape]) and each
    chunk's start-state gradient from its own outputs (dks, dvs, in ``forward``'s ck, cv layout),
    given the start states ``states`` (as ``chunk_outputs`` takes them) and the outputs ``o`` made
    from them; ``chunk_grads_ref`` is its reference."""
    p = problem
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    plan, lay, offsets, (gs, gl, toff, cum, cen, _) = _setup(q, p)
    dq, dq32, dk, dv = _grad_buffers(q, k, v, plan.consts)
    dks, dvs = torch.zeros_like(states[0]), torch.zeros_like(states[1])
    lse = torch.zeros(plan.saved[7][0], device=q.device, dtype=torch.float32)  # read with NT > 1 slot tiles only
    common = (gs, gl, lay.starts, lay.lengths, offsets, lay.windows, toff, lay.chunk_seq, lay.chunk_idx)
    _chunk_grads(q, k, v, do, o, lse, dq, dq32, dk, dv, states, dks, dvs, (cum, cen), common, lay, plan, p)
    return dq, dk, dv, dks, dvs


def _chunk_grads(q, k, v, do, o, lse, dq, dq32, dk, dv, states, dks, dvs, cum_tables, common, lay, plan, p: Problem) -> None:
    """(A) per chunk: dq, the in-chunk parts of dk, dv (fp32, ``dk.shape[0]`` parts) and the chunk's
    start-state gradient from its own outputs (into ``dks``, ``dvs``), from the start states
    ``states`` = (ck, cv, before, start_k, start_v) as the forward left them."""
    if not lay.total_chunks:
        return
    part_sizes = (q.numel(), k.numel(), v.numel())  # elements between two parts
    args = (q, k, v, do.contiguous(), o.contiguous(), lse, dq, dq32, dk, dv, *states, dks, dvs, *cum_tables, *common,
            lay.chunk_item, p.scale, *part_sizes)  # fmt: skip
    for tile_consts in plan.bwd_chunk:  # one launch, or one per slot tile, in order
        launch(_bwd_chunk_kernel, (lay.total_chunks, p.num_kv_heads, dk.shape[0]), args, tile_consts)


def _token_grads(k, v, dq, dq32, dk, dv, end_grads, tables, offsets, lay, plan, part_sizes):
    """(C) dk, dv in the inputs' dtypes: (A)'s fp32 parts ``dk``, ``dv`` [parts, ...] summed, plus the
    tokens' share of each chunk's end-state gradient, from ``end_grads`` = (dks, dvs, seg_k, seg_v,
    after); with several parts, dq too (written into ``dq`` from ``dq32``)."""
    if not lay.total_chunks:
        return dk[0].to(k.dtype), dv[0].to(v.dtype)  # no tokens: empty tensors
    parts = dk.shape[0]
    cum, end, gs, gl, toff = tables
    dks, dvs, seg_k, seg_v, after = end_grads
    dk_out = dk[0] if k.dtype == torch.float32 and parts == 1 else torch.empty_like(k)
    dv_out = dv[0] if v.dtype == torch.float32 and parts == 1 else torch.empty_like(v)
    launch(_bwd_tokens_kernel, (lay.total_chunks, k.shape[2]),
            (dk, dv, dk_out, dv_out, dq32, dq, dks, dvs, seg_k, seg_v, after, lay.chunk_item, cum, end, gs, gl, lay.starts,
             lay.lengths, offsets, lay.windows, toff, lay.chunk_seq, lay.chunk_idx, *part_sizes), plan.bwd_tokens)  # fmt: skip
    return dk_out, dv_out


def token_grads(q, k, v, dk_parts, dv_parts, end_grads, problem: Problem):
    """Stage (C) alone, for its test: dk, dv from (A)'s fp32 parts ([parts, *k.shape] and
    [parts, *v.shape]) and the chunks' end-state gradients ``end_grads`` = (dks, dvs, seg_k, seg_v,
    after) in the backward's layout (dks, dvs as ``forward``'s ck, cv; seg_k, seg_v as its
    start_k, start_v; after as its before), whatever they hold; ``token_grads_ref`` is its reference."""
    p = problem
    plan, lay, offsets, (gs, gl, toff, cum, _, end) = _setup(q, p)
    dq = torch.empty_like(q)
    dq32 = torch.zeros((dk_parts.shape[0], *q.shape), device=q.device, dtype=torch.float32)
    return _token_grads(k, v, dq, dq32, dk_parts, dv_parts, end_grads, (cum, end, gs, gl, toff), offsets, lay, plan,
                        (q.numel(), k.numel(), v.numel()))  # fmt: skip


def backward(do, dhk, dhv, q, k, v, o, saved, problem: Problem, use_h0: bool):
    """dq, dk, dv (in the inputs' dtypes) and the initial state's gradients (None without one).
    ``o`` is the forward's output (read by a slot-tiled backward only)."""
    ck, cv, before, chunk_dec, seg_start_k, seg_start_v, seg_dec, lse = saved
    p = problem
    dev = q.device
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    plan, lay, offsets, (gs, gl, toff, cum, cen, end) = _setup(q, p)
    consts = plan.consts
    BM, BDK, BDV, HKV = consts["BM"], consts["BDK"], consts["BDV"], p.num_kv_heads
    dq, dq32, dk, dv = _grad_buffers(q, k, v, consts)
    part_sizes = (q.numel(), k.numel(), v.numel())  # elements between two parts
    # each chunk's own share of its start-state gradient, then (after the scan) the gradient of
    # its end state from later chunks of its segment; in the operands' dtype, as (C) reads them
    dks = torch.empty_like(ck)
    dvs = torch.empty_like(cv)
    common = (gs, gl, lay.starts, lay.lengths, offsets, lay.windows, toff, lay.chunk_seq, lay.chunk_idx)
    _chunk_grads(q, k, v, do, o, lse, dq, dq32, dk, dv, (ck, cv, before, seg_start_k, seg_start_v), dks, dvs, (cum, cen),
                 common, lay, plan, p)  # fmt: skip
    # the final state's gradients (None when it was not used: the scan then starts from zeros)
    dhk_p = dhv_p = None
    if dhk is not None or dhv is not None:
        dhk_p = _padded_state(None if dhk is None else dhk.float(), lay.num_seqs, HKV, BM, BDK, dev)
        dhv_p = _padded_state(None if dhv is None else dhv.float(), lay.num_seqs, HKV, BM, BDV, dev)
    # (B) two short scans instead of one over every chunk of a sequence (latency-bound): the
    # chunks of each forward segment from a zero carry, then the segments (by the forward's decays)
    seg_k, seg_v, after = scan(dks, dvs, chunk_dec, None, None, lay.item_chunk_first, lay.item_chunk_count,
                                plan.scan_rows, reverse=True, decays=True)  # fmt: skip
    dh0k, dh0v = segment_scan(seg_k, seg_v, seg_dec, dhk_p, dhv_p, lay, plan, reverse=True)
    dk_out, dv_out = _token_grads(k, v, dq, dq32, dk, dv, (dks, dvs, seg_k, seg_v, after), (cum, end, gs, gl, toff),
                                  offsets, lay, plan, part_sizes)  # fmt: skip
    if not use_h0:
        return dq, dk_out, dv_out, None, None
    n = p.num_seqs
    return dq, dk_out, dv_out, dh0k[:n, :, : p.slots, : p.head_dim_k].contiguous(), dh0v[:n, :, : p.slots, : p.head_dim_v].contiguous()
