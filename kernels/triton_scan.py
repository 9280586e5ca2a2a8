"""The scans that carry states between chunks and segments: (2), the forward's over each sequence's
segments; (B), the backward's reverse scans of the state gradients (each segment's chunks, then the
segments, in one level or two). ``scan_ref`` is their float64 torch reference."""

from __future__ import annotations

import torch

try:  # a guarded import: exported models (bla export) run without Triton, on the torch backend
    import triton
    import triton.language as tl
except ImportError as exc:
    raise ImportError(f"the Triton BLA kernels need triton: {exc}") from exc

from . import triton_tuning as tuning
from .triton_layout import Layout
from .triton_plan import launch
from .triton_tiles import (
    _state_offsets,
)


@triton.jit
def _scan_item(xk_ptr, xv_ptr, dec_ptr, x, g, j_M, dk_D, dv_D, present, HKV: tl.constexpr, BM: tl.constexpr,
               BDK: tl.constexpr, BDV: tl.constexpr):  # fmt: skip
    """Item x's own key and value states (fp32) and decay, zeros unless ``present``."""
    row = (x * HKV + g) * BM
    keep = j_M < tl.where(present, BM, 0)  # a mask of the rows' shape (Triton's interpreter takes neither a scalar
    # mask nor one from ``vector & scalar``)
    own_k = tl.load(xk_ptr + _state_offsets(row, j_M, dk_D, BDK), mask=keep[:, None], other=0.0).to(tl.float32)
    own_v = tl.load(xv_ptr + _state_offsets(row, j_M, dv_D, BDV), mask=keep[:, None], other=0.0).to(tl.float32)
    return own_k, own_v, tl.load(dec_ptr + row + j_M, mask=keep, other=0.0)



@triton.jit
def _scan_kernel(
    xk_ptr, xv_ptr, yk_ptr, yv_ptr, dec_ptr, hk_ptr, hv_ptr, out_k_ptr, out_v_ptr, first_ptr, count_ptr, after_ptr,
    HKV: tl.constexpr, BM: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr, ROWS: tl.constexpr,
    USE_H: tl.constexpr, REVERSE: tl.constexpr, DECAYS: tl.constexpr, IN_PLACE: tl.constexpr,
):  # fmt: skip
    """(2)/(B) Carry a state through the items of one group (a sequence, or a segment's chunks):
    the carried state before item x is written over x (IN_PLACE; y unused) or to y, in y's dtype,
    and the carry becomes dec(x) * carry + x. Forward: x = an item's own end state, carry = its
    start state; REVERSE: x = an item's own start-state gradient, carry = the gradient of its end
    state. hk/hv: the initial carry (zeros unless USE_H); out: the last. DECAYS: also write, per
    item, the product of the decays of the items carried before it (``after``). Every slot row is
    carried on its own, so a program takes ROWS of them (grid axis 2; SCAN_ROWS says how many)."""
    n = tl.program_id(0)
    g = tl.program_id(1)
    first = tl.load(first_ptr + n)
    count = tl.load(count_ptr + n)
    j_M = tl.program_id(2) * ROWS + tl.arange(0, ROWS)
    dk_D, dv_D = tl.arange(0, BDK), tl.arange(0, BDV)
    sk = _state_offsets((n * HKV + g) * BM, j_M, dk_D, BDK)
    sv = _state_offsets((n * HKV + g) * BM, j_M, dv_D, BDV)
    if USE_H:
        K = tl.load(hk_ptr + sk)
        V = tl.load(hv_ptr + sv)
    else:
        K = tl.zeros([ROWS, BDK], dtype=tl.float32)
        V = tl.zeros([ROWS, BDV], dtype=tl.float32)
    carried = tl.full([ROWS], 1.0, dtype=tl.float32)
    # each item's loads are issued before the previous item's stores (loads of the next item in
    # flight while this one is stored): the chain of dependent loads is the scan's cost
    if REVERSE:
        x = first + count - 1
    else:
        x = first
    own_k, own_v, dec = _scan_item(xk_ptr, xv_ptr, dec_ptr, x, g, j_M, dk_D, dv_D, count > 0, HKV, BM, BDK, BDV)
    for ii in range(0, count):
        row = (x * HKV + g) * BM
        if REVERSE:
            x = x - 1
        else:
            x = x + 1
        next_k, next_v, next_dec = _scan_item(xk_ptr, xv_ptr, dec_ptr, x, g, j_M, dk_D, dv_D, ii + 1 < count,
                                              HKV, BM, BDK, BDV)  # fmt: skip
        ok = _state_offsets(row, j_M, dk_D, BDK)
        ov = _state_offsets(row, j_M, dv_D, BDV)
        if IN_PLACE:  # through x's own pointer: stores through a second one (y is x) cost the backward's
            # scans 0.124 -> 0.242 ms at W=512, m=64 on an H200 (benchmarks/reports/2026-11-to-12.md)
            tl.store(xk_ptr + ok, K.to(xk_ptr.dtype.element_ty))
            tl.store(xv_ptr + ov, V.to(xv_ptr.dtype.element_ty))
        else:
            tl.store(yk_ptr + ok, K.to(yk_ptr.dtype.element_ty))
            tl.store(yv_ptr + ov, V.to(yv_ptr.dtype.element_ty))
        if DECAYS:
            tl.store(after_ptr + row + j_M, carried)
            carried = carried * dec
        K = dec[:, None] * K + own_k
        V = dec[:, None] * V + own_v
        own_k, own_v, dec = next_k, next_v, next_dec
    tl.store(out_k_ptr + sk, K)
    tl.store(out_v_ptr + sv, V)


def scan(xk, xv, dec, hk, hv, first, count, rows: int, reverse: bool, decays: bool = False, out=None):
    """Launch the scan over [items, H_kv, BM, BD] buffers, ``rows`` slot rows a program, the carried
    states into ``out`` (yk, yv; default in place); returns the last carries [N, H_kv, BM, BD]
    and, with ``decays``, each item's product of the decays carried before it."""
    yk, yv = (xk, xv) if out is None else out
    n, hkv, bm = count.numel(), xk.shape[1], xk.shape[2]
    out_k = torch.empty(n, hkv, bm, xk.shape[3], device=xk.device, dtype=torch.float32)
    out_v = torch.empty(n, hkv, bm, xv.shape[3], device=xk.device, dtype=torch.float32)
    after = torch.empty_like(dec) if decays else dec
    use_h = hk is not None
    launch(_scan_kernel, (n, hkv, bm // rows),
            (xk, xv, yk, yv, dec, hk if use_h else out_k, hv if use_h else out_v, out_k, out_v, first, count, after),
            dict(HKV=hkv, BM=bm, BDK=xk.shape[3], BDV=xv.shape[3], ROWS=rows, USE_H=use_h, REVERSE=reverse, DECAYS=decays,
                 IN_PLACE=out is None))
    return (out_k, out_v, after) if decays else (out_k, out_v)


def segment_scan(xk, xv, dec, hk, hv, lay: Layout, plan, reverse: bool, out=None):
    """The scan over each sequence's segments (the forward's (2), the backward's second level of
    (B)), the carried states into ``out`` (default in place): in one level (each program walks its
    sequence's segments in order), or, where a sequence has many segments, in two (no program
    walks more than about G + segments / G). At B=1, T=128k (128 segments, 16 programs at m = 64)
    the one-level chains cost 12% of a forward+backward (benchmarks/reports/2026-11-to-12.md, "The segment scan in
    two levels")."""
    group = plan.scan_group
    if group is None:  # the default: two levels only where they were measured faster
        group = tuning.SCAN_GROUP if lay.longest_items >= tuning.SCAN_GROUP_FROM else 0
    runs = lay.segment_groups(group) if group else None
    if runs is None or runs.longest <= group:
        return scan(xk, xv, dec, hk, hv, lay.item_base, lay.item_count, plan.scan_rows, reverse=reverse, out=out)
    # level 1: each run from a zero carry; xk, xv become the state carried within the run, ``after``
    # the product of the decays carried before each segment in its run
    run_k, run_v, after = scan(xk, xv, dec, None, None, runs.first, runs.count, plan.scan_rows, reverse=reverse,
                                decays=True)  # fmt: skip
    end = runs.first_index if reverse else runs.last  # the run's segment carried last
    run_dec = after[end] * dec[end]
    # level 2: the runs' totals along each sequence; run_k, run_v become each run's carry-in
    hk_out, hv_out = scan(run_k, run_v, run_dec, hk, hv, runs.run_base, runs.run_count, plan.scan_rows, reverse=reverse)
    # each segment's carried state gains its run's carry-in, decayed through the run's segments before it
    n = runs.item_run.numel()  # packed documents' buffers have rows to spare past their segments
    xk[:n] += after[:n, ..., None] * run_k[runs.item_run]
    xv[:n] += after[:n, ..., None] * run_v[runs.item_run]
    if out is not None:
        out[0].copy_(xk)
        out[1].copy_(xv)
    return hk_out, hv_out


def scan_ref(x: torch.Tensor, dec: torch.Tensor, first: torch.Tensor, count: torch.Tensor, h: torch.Tensor | None,
             reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """What ``_scan_kernel`` computes, for one state, in float64: ``x`` [items, H_kv, BM, BD], ``dec``
    [items, H_kv, BM], groups of items ``first[n] .. first[n] + count[n] - 1`` walked in order (or in
    reverse), the carry starting at ``h[n]`` (zeros if None) and becoming dec * carry + x. Returns
    the carry before each item (where the kernel writes it; other rows as in ``x``), each group's
    last carry, and each item's product of the decays carried before it in its group."""
    carried, after = x.double().clone(), torch.ones(dec.shape, dtype=torch.float64)
    out = torch.zeros(count.numel(), *x.shape[1:], dtype=torch.float64)
    for n in range(count.numel()):
        carry = torch.zeros(x.shape[1:], dtype=torch.float64) if h is None else h[n].double()
        product = torch.ones(dec.shape[1:], dtype=torch.float64)
        items = range(int(first[n]), int(first[n]) + int(count[n]))
        for i in reversed(items) if reverse else items:
            carried[i], after[i] = carry, product
            carry = dec[i].double()[..., None] * carry + x[i].double()
            product = product * dec[i].double()
        out[n] = carry
    return carried, out, after
