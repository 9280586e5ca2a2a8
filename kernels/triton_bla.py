"""BLA in Triton: chunked forward and backward for every stride, variable length, decode.

The gates depend only on positions, so they come from a table built once per (W, m, gates): the
write ``s`` and the log-decay ``log alpha`` of every phase of the period (floored at ``LOG_FLOOR``
where alpha = 0: products across a reset are then below 2e-9, 30x under fp32's rounding, zero in
every output). Kernels gather their rows by phase; no gate tensor per token exists. What the
chunked kernels would otherwise compute per program from those gates comes from per-phase tables
built once per (W, m, gates, S) on the host in float64: each sub-chunk's cumulative log-decay
([S, m] a phase), the centres its pairs are factorised on ([4, m]), and each token's weight in the state
after it ([S, m], in the operands' dtype). (A sequence's last, partial sub-chunk is summed from its
gates where the state after it is carried: (1) and (C).) Reading them instead of summing, reducing
and exponentiating took 1.685 -> 1.287 ms of kernels per forward+backward at W=512, m=64 on an H200
(benchmarks/reports/2026-11-to-12.md).

Work runs in sub-chunks of S = 64, 32 or 16 tokens, the unit of every matrix product. Inside
one, with l the cumulative log-decay from the sub-chunk's start and T its total:

    z[t, j] = scale (e^{l_t,j} q_t . K[j] + sum_{u<=t} (q_t . k_u) s_u,j e^{l_t,j - l_u,j})
    o_t     = sum_j p[t, j] e^{l_t,j} V[j] + sum_{u<=t} (sum_j p[t, j] s_u,j e^{l_t,j - l_u,j}) v_u,  p = softmax_j z
    K'      = e^{T} K + (s e^{T - l})^T k

With v2 gates (alpha <= 1) the state terms' exponents are <= 0 at any stride. The pairs u <= t are
factorised, e^{l_t - l_u} = e^{l_t - c} e^{c - l_u}, so they are tensor-core products too; both
factors must stay within e^{+-80} (fp32 and bf16 hold e^88), which a host-side check over all
phases decides (``sub_chunking``). CENTRED: c is each slot's mid log-decay over the sub-chunk,
valid while the decays' spread inside it is below 160. HALVES, where that spread is wider (W/m from
about 70 to a few hundred: W=6144, m=64 at 64 tokens): pairs inside each half are centred on that
half's mid log-decay; pairs across the halves on the log-decay at the boundary, where both factors
are <= 1 whatever the spread, one more product per pair term. (At W=4096, m=64, which took this
form under a deeper reset floor, it ran 64-token sub-chunks instead of 32-token centred ones: 1.84
against 2.43 ms of kernels per forward+backward on an H200, benchmarks/reports/2026-11-to-12.md.) Strides too coarse
even for 16-token halves (W/m of about a thousand) take an elementwise [16, 16, m] tile of decays
instead (ELEMENTWISE). The [S, m] scores and probabilities never leave the chip.

Parallelism. A chunk is one sub-chunk (BLA_TRITON_CHUNK groups several): the unit of parallel
work and of stored states. Forward: (1) each segment of chunks computes its own end state from
zero and its decay (parallel over segments and kv heads), storing on the way each chunk's start
state from the segment's zero start (in the operands' dtype) and the decay before it; (2) a short
scan over segments gives every segment's start state; (3) every chunk, in parallel, forms its
start state (its own, plus its segment's times the decay between them; the two used apart in
tensor-core products up to 64 slots) and writes its outputs: no state is carried from chunk to
chunk there, so the GPU is full at B=1 and the state costs few registers. The backward
is chunk-parallel too: (A) per chunk, dq and the in-chunk parts of dk, dv and of the gradient of
its start state; (B) reverse scans of the state gradients, two levels deep so that no dependent
chain is longer than a segment's chunks or a sequence's segments: the chunks of every segment
from a zero carry, then the segments; (C) per chunk, the state path's share of dk, dv. (One
program walking a segment's chunks in reverse, the state gradient in registers, avoids (B)'s
first level but spilled 354 registers and took 1.5 ms against (A) + (B)'s 1.1 ms on an H100, as
a forward (3) walking a segment's chunks took 0.52 ms against 0.37: benchmarks/reports/2026-11-to-12.md.)
Tuning knobs (environment): BLA_TRITON_SUB (largest sub-chunk), BLA_TRITON_CHUNK, BLA_TRITON_WARPS,
BLA_TRITON_STAGES, BLA_TRITON_SEGMENT (segment tokens), BLA_TRITON_PAIRS=elementwise|halves|centred,
BLA_TRITON_SCAN_GROUP (the two-level segment scan), BLA_TRITON_SLOT_TILE (the backward's slot tiles),
BLA_TRITON_TILE_RUN (how those tiles run: launches|grid|program), BLA_TRITON_FACTOR_EL (e^l as A e^mid),
BLA_TRITON_CUM_MB (the cumulative log-decay table's size limit), BLA_TRITON_MAXNREG (a register cap),
BLA_TRITON_LAUNCH=jit (every launch through Triton's JIT, not the direct one).
"""

from __future__ import annotations

import collections
import functools
import math
import os

import torch

try:  # a guarded import: exported models (bla export) run without Triton, on the torch backend
    import triton
    import triton.language as tl
except ImportError as exc:
    raise ImportError(f"the Triton BLA kernels need triton: {exc}") from exc

from .checks import Problem
from .gates import dirichlet_gates

_INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
_ENVIRON = getattr(os.environ, "_data", None)  # POSIX: the encoded environment, which os.environ reads through


@functools.lru_cache(maxsize=None)
def _env_key(name: str):
    return os.environ.encodekey(name)


def _env(name: str):
    """os.environ.get(name) without encoding the key and decoding the value on every call (the
    knobs are read on every call); the value is bytes on POSIX, str elsewhere."""
    if _ENVIRON is not None:
        return _ENVIRON.get(_env_key(name))
    return os.environ.get(name)


# log alpha where alpha = 0 (a reset): e^-20 ~ 2e-9, 30x under fp32's rounding (2^-24 ~ 6e-8), so
# products across a reset vanish in every sum. No deeper: the floor adds to the decays' spread inside
# a sub-chunk, and at -20 the stride W/m = 64 (W=4096, m=64) fits one centre over 64 tokens (a
# spread of 156 against FACTOR_LOG_RANGE's 160; 166 at -30, which took the halves form's extra
# products: benchmarks/reports/2026-11-to-12.md, "A shallower reset floor").
LOG_FLOOR = -20.0
SEGMENT_TOKENS = 1024  # work item of (1) and of (B)'s first level: tokens run with a state in registers


def _pow2(n: int) -> int:
    """The power of two at or above n, at least 16 (bit arithmetic: it runs several times a call)."""
    return max(16, 1 << (int(n) - 1).bit_length())


def _slot_block(slots: int) -> int:
    """Slots padded to a power of two of at least 64 (padded slots are masked). Smaller tiles are
    miscompiled by Triton 3.6 on Hopper when the products run on tensor cores (bf16): with 32
    slots the backward chunk kernel made out-of-range shared-memory accesses (compute-sanitizer,
    H100, 2026-11-24); with 16 (m <= 16) the forward's outputs differed from call to call on the
    same inputs and, at d = 32, held NaN where new memory starts as NaN (H200, 2026-12-01,
    benchmarks/lab/determinism.py; regbench_v2's BLA runs went non-finite at step 2).
    BLA_TRITON_SLOT_BLOCK=16 or 32 brings the small tiles back, to measure them."""
    floor = int(os.environ.get("BLA_TRITON_SLOT_BLOCK", 64))
    return max(_pow2(slots), _pow2(floor))


# ----------------------------------------------------------------------------- gate tables


@functools.lru_cache(maxsize=32)
def _gate_table_cpu(windows: tuple[int, ...], slots: int, gates: str, bm: int):
    """(s, log alpha) float32 [sum of distinct W, bm] and the first row of each kv head's window."""
    rows, starts, first = [], {}, 0
    for w in sorted(set(windows)):
        s, alpha, reset = dirichlet_gates(torch.arange(w), torch.tensor([w]), slots, gates=gates)
        la = torch.where(reset, torch.full_like(alpha, LOG_FLOOR), torch.log(alpha.clamp_min(1e-300))).clamp_min(LOG_FLOOR)
        tab = torch.zeros(2, w, bm, dtype=torch.float64)  # padded slots: s = 0, log alpha = 0
        tab[0, :, :slots], tab[1, :, :slots] = s[:, 0], la[:, 0]
        rows.append(tab)
        starts[w] = first
        first += w
    table = torch.cat(rows, dim=1).float()
    return table[0].contiguous(), table[1].contiguous(), [starts[w] for w in windows]


# The factorised pairs stay within e^(+-80): fp32 and bf16 hold e^88. The sums over a sub-chunk
# that carry them keep some margin for large q . k: at a spread of 156 (W/m = 64) finite to
# |q . k| ~ 1.5e5, where 166 gave NaN from ~2e3 on (benchmarks/lab/headroom.py).
FACTOR_LOG_RANGE = 160.0


def _phase_cumsums(w: int, slots: int, gates: str, sub: int) -> torch.Tensor:
    """float64 [W, sub, BM]: the cumulative log-decay l (resets at LOG_FLOOR) of a sub-chunk of
    ``sub`` tokens starting at each phase of the period."""
    _, la, _ = _gate_table_cpu((w,), slots, gates, _slot_block(slots))
    la = la[torch.arange(w + sub) % w].double()  # [W + sub, BM]
    cum = torch.cat([torch.zeros(1, la.shape[1], dtype=la.dtype), la.cumsum(0)])
    return (cum[1:].unfold(0, sub, 1)[:w] - cum[:w, :, None]).transpose(1, 2)


@functools.lru_cache(maxsize=64)
def diag_log_range(windows: tuple[int, ...], slots: int, gates: str, sub: int) -> float:
    """Largest spread of the cumulative log-decay inside any sub-chunk of ``sub`` tokens, over
    every phase, slot and window: whether its pairs can be factorised."""
    worst = 0.0
    for w in set(windows):
        win = _phase_cumsums(w, slots, gates, sub)
        worst = max(worst, float((win.amax(1) - win.amin(1)).max()))
    return worst


# Above this the kernels sum the log-decays themselves (W x S x m fp32 entries; the end weights take
# half as much again in bf16). 128 MiB holds m = 128 at W = 4096 (and m = 64 to W = 8192): there the
# table took m = 128's forward+backward 2.846 -> 2.441 ms of kernels (H200, benchmarks/reports/2026-11-to-12.md), for
# 192 MiB of GPU memory shared by every layer of that (W, m, gates).
CUM_TABLE_BYTES = 128 << 20


def cum_table_fits(problem: Problem, sub: int) -> bool:
    """Whether the kernels read the per-phase table (at most CUM_TABLE_BYTES, or BLA_TRITON_CUM_MB
    MiB: 0 sums the log-decays in every kernel, the schedule the table replaced, to time it)."""
    limit = os.environ.get("BLA_TRITON_CUM_MB", "")
    if limit and not limit.isdigit():
        raise ValueError(f"BLA_TRITON_CUM_MB must be a whole number of MiB (0: no tables), got {limit!r}")
    limit = CUM_TABLE_BYTES if limit == "" else int(limit) << 20
    return sum(set(problem.windows)) * sub * _slot_block(problem.slots) * 4 <= limit


def _phase_centres(win: torch.Tensor) -> torch.Tensor:
    """[W, 4, BM] from a window's phase cumsums [W, sub, BM]: the centre of the whole sub-chunk's
    log-decays (the centred form's mid), then the halves form's mid1, mid2 (the centres of its first
    and second half) and c (the first half's lowest value, at the boundary)."""
    half = win.shape[1] // 2
    first, second = win[:, :half], win[:, half:]
    mid = (win.amax(1) + win.amin(1)) * 0.5
    mid1 = (first.amax(1) + first.amin(1)) * 0.5
    mid2 = (second.amax(1) + second.amin(1)) * 0.5
    return torch.stack([mid, mid1, mid2, first.amin(1)], dim=1)


@functools.lru_cache(maxsize=16)
def _cum_table_on(windows: tuple[int, ...], slots: int, gates: str, sub: int, device: str, bm: int):
    """float32 [sum of distinct W, sub, BM] and its centres [sum of distinct W, 4, BM], rows in the
    order of the gate table's (``bm`` keys the cache: the tables' width follows BLA_TRITON_SLOT_BLOCK)."""
    rows = [_phase_cumsums(w, slots, gates, sub) for w in sorted(set(windows))]
    centres = torch.cat([_phase_centres(win) for win in rows])
    return torch.cat(rows).float().contiguous().to(device), centres.float().contiguous().to(device)


def cum_table(problem: Problem, sub: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The cumulative log-decay of a sub-chunk starting at every phase (what the kernels would
    otherwise sum per program: 29% of (3)'s time at W=512 on an H100), and the centres its pairs
    are factorised on (what (3) and (A) would otherwise reduce over the sub-chunk's tokens), built
    once per (windows, m, gates, S, device)."""
    return _cum_table_on(problem.windows, problem.slots, problem.gates, sub, str(device), _slot_block(problem.slots))


@functools.lru_cache(maxsize=16)
def _end_table_on(windows: tuple[int, ...], slots: int, gates: str, sub: int, device: str, bm: int, dtype: torch.dtype):
    """[sum of distinct W, sub, BM] in the products' operand dtype: each token's weight s_t e^{T - l_t}
    in the state after a whole sub-chunk starting at every phase (the matrix (1) writes states with
    and (C) reads their gradients through), rows in the order of the gate table's."""
    tables = []
    for w in sorted(set(windows)):
        s_tab, la_tab, _ = _gate_table_cpu((w,), slots, gates, bm)
        run = torch.arange(w + sub) % w  # the phases of a sub-chunk starting at any phase, back to back
        cum = torch.cat([torch.zeros(1, bm, dtype=torch.float64), la_tab.double()[run].cumsum(0)])  # cum[i]: the first i
        tok = torch.arange(w)[:, None] + torch.arange(sub)[None, :]  # [W, sub]: each token's place in the run
        # T - l_t = cum[p + sub] - cum[p + t + 1], the log-decay from after token t to the sub-chunk's end:
        # contiguous gathers (the difference of the phase cumsums' strided views took 3.3 s at W=4096, m=128)
        tables.append(s_tab.double()[run][tok] * torch.exp(cum[torch.arange(w) + sub][:, None, :] - cum[tok + 1]))
    return torch.cat(tables).to(dtype).contiguous().to(device)


def phase_tables(problem: Problem, consts: dict, device, placeholder: torch.Tensor):
    """The per-phase tables the kernels read when CUM (the cumulative log-decays, the pairs'
    centres, the end-state weights in the operands' dtype), else placeholders."""
    if not consts["CUM"]:
        return placeholder, placeholder, placeholder
    cum, centres = cum_table(problem, consts["S"], device)
    dtype = torch.bfloat16 if consts["DT"] == tl.bfloat16 else torch.float32
    end = _end_table_on(problem.windows, problem.slots, problem.gates, consts["S"], str(device), consts["BM"], dtype)
    return cum, centres, end


ELEMENTWISE, CENTRED, HALVES = 0, 1, 2  # the in-sub-chunk pair forms (the kernels' PAIRS)


def sub_chunking(problem: Problem) -> tuple[int, int]:
    """(sub-chunk size, pair form): the largest sub-chunk (64, 32 or 16 tokens; 128 too with
    BLA_TRITON_SUB=128, measured slower; at most 8192 slot-token entries per tile, for registers) whose pairs are
    tensor-core products: CENTRED when the decays' range inside the sub-chunk is below
    FACTOR_LOG_RANGE, else HALVES when the range inside each of its halves is (W/m of a few
    hundred: 64 tokens at W=4096, m=64, instead of 32); else 16 tokens, ELEMENTWISE (W/m of
    about a thousand). BLA_TRITON_PAIRS=elementwise, halves or centred forces that form where it
    is safe (tests, benchmarks)."""
    p = problem
    largest = int(os.environ.get("BLA_TRITON_SUB", 64))
    forced = os.environ.get("BLA_TRITON_PAIRS", "")
    if forced not in ("", "elementwise", "halves", "centred"):
        raise ValueError(f"BLA_TRITON_PAIRS must be elementwise, halves or centred, got {forced!r}")
    # the halves form clamps its cross factors at the boundary, exact only where log-decays never
    # rise (v2 rules); v1's can (alpha up to 1.22), so v1 takes smaller sub-chunks instead
    halves_exact = p.gates != "dirichlet_v1"
    if forced != "elementwise":
        for sub in (s for s in (128, 64, 32, 16) if s <= largest and s * _slot_block(p.slots) <= 8192):
            if forced != "halves" and diag_log_range(p.windows, p.slots, p.gates, sub) < FACTOR_LOG_RANGE:
                return sub, CENTRED
            if forced != "centred" and halves_exact and sub >= 32 and diag_log_range(p.windows, p.slots, p.gates, sub // 2) < FACTOR_LOG_RANGE:
                return sub, HALVES
    return 16, ELEMENTWISE


@functools.lru_cache(maxsize=32)
def _gate_table_on(windows: tuple[int, ...], slots: int, gates: str, device: str, bm: int):
    s, la, starts = _gate_table_cpu(windows, slots, gates, bm)
    return s.to(device), la.to(device), torch.tensor(starts, dtype=torch.int32, device=device)


def gate_tables(problem: Problem, device: torch.device):
    """The gate tables of a problem on ``device``, built once per (windows, m, gates, device, slot
    block: BLA_TRITON_SLOT_BLOCK changes the tables' row width)."""
    return _gate_table_on(problem.windows, problem.slots, problem.gates, str(device), _slot_block(problem.slots))


# ----------------------------------------------------------------------------- shared device code


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


# ----------------------------------------------------------------------------- forward


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


# ----------------------------------------------------------------------------- backward


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


# ----------------------------------------------------------------------------- decode


@triton.jit
def _bla_step_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, sk_ptr, sv_ptr, pos_ptr, window_ptr, toff_ptr, gs_ptr, gl_ptr, scale,
    H: tl.constexpr, HKV: tl.constexpr, M: tl.constexpr, BM: tl.constexpr,
    DK: tl.constexpr, BDK: tl.constexpr, DV: tl.constexpr, BDV: tl.constexpr, FLOOR: tl.constexpr,
):  # fmt: skip
    """One token per sequence; updates the (unpadded) state in place. FLOOR: LOG_FLOOR."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    HPG: tl.constexpr = H // HKV
    W = tl.load(window_ptr + g)
    toff = tl.load(toff_ptr + g)
    pos = tl.load(pos_ptr + b)
    j_M = tl.arange(0, BM)
    mask_M = j_M < M
    dk_D, dv_D = tl.arange(0, BDK), tl.arange(0, BDV)
    mask_DK, mask_DV = dk_D < DK, dv_D < DV
    gate_row = (toff + pos % W) * BM + j_M
    s = tl.load(gs_ptr + gate_row)
    la = tl.load(gl_ptr + gate_row)
    alpha = tl.where(la <= FLOOR, 0.0, tl.exp(la))  # LOG_FLOOR marks resets: exactly 0 here
    sk = (b * HKV + g) * M * DK + j_M[:, None] * DK + dk_D[None, :]
    sv = (b * HKV + g) * M * DV + j_M[:, None] * DV + dv_D[None, :]
    mk = mask_M[:, None] & mask_DK[None, :]
    mv = mask_M[:, None] & mask_DV[None, :]
    K = tl.load(sk_ptr + sk, mask=mk, other=0.0)
    V = tl.load(sv_ptr + sv, mask=mv, other=0.0)
    k = tl.load(k_ptr + (b * HKV + g) * DK + dk_D, mask=mask_DK, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + (b * HKV + g) * DV + dv_D, mask=mask_DV, other=0.0).to(tl.float32)
    K = alpha[:, None] * K + s[:, None] * k[None, :]
    V = alpha[:, None] * V + s[:, None] * v[None, :]
    tl.store(sk_ptr + sk, K, mask=mk)
    tl.store(sv_ptr + sv, V, mask=mv)
    for hh in tl.static_range(HPG):
        h = g * HPG + hh
        q = tl.load(q_ptr + (b * H + h) * DK + dk_D, mask=mask_DK, other=0.0).to(tl.float32)
        z = tl.where(mask_M, scale * tl.sum(K * q[None, :], axis=1), float("-inf"))
        p = tl.exp(z - tl.max(z, axis=0))
        p = p / tl.sum(p, axis=0)
        o = tl.sum(p[:, None] * V, axis=0)
        tl.store(o_ptr + (b * H + h) * DV + dv_D, o.to(o_ptr.dtype.element_ty), mask=mask_DV)


# ----------------------------------------------------------------------------- Python side

# Matmul operands for half inputs: bf16 for fp16 too, since the factorised pair decays reach
# e^80, far beyond fp16's 65504, while bf16 has fp32's exponent range.
_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.bfloat16}


def _as32(x: torch.Tensor, device) -> torch.Tensor:
    return x.to(device=device, dtype=torch.int32).contiguous()


class _Layout:
    """Sequences, chunks and forward segments of one call, as int32 device tensors (positions
    only: the offsets come with each call)."""

    def __init__(self, starts, lengths, windows: tuple[int, ...], device, chunk: int, seg_chunks: int):
        seq_ids = torch.arange(len(lengths))
        n_chunks = (lengths + chunk - 1) // chunk
        self.total_chunks = int(n_chunks.sum())
        chunk_base = torch.cumsum(n_chunks, 0) - n_chunks
        chunk_seq = torch.repeat_interleave(seq_ids, n_chunks)
        chunk_idx = torch.arange(self.total_chunks) - chunk_base[chunk_seq]
        n_items = torch.clamp((n_chunks + seg_chunks - 1) // seg_chunks, min=1)  # an empty sequence still has one
        item_base = torch.cumsum(n_items, 0) - n_items
        item_seq = torch.repeat_interleave(seq_ids, n_items)
        self.total_items = int(n_items.sum())
        item_chunk = (torch.arange(self.total_items) - item_base[item_seq]) * seg_chunks
        self.starts, self.lengths = _as32(starts, device), _as32(lengths, device)
        self.chunk_base = _as32(chunk_base, device)
        self.chunk_seq, self.chunk_idx = _as32(chunk_seq, device), _as32(chunk_idx, device)
        self.item_base, self.item_count = _as32(item_base, device), _as32(n_items, device)
        self.item_seq, self.item_chunk = _as32(item_seq, device), _as32(item_chunk, device)
        # each segment's chunks (the backward scans them, then the segments), and each chunk's segment
        self.item_chunk_first = _as32(chunk_base[item_seq] + item_chunk, device)
        self.item_chunk_count = _as32((n_chunks[item_seq] - item_chunk).clamp(0, seg_chunks), device)
        self.chunk_item = _as32(item_base[chunk_seq] + chunk_idx // seg_chunks, device)
        self.windows = _as32(torch.tensor(windows), device)
        self._n_items, self._item_base, self._device, self._groups = n_items, item_base, device, {}
        self.longest_items = int(n_items.max()) if len(n_items) else 0  # segments of the longest sequence

    def segment_groups(self, group: int) -> "_SegmentGroups":
        """The segments cut into runs of ``group`` for the two-level segment scan (built once)."""
        if group not in self._groups:
            self._groups[group] = _SegmentGroups(self._n_items, self._item_base, group, self._device)
        return self._groups[group]


class _SegmentGroups:
    """Each sequence's segments in runs of at most ``group`` (the last run shorter), for a scan in
    two levels: every run from a zero carry (all runs in parallel), then the runs' totals along
    each sequence (a chain ``group`` times shorter), then each segment's share of its run's carry."""

    def __init__(self, n_items: torch.Tensor, item_base: torch.Tensor, group: int, device):
        n_runs = (n_items + group - 1) // group
        run_base = torch.cumsum(n_runs, 0) - n_runs
        run_seq = torch.repeat_interleave(torch.arange(len(n_items)), n_runs)
        in_seq = (torch.arange(int(n_runs.sum())) - run_base[run_seq]) * group  # a run's first segment in its sequence
        first = item_base[run_seq] + in_seq
        count = torch.minimum(n_items[run_seq] - in_seq, torch.tensor(group))
        self.first, self.count = _as32(first, device), _as32(count, device)
        self.last = (first + count - 1).to(device)  # int64: index tensors
        self.first_index = first.to(device)
        self.run_base, self.run_count = _as32(run_base, device), _as32(n_runs, device)
        self.item_run = torch.repeat_interleave(torch.arange(len(first)), count).to(device)
        self.longest = int(n_items.max()) if len(n_items) else 0


@functools.lru_cache(maxsize=64)
def _dense_layout(batch: int, seq_len: int, windows: tuple[int, ...], device: str, chunk: int, seg_chunks: int) -> _Layout:
    """The layout of B equal sequences, built once per shape: no host-to-device copies per call."""
    starts = torch.arange(batch, dtype=torch.int64) * seq_len
    return _Layout(starts, torch.full((batch,), seq_len, dtype=torch.int64), windows, device, chunk, seg_chunks)


_VARLEN_LAYOUTS: collections.OrderedDict = collections.OrderedDict()  # the last few packed batches' layouts


def _layout(problem: Problem, device, chunk: int, seg_chunks: int) -> _Layout:
    """The call's layout. Packed documents need their lengths on the host (one device read);
    the layout is kept for the same ``cu_seqlens`` memory, so the layers of a model (forward and
    backward) read it once per batch, not once per call. The cache holds the tensor itself:
    while it lives, no other tensor has its memory, and a write to it changes its version."""
    p = problem
    if p.cu_seqlens is None:
        return _dense_layout(p.batch, p.seq_len, p.windows, str(device), chunk, seg_chunks)
    cu = p.cu_seqlens
    key = (cu.data_ptr(), cu.numel(), cu.dtype, str(device), p.windows, chunk, seg_chunks)
    hit = _VARLEN_LAYOUTS.get(key)
    if hit is not None and hit[1] == cu._version:
        _VARLEN_LAYOUTS.move_to_end(key)
        return hit[2]
    host = cu.cpu()
    layout = _Layout(host[:-1], host[1:] - host[:-1], p.windows, device, chunk, seg_chunks)
    _VARLEN_LAYOUTS[key] = (cu, cu._version, layout)
    while len(_VARLEN_LAYOUTS) > 8:
        _VARLEN_LAYOUTS.popitem(last=False)
    return layout


def _constants(problem: Problem, dtype: torch.dtype) -> dict:
    p = problem
    sub, pairs = sub_chunking(p)
    # a chunk (the unit of parallel work and of stored states) is one sub-chunk: no state is
    # updated inside (3) or recomputed inside (A). BLA_TRITON_CHUNK=64 keeps 64-token chunks of
    # smaller sub-chunks (half the stored states; measured slower: benchmarks/reports/2026-11-to-12.md)
    chunk = max(sub, int(os.environ.get("BLA_TRITON_CHUNK", sub)))
    tiles = _slot_tiles(_slot_block(p.slots))
    return dict(
        H=p.num_heads, HKV=p.num_kv_heads, M=p.slots, BM=_slot_block(p.slots),
        DK=p.head_dim_k, BDK=_pow2(p.head_dim_k), DV=p.head_dim_v, BDV=_pow2(p.head_dim_v),
        C=chunk, S=sub, NS=chunk // sub, PAIRS=pairs, CUM=cum_table_fits(p, sub),
        # the chunk's and segment's states used apart (2 products each): measured faster up to 64
        # slots; above, their registers spill and one summed state is faster (benchmarks/reports/2026-11-to-12.md)
        SPLIT=_slot_block(p.slots) <= int(os.environ.get("BLA_TRITON_SPLIT_SLOTS", 64)),
        NT=tiles,
        TILE_RUN=_tile_run() if tiles > 1 else "program",
        DT=tl.float32 if _INTERPRETING else _DOT_DTYPES.get(dtype, tl.float32),
    )  # fmt: skip


# The backward's slot tile: wider states run through it in tiles of this many (the forward stores
# each query's log-sum-exp for it), by default only at 128-slot blocks, where it was measured
# faster. fwd+bwd on an H200, B=4, T=8192, bf16 (benchmarks/reports/2026-11-to-12.md, "The backward in slot tiles"):
# m = 128 3.947 -> 3.436 ms at W=512 (`_bwd_chunk` 2.001 -> 1.434), 5.204 -> 4.385 at W=4096; at
# m = 256 (four tiles of 32-token sub-chunks) 9.999 -> 10.817, so 256 slots stay in one tile.
# BLA_TRITON_SLOT_TILE overrides it: 0, one tile of every slot; a power of two >= 16, tiles of that many.
SLOT_TILE, SLOT_TILE_BLOCKS = 64, (128,)


TILE_RUNS = ("launches", "grid", "program")


def _tile_run() -> str:
    """How (A)'s slot tiles run (BLA_TRITON_TILE_RUN): "launches" (the default), one launch per
    tile, each adding its shares of dq, dk and dv to the earlier launches'; "grid", each a program
    of its own (grid axis 2) storing its shares in a part of its own, which (C) sums; "program",
    one program walking them (the default before 2026-12-04). One program's two unrolled tiles keep
    each other's values live: compiled for sm_90 (Triton 3.6), m = 128's `_bwd_chunk` needs 3736
    stack bytes, against 528 a tile. On an H200 (B=4, T=8192, bf16, fwd+bwd kernels) m = 128 took
    2.950 / 2.576 / 2.516 ms (program / grid / launches) at W=512, 4.272 / 3.194 / 3.067 at W=4096:
    the grid's parts cost (C) more reads than the second launch's (benchmarks/reports/2026-11-to-12.md, "m = 128's
    slot tiles apart")."""
    value = os.environ.get("BLA_TRITON_TILE_RUN", "launches")
    if value not in TILE_RUNS:
        raise ValueError(f"BLA_TRITON_TILE_RUN must be one of {', '.join(TILE_RUNS)}, got {value!r}")
    return value


def _slot_tiles(bm: int) -> int:
    value = os.environ.get("BLA_TRITON_SLOT_TILE", "")
    if value == "":
        return bm // SLOT_TILE if bm in SLOT_TILE_BLOCKS else 1
    tile = int(value)
    if tile == 0:
        return 1
    if tile < 16 or tile & (tile - 1):
        raise ValueError(f"BLA_TRITON_SLOT_TILE must be 0 (off) or a power of two of at least 16, got {tile}")
    return max(1, bm // tile)


def _pick(consts: dict, *names: str) -> dict:
    return {k: consts[k] for k in names}


# Register caps measured faster, by (kernel, slot block); none elsewhere. H200, B=4, T=8192, m = 64
# (benchmarks/reports/2026-11-to-12.md, "Per-phase tables and direct launches"): (C) 0.190 -> 0.173 ms at 168 (3
# programs an SM); 168 for every kernel cost 1.290 -> 1.542 ms of kernels per forward+backward.
MAXNREG = {("bwd_tokens", 64): 168}


def _kernel_knob(name: str, kernel: str, default):
    """An environment knob's value for ``kernel``: one number for every kernel, or per kernel as
    ``fwd_out=8,bwd_chunk=4`` (kernel names without _kernel; kernels not named keep ``default``)."""
    raw = os.environ.get(name, "")
    try:
        value = dict(item.split("=") for item in raw.split(",")).get(kernel, "") if "=" in raw else raw
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"{name} must be a number, or kernel=number pairs such as fwd_out=8,bwd_chunk=4, "
                         f"got {raw!r}") from None


def _factor_el(consts: dict, kernel: str) -> bool:
    """Whether (3) / (A) take e^l as A e^mid (FACTOR_EL, see _mix): fewer live [S, m] tiles, so fewer
    spills; on unless FACTOR_EL_OFF names (kernel, pair form, slot block). BLA_TRITON_FACTOR_EL
    overrides it: 0 or 1 for both kernels, or per kernel as ``fwd_out=0``."""
    default = int((kernel, consts["PAIRS"], consts["BM"]) not in FACTOR_EL_OFF)
    value = _kernel_knob("BLA_TRITON_FACTOR_EL", kernel, default)
    if value not in (0, 1):
        raise ValueError(f"BLA_TRITON_FACTOR_EL must be 0 or 1 (or kernel=0|1 pairs), got {value}")
    return bool(value)


# Where e^l stays a tile of its own. Kernels' CUDA time on an H200 (B=4, T=8192, bf16; factored
# against not, ms; benchmarks/reports/2026-11-to-12.md, "e^l from A"): (3) m = 64 W=512 (centred) 0.295 / 0.268 (its
# own tile faster: no spills to save there), W=4096 (halves) 0.294 / 0.327; m = 128 W=512 0.450 /
# 0.591, W=4096 0.495 / 0.690; (A) 0.429 / 0.435, 0.563 / 0.571, 0.996 / 1.001, 1.183 / 1.245;
# m = 256 (32-token sub-chunks, 8 warps) 11.38 / 12.39 ms of kernels per forward+backward.
FACTOR_EL_OFF = {("fwd_out", CENTRED, 64)}


def _launch_opts(problem: Problem, kernel: str) -> dict:
    """4 warps up to 128 slots (measured faster than 8 at S = 64, 32 and 16 on H100, m = 64; at
    m = 128 on an H200, 4.01 against 4.82 ms of kernels per forward+backward: benchmarks/reports/2026-11-to-12.md),
    8 above; registers capped as MAXNREG says. BLA_TRITON_WARPS / BLA_TRITON_STAGES / BLA_TRITON_MAXNREG
    (a cap on registers a thread, the rest spilled) override them: a number for every kernel, or
    per kernel as ``fwd_out=8,bwd_chunk=4`` (kernel names without _kernel)."""

    opts = dict(num_warps=_kernel_knob("BLA_TRITON_WARPS", kernel, 4 if problem.slots <= 128 else 8),
                num_stages=_kernel_knob("BLA_TRITON_STAGES", kernel, 1))
    maxnreg = _kernel_knob("BLA_TRITON_MAXNREG", kernel, MAXNREG.get((kernel, _slot_block(problem.slots))))
    return opts if maxnreg is None else dict(opts, maxnreg=maxnreg)


# Slot rows per scan program (BLA_TRITON_SCAN_ROWS overrides it). Scan kernel time per forward+backward,
# W = 512, H200 (benchmarks/reports/2026-11-to-12.md): m = 64: 0.17 ms at 64 rows, 0.32 at 32, 0.42 at 16 (more, smaller
# programs each wait on the same chain of loads); m = 256: 0.81 ms at 64 rows, 1.66 at 32, 6.88 as one
# program per state (its [256, 64] fp32 carries spill).
SCAN_ROWS = 64


def _scan_rows(bm: int) -> int:
    rows = int(os.environ.get("BLA_TRITON_SCAN_ROWS", SCAN_ROWS))
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"BLA_TRITON_SCAN_ROWS must be a power of two, got {rows}")
    return min(rows, bm)


MIN_PROGRAMS = 512  # segments x kv heads below which segments shrink (about 4 per SM of an H100)


def _segment_chunks(problem: Problem, chunk: int) -> int:
    """Chunks per segment: SEGMENT_TOKENS, halved (down to one chunk) while the call would have
    fewer than MIN_PROGRAMS segments x kv heads, so short or few sequences still fill the GPU."""
    if "BLA_TRITON_SEGMENT" in os.environ:
        return int(os.environ["BLA_TRITON_SEGMENT"]) // chunk or 1
    p = problem
    seg = SEGMENT_TOKENS // chunk
    while seg > 1 and p.num_kv_heads * (p.num_seqs + p.batch * p.seq_len // (seg * chunk)) < MIN_PROGRAMS:
        seg //= 2
    return seg


def _padded_state(x: torch.Tensor | None, n: int, hkv: int, bm: int, bd: int, device) -> torch.Tensor:
    """[N, H_kv, m, d] (or zeros) -> fp32 [N, H_kv, BM, BD], zero padded."""
    out = torch.zeros(n, hkv, bm, bd, device=device, dtype=torch.float32)
    if x is not None:
        out[:, :, : x.shape[2], : x.shape[3]] = x
    return out


class _Launcher:
    """One kernel at one set of constants. The first call goes through Triton's JIT (which
    compiles, or finds the kernel compiled for these arguments' specialisation: their dtypes and
    whether each pointer is 16-byte aligned); later calls whose arguments specialise the same
    way (every pointer aligned, the same dtypes and scalars, the same device) launch the compiled
    kernel directly. Triton's per-call binding and cache lookup were 0.45 ms of the host's 1.51 ms
    per eager forward+backward (seven launches) on an H200 (benchmarks/reports/2026-11-to-12.md, "Per-phase tables
    and direct launches"). BLA_TRITON_LAUNCH=jit takes Triton's path every call."""

    __slots__ = ("kernel", "consts", "tail", "runtime", "cached")

    def __init__(self, kernel, consts: dict):
        self.kernel, self.consts = kernel, consts
        names = list(kernel.arg_names)
        self.runtime = len(names) - sum(name in consts for name in names)  # arguments before the constexprs
        # the constexprs' values in the kernel's order, after its runtime arguments (None: another order, never direct)
        in_order = all(name in consts for name in names[self.runtime:])
        self.tail = tuple(consts[name] for name in names[self.runtime:]) if in_order else None
        self.cached = None  # (specialisation, compiled kernel), replaced as one (the backward runs on another thread)

    def __call__(self, grid, args: tuple, direct: bool = True) -> None:
        spec = _specialisation(args)
        cached = self.cached
        if direct and spec is not None and cached is not None and cached[0] == spec:
            cached[1][(*grid, 1, 1)[:3]](*args, *self.tail)  # the compiled kernel's launcher takes three grid axes
            return
        compiled = self.kernel[grid](*args, **self.consts)
        takes_direct = self.tail is not None and len(args) == self.runtime and hasattr(compiled, "packed_metadata")
        if direct and spec is not None and takes_direct:
            self.cached = (spec, compiled)


def _specialisation(args: tuple):
    """What Triton specialises a kernel on, for arguments that take the direct launch: the device,
    the tensors' dtypes and the scalars; None if any pointer is not 16-byte aligned (Triton's JIT
    then decides)."""
    kinds = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if a.data_ptr() % 16:
                return None
            kinds.append(a.dtype)
        else:
            kinds.append(a)
    return args[0].get_device(), tuple(kinds)


_LAUNCHERS: dict = {}


def _launch(kernel, grid, args: tuple, consts: dict) -> None:
    """Launch ``kernel`` over ``grid`` through its launcher at these constants (made once)."""
    key = (kernel, tuple(consts.items()))
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        if len(_LAUNCHERS) > 512:
            _LAUNCHERS.clear()
        launcher = _LAUNCHERS[key] = _Launcher(kernel, consts)
    mode = _env("BLA_TRITON_LAUNCH")
    if mode not in _LAUNCH_MODES:
        raise ValueError(f"BLA_TRITON_LAUNCH must be 'direct' or 'jit', got {mode!r}")
    launcher(grid, args, direct=_LAUNCH_MODES[mode])


_LAUNCH_MODES = {None: True, b"": True, "": True, b"direct": True, "direct": True, b"jit": False, "jit": False}


def _scan(xk, xv, dec, hk, hv, first, count, rows: int, reverse: bool, decays: bool = False, out=None):
    """Launch the scan over [items, H_kv, BM, BD] buffers, ``rows`` slot rows a program, the carried
    states into ``out`` (yk, yv; default in place); returns the last carries [N, H_kv, BM, BD]
    and, with ``decays``, each item's product of the decays carried before it."""
    yk, yv = (xk, xv) if out is None else out
    n, hkv, bm = count.numel(), xk.shape[1], xk.shape[2]
    out_k = torch.empty(n, hkv, bm, xk.shape[3], device=xk.device, dtype=torch.float32)
    out_v = torch.empty(n, hkv, bm, xv.shape[3], device=xk.device, dtype=torch.float32)
    after = torch.empty_like(dec) if decays else dec
    use_h = hk is not None
    _launch(_scan_kernel, (n, hkv, bm // rows),
            (xk, xv, yk, yv, dec, hk if use_h else out_k, hv if use_h else out_v, out_k, out_v, first, count, after),
            dict(HKV=hkv, BM=bm, BDK=xk.shape[3], BDV=xv.shape[3], ROWS=rows, USE_H=use_h, REVERSE=reverse, DECAYS=decays,
                 IN_PLACE=out is None))
    return (out_k, out_v, after) if decays else (out_k, out_v)


def _segment_scan(xk, xv, dec, hk, hv, lay: _Layout, plan, reverse: bool, out=None):
    """The scan over each sequence's segments (the forward's (2), the backward's second level of
    (B)), the carried states into ``out`` (default in place): in one level (each program walks its
    sequence's segments in order), or, where a sequence has many segments, in two (no program
    walks more than about G + segments / G). At B=1, T=128k (128 segments, 16 programs at m = 64)
    the one-level chains cost 12% of a forward+backward (benchmarks/reports/2026-11-to-12.md, "The segment scan in
    two levels")."""
    group = plan.scan_group
    if group is None:  # the default: two levels only where they were measured faster
        group = SCAN_GROUP if lay.longest_items >= SCAN_GROUP_FROM else 0
    runs = lay.segment_groups(group) if group else None
    if runs is None or runs.longest <= group:
        return _scan(xk, xv, dec, hk, hv, lay.item_base, lay.item_count, plan.scan_rows, reverse=reverse, out=out)
    # level 1: each run from a zero carry; xk, xv become the state carried within the run, ``after``
    # the product of the decays carried before each segment in its run
    run_k, run_v, after = _scan(xk, xv, dec, None, None, runs.first, runs.count, plan.scan_rows, reverse=reverse,
                                decays=True)  # fmt: skip
    end = runs.first_index if reverse else runs.last  # the run's segment carried last
    run_dec = after[end] * dec[end]
    # level 2: the runs' totals along each sequence; run_k, run_v become each run's carry-in
    hk_out, hv_out = _scan(run_k, run_v, run_dec, hk, hv, runs.run_base, runs.run_count, plan.scan_rows, reverse=reverse)
    # each segment's carried state gains its run's carry-in, decayed through the run's segments before it
    n = runs.item_run.numel()  # packed documents' buffers have rows to spare past their segments
    xk[:n] += after[:n, ..., None] * run_k[runs.item_run]
    xv[:n] += after[:n, ..., None] * run_v[runs.item_run]
    if out is not None:
        out[0].copy_(xk)
        out[1].copy_(xv)
    return hk_out, hv_out


# The two-level segment scan's runs (G) and the segments a sequence needs before it is used by
# default. fwd+bwd on an H200, m = 64, W = 512 / 4096 (benchmarks/reports/2026-11-to-12.md): at B=1, T=128k (128
# segments) G = 8 took 6.08 / 7.32 ms against 6.96 / 8.20 in one level, G = 16 6.16 / 7.41; at
# B=2, T=64k (64 segments) 6.05 / 7.31 against 6.44 / 7.68; at B=1, T=32k (32 segments) its
# kernels gain 2% but its extra host work (0.6 ms a call: gathers, a multiply-add) made the
# call slower (1.89 / 2.21 against 1.64 / 1.97 ms), so short sequences keep one level.
SCAN_GROUP, SCAN_GROUP_FROM = 8, 64


def _scan_group() -> int | None:
    """BLA_TRITON_SCAN_GROUP: unset, the default rule (None); 0, always one level; G >= 2, runs of G
    wherever a sequence has more than G segments."""
    value = os.environ.get("BLA_TRITON_SCAN_GROUP", "")
    if value == "":
        return None
    group = int(value)
    if group < 0 or group == 1:
        raise ValueError(f"BLA_TRITON_SCAN_GROUP must be 0 (one level) or at least 2 segments, got {group}")
    return group


_KNOBS = ("BLA_TRITON_SUB", "BLA_TRITON_CHUNK", "BLA_TRITON_SLOT_BLOCK", "BLA_TRITON_WARPS", "BLA_TRITON_STAGES",
          "BLA_TRITON_SEGMENT", "BLA_TRITON_PAIRS", "BLA_TRITON_SPLIT_SLOTS", "BLA_TRITON_SCAN_ROWS",
          "BLA_TRITON_SCAN_GROUP", "BLA_TRITON_SLOT_TILE", "BLA_TRITON_CUM_MB", "BLA_TRITON_MAXNREG",
          "BLA_TRITON_LAUNCH", "BLA_TRITON_TILE_RUN", "BLA_TRITON_FACTOR_EL")  # fmt: skip
_LOCAL = ("HKV", "BM", "DK", "BDK", "DV", "BDV", "C", "S", "NS", "DT")
_PLANS: dict = {}


class _Plan:
    """Everything about a call that its shapes, (windows, m, gates) and dtype decide, worked out
    once: a training step calls each layer's kernels with the same plan. Building it per call
    (sub-chunk choice, launch options, keyword dicts) was host time: caching it took the 350m
    BLA model from 105,189 to 133,306 tokens/s on an H200 (benchmarks/reports/2026-11-to-12.md)."""

    def __init__(self, problem: Problem, dtype: torch.dtype):
        p = problem
        self.consts = consts = _constants(p, dtype)
        self.seg_chunks = _segment_chunks(p, consts["C"])
        self.scan_rows = _scan_rows(consts["BM"])
        self.scan_group = _scan_group()
        self.fwd_local = {**_pick(consts, "CUM", *_LOCAL), "SEG_CHUNKS": self.seg_chunks, **_launch_opts(p, "fwd_local")}
        chunked = ("H", "M", "PAIRS", "CUM", "SPLIT", "NT", *_LOCAL)  # the constants of (3) and (A)
        self.fwd_out = {**_pick(consts, *chunked), "FACTOR_EL": _factor_el(consts, "fwd_out"), **_launch_opts(p, "fwd_out")}
        # (A)'s launches: one, or one per slot tile (each its tile's constants)
        run, tiles = consts["TILE_RUN"], consts["NT"]
        bwd_chunk = {**_pick(consts, *chunked), "TILE_GRID": run == "grid", "FACTOR_EL": _factor_el(consts, "bwd_chunk"),
                     **_launch_opts(p, "bwd_chunk")}  # fmt: skip
        self.bwd_chunk = ([{**bwd_chunk, "TILE0": t, "TILES": 1} for t in range(tiles)] if run == "launches"
                          else [{**bwd_chunk, "TILE0": 0, "TILES": 1 if run == "grid" else tiles}])  # fmt: skip
        self.bwd_tokens = {**_pick(consts, "H", "CUM", *_LOCAL), "PARTS": _grad_parts(consts),
                           **_launch_opts(p, "bwd_tokens")}
        self.saved = _saved_shapes(p, consts, self.seg_chunks)
        _check_32_bit_offsets(p, self.saved, _grad_parts(consts))
        self._tables: dict = {}

    def tables(self, problem: Problem, device) -> tuple:
        """(s, log alpha, each kv head's first row, cumulative log-decays, centres, end weights) on
        ``device``: looked up once per plan and device, not per call."""
        hit = self._tables.get(device)
        if hit is None:
            gs, gl, toff = gate_tables(problem, device)
            hit = self._tables[device] = (gs, gl, toff, *phase_tables(problem, self.consts, device, gl))
        return hit


def _saved_shapes(p: Problem, consts: dict, seg_chunks: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    chunks, items = saved_rows(p, consts["C"], seg_chunks)
    hkv, bm, bdk, bdv = p.num_kv_heads, consts["BM"], consts["BDK"], consts["BDV"]
    st, f32 = (torch.bfloat16 if consts["DT"] == tl.bfloat16 else torch.float32), torch.float32
    lse = (p.batch * p.seq_len, p.num_heads) if consts["NT"] > 1 else (1,)  # read only by a slot-tiled backward
    return [((chunks, hkv, bm, bdk), st), ((chunks, hkv, bm, bdv), st), ((chunks, hkv, bm), f32),
            ((chunks, hkv, bm), f32), ((items, hkv, bm, bdk), st), ((items, hkv, bm, bdv), st), ((items, hkv, bm), f32),
            (lse, f32)]  # fmt: skip


INT32_ELEMENTS = 2**31  # the kernels address every tensor with int32 element offsets: 0 .. 2^31 - 1


def rows_per_call(problem: Problem, dtype: torch.dtype) -> int | None:
    """How many batch rows one launch of the kernels can take: None (all of them) unless some
    tensor would pass their int32 offsets (2^31 elements), then the most that fit (``bla_attention``
    runs the batch in pieces of that many rows: each row is its own sequence). Packed documents
    (cu_seqlens) are one row and are not split here; a row too large on its own is refused by the
    plan, by name. Symbolic shapes (a compiler's trace) are not split: no comparison guards them."""
    p = problem
    if p.cu_seqlens is not None or not all(isinstance(x, int) for x in (p.batch, p.seq_len)):
        return None
    bm, bd = _slot_block(p.slots), _pow2(max(p.head_dim_k, p.head_dim_v))
    parts = _slot_tiles(bm) if _tile_run() == "grid" else 1  # the backward's dq, dk, dv parts
    tokens_bound = parts * p.batch * p.seq_len * max(p.num_heads, p.num_kv_heads) * bd  # q, k, v, o
    states_bound = p.batch * -(-p.seq_len // 16) * p.num_kv_heads * bm * bd  # saved states: chunks of >= 16 tokens
    if max(tokens_bound, states_bound) <= INT32_ELEMENTS:  # the common case: no plan built per call
        return None
    rows = p.batch
    while rows > 1:
        part = p.rows(0, rows)
        consts = _constants(part, dtype)
        if _oversized(part, _saved_shapes(part, consts, _segment_chunks(part, consts["C"])), _grad_parts(consts)) is None:
            break
        rows = (rows + 1) // 2
    return None if rows == p.batch else rows


def _grad_parts(consts: dict) -> int:
    """How many parts the backward's fp32 dq, dk, dv buffers have: one per slot tile when (A)'s
    tiles run as programs of their own, else one."""
    return consts["NT"] if consts["TILE_RUN"] == "grid" else 1


def _check_32_bit_offsets(p: Problem, saved: list, parts: int) -> None:
    """Refuse, by name, a tensor too large for the kernels' int32 offsets: past 2^31 elements they
    would wrap and read or write the wrong memory without any error."""
    problem = _oversized(p, saved, parts)
    if problem is not None:
        raise ValueError(problem)


def _oversized(p: Problem, saved: list, parts: int) -> str | None:
    """Why a tensor of this problem is too large for int32 offsets, or None."""
    tokens = p.batch * p.seq_len
    tensors = {"q": (tokens, p.num_heads, p.head_dim_k), "k": (tokens, p.num_kv_heads, p.head_dim_k),
               "v": (tokens, p.num_kv_heads, p.head_dim_v), "o": (tokens, p.num_heads, p.head_dim_v),
               "the backward's fp32 dq parts": (parts, tokens, p.num_heads, p.head_dim_k),
               "the backward's fp32 dv parts": (parts, tokens, p.num_kv_heads, p.head_dim_v),
               **{f"saved buffer {i}": shape for i, (shape, _) in enumerate(saved)}}  # fmt: skip
    for name, shape in tensors.items():
        if any(not isinstance(d, int) for d in shape):  # symbolic shapes: checked again at the real call
            return None
        elements = math.prod(shape)
        if elements > INT32_ELEMENTS:
            return (f"bla_attention backend='triton': {name} would hold {elements:,} elements ({'x'.join(map(str, shape))}), "
                    f"more than the kernels' 32-bit offsets address (2^31), and one batch row (or the packed documents) "
                    f"cannot be split further; pass fewer tokens per row or document per call, or use backend='torch'")  # fmt: skip
    return None


def _knob_values() -> tuple:
    """The tuning knobs' values, read every call (a test or benchmark may set one between calls)."""
    return tuple(map(_env, _KNOBS))


def _plan(problem: Problem, dtype: torch.dtype) -> _Plan:
    p = problem
    key = (p.batch, p.seq_len, p.num_heads, p.num_kv_heads, p.head_dim_k, p.head_dim_v, p.slots, p.windows, p.gates,
           p.num_seqs, p.cu_seqlens is None, dtype, _knob_values())  # fmt: skip
    if any(isinstance(x, torch.SymInt) for x in key):  # symbolic shapes (a compiler's fake run): not cached
        return _Plan(p, dtype)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 256:
            _PLANS.clear()
        plan = _PLANS[key] = _Plan(p, dtype)
    return plan


def saved_rows(problem: Problem, chunk: int, seg_chunks: int) -> tuple[int, int]:
    """Rows of the per-chunk and per-segment buffers the forward keeps for the backward: exact
    for equal-length rows, an upper bound with ``cu_seqlens`` (the documents' lengths live on the
    device; the shapes must not depend on them, so that a compiled graph knows them)."""
    p = problem
    if p.cu_seqlens is None:
        per_row = -(-p.seq_len // chunk)
        return p.batch * per_row, p.batch * max(1, -(-per_row // seg_chunks))
    tokens, n = p.batch * p.seq_len, p.num_seqs
    chunks = tokens // chunk + n  # a document adds at most one partial chunk
    return chunks, -(-chunks // seg_chunks) + n


def saved_layout(problem: Problem, dtype: torch.dtype) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Shapes and dtypes of ``forward``'s saved buffers: ck, cv, before, chunk_dec, seg_k, seg_v, seg_dec, lse."""
    return _plan(problem, dtype).saved


def forward(q, k, v, h0k, h0v, problem: Problem):
    """o, the final state (hk, hv; fp32, contiguous) and the 8 buffers the backward reads."""
    p = problem
    dev = q.device
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    plan = _plan(p, q.dtype)
    consts, seg_chunks = plan.consts, plan.seg_chunks
    C, BM, BDK, BDV, HKV = consts["C"], consts["BM"], consts["BDK"], consts["BDV"], p.num_kv_heads
    lay = _layout(p, dev, C, seg_chunks)
    offsets = p.offset.to(device=dev, dtype=torch.int32)
    gs, gl, toff, cum, cen, end = plan.tables(p, dev)
    common = (gs, gl, lay.starts, lay.lengths, offsets, lay.windows, toff)

    # (1) each segment's own end state and decay, and each chunk's start state from the
    # segment's zero start (stored in the matrix products' operand dtype: (3) and the backward
    # read them as operands); (2) the scan turns the segments' end states into start states
    layout = plan.saved
    new = torch.empty if p.cu_seqlens is None else torch.zeros  # rows past the documents' chunks stay defined
    ck, cv, before, chunk_dec = (new(shape, device=dev, dtype=dtype) for shape, dtype in layout[:4])
    # the segments' end states from (1), in fp32 for the scan
    seg_k, seg_v, seg_dec = (new(shape, device=dev, dtype=torch.float32) for shape, _ in layout[4:7])
    items, chunks = lay.total_items, lay.total_chunks
    _launch(_fwd_local_kernel, (items, HKV),
            (k, v, seg_k, seg_v, seg_dec, ck, cv, before, chunk_dec, cum, end, *common[:5], lay.chunk_base, *common[5:],
             lay.item_seq, lay.item_chunk), plan.fwd_local)  # fmt: skip
    # what later steps write is allocated while (1) runs: less host time before the GPU's first kernel.
    # The segments' start states, from the scan, in the operands' dtype; each query's log-sum-exp over
    # slots (every row written), else a defined one-element placeholder
    start_k, start_v = (new(shape, device=dev, dtype=dtype) for shape, dtype in layout[4:6])
    lse = (new if consts["NT"] > 1 else torch.zeros)(layout[7][0], device=dev, dtype=torch.float32)
    use_h0 = h0k is not None
    h0k_p = _padded_state(h0k, p.num_seqs, HKV, BM, BDK, dev) if use_h0 else None
    h0v_p = _padded_state(h0v, p.num_seqs, HKV, BM, BDV, dev) if use_h0 else None
    hk, hv = _segment_scan(seg_k, seg_v, seg_dec, h0k_p, h0v_p, lay, plan, reverse=False, out=(start_k, start_v))

    # (3) outputs, every chunk in parallel from its start state
    o = torch.empty(q.shape[:-1] + (p.head_dim_v,), device=dev, dtype=q.dtype)
    if chunks:
        _launch(_fwd_out_kernel, (chunks, HKV),
                (q, k, v, o, lse, ck, cv, before, start_k, start_v, cum, cen, *common, lay.chunk_seq, lay.chunk_idx,
                 lay.chunk_item, p.scale), plan.fwd_out)  # fmt: skip
    hk = hk[:, :, : p.slots, : p.head_dim_k].contiguous()
    hv = hv[:, :, : p.slots, : p.head_dim_v].contiguous()
    return o, hk, hv, (ck, cv, before, chunk_dec, start_k, start_v, seg_dec, lse)


def backward(do, dhk, dhv, q, k, v, o, saved, problem: Problem, use_h0: bool):
    """dq, dk, dv (in the inputs' dtypes) and the initial state's gradients (None without one).
    ``o`` is the forward's output (read by a slot-tiled backward only)."""
    ck, cv, before, chunk_dec, seg_start_k, seg_start_v, seg_dec, lse = saved
    p = problem
    dev = q.device
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    plan = _plan(p, q.dtype)
    consts = plan.consts
    lay = _layout(p, dev, consts["C"], plan.seg_chunks)
    offsets = p.offset.to(device=dev, dtype=torch.int32)
    BM, BDK, BDV, HKV = consts["BM"], consts["BDK"], consts["BDV"], p.num_kv_heads
    gs, gl, toff, cum, cen, end = plan.tables(p, dev)
    parts = _grad_parts(consts)  # (A)'s tiles as programs leave dq, dk, dv in parts, (C) sums them
    dq = torch.empty_like(q)
    dq32 = torch.empty((parts, *q.shape), device=dev, dtype=torch.float32) if consts["NT"] > 1 else dq  # slot tiles' dq
    dk = torch.empty((parts, *k.shape), device=dev, dtype=torch.float32)
    dv = torch.empty((parts, *v.shape), device=dev, dtype=torch.float32)
    part_sizes = (q.numel(), k.numel(), v.numel())  # elements between two parts
    # each chunk's own share of its start-state gradient, then (after the scan) the gradient of
    # its end state from later chunks of its segment; in the operands' dtype, as (C) reads them
    dks = torch.empty_like(ck)
    dvs = torch.empty_like(cv)
    common = (gs, gl, lay.starts, lay.lengths, offsets, lay.windows, toff, lay.chunk_seq, lay.chunk_idx)
    grid = (lay.total_chunks, HKV)
    if lay.total_chunks:
        args = (q, k, v, do.contiguous(), o.contiguous(), lse, dq, dq32, dk, dv, ck, cv, before, seg_start_k, seg_start_v,
                dks, dvs, cum, cen, *common, lay.chunk_item, p.scale, *part_sizes)  # fmt: skip
        for tile_consts in plan.bwd_chunk:  # one launch, or one per slot tile, in order
            _launch(_bwd_chunk_kernel, (*grid, parts), args, tile_consts)
    # the final state's gradients (None when it was not used: the scan then starts from zeros)
    dhk_p = dhv_p = None
    if dhk is not None or dhv is not None:
        dhk_p = _padded_state(None if dhk is None else dhk.float(), p.num_seqs, HKV, BM, BDK, dev)
        dhv_p = _padded_state(None if dhv is None else dhv.float(), p.num_seqs, HKV, BM, BDV, dev)
    # (B) two short scans instead of one over every chunk of a sequence (latency-bound): the
    # chunks of each forward segment from a zero carry, then the segments (by the forward's decays)
    seg_k, seg_v, after = _scan(dks, dvs, chunk_dec, None, None, lay.item_chunk_first, lay.item_chunk_count,
                                plan.scan_rows, reverse=True, decays=True)  # fmt: skip
    dh0k, dh0v = _segment_scan(seg_k, seg_v, seg_dec, dhk_p, dhv_p, lay, plan, reverse=True)
    if lay.total_chunks:
        dk_out = dk[0] if k.dtype == torch.float32 and parts == 1 else torch.empty_like(k)
        dv_out = dv[0] if v.dtype == torch.float32 and parts == 1 else torch.empty_like(v)
        _launch(_bwd_tokens_kernel, grid,
                (dk, dv, dk_out, dv_out, dq32, dq, dks, dvs, seg_k, seg_v, after, lay.chunk_item, cum, end, gs, gl, lay.starts,
                 lay.lengths, offsets, lay.windows, toff, lay.chunk_seq, lay.chunk_idx, *part_sizes), plan.bwd_tokens)  # fmt: skip
    else:
        dk_out, dv_out = dk[0].to(k.dtype), dv[0].to(v.dtype)  # no tokens: empty tensors
    if not use_h0:
        return dq, dk_out, dv_out, None, None
    return dq, dk_out, dv_out, dh0k[:, :, : p.slots, : p.head_dim_k].contiguous(), dh0v[:, :, : p.slots, : p.head_dim_v].contiguous()


def step(q, k, v, sk, sv, problem: Problem) -> torch.Tensor:
    """One decode step: o [B, H, d_v]; the fp32 state (sk, sv; contiguous) is updated in place."""
    p = problem
    o = torch.empty(p.batch, p.num_heads, p.head_dim_v, device=q.device, dtype=q.dtype)
    gs, gl, toff = gate_tables(p, q.device)
    consts = _pick(_plan(p, q.dtype).consts, "H", "HKV", "M", "BM", "DK", "BDK", "DV", "BDV")
    _bla_step_kernel[(p.batch, p.num_kv_heads)](
        q.contiguous(), k.contiguous(), v.contiguous(), o, sk, sv, p.offset.to(torch.int32).contiguous(),
        _windows_on(p.windows, str(q.device)), toff, gs, gl, p.scale, **consts, FLOOR=LOG_FLOOR,
    )  # fmt: skip
    return o


@functools.lru_cache(maxsize=64)
def _windows_on(windows: tuple[int, ...], device: str) -> torch.Tensor:
    """int32 windows per kv head on ``device``, made once: a decode step copies nothing from the
    host (a captured CUDA graph may not)."""
    return torch.tensor(windows, dtype=torch.int32, device=device)
