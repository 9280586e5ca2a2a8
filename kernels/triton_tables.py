"""The Triton kernels' host-side tables: what depends on positions alone, built once per (W, m, gates).

Tables are built per phase key ``(W, shift)`` of each kv head: a head whose slots are shifted
(spec section 6, staggered heads) reads its own rows, the unshifted table rolled by its shift,
and every kernel stays as it is (they read a head's rows from its table offset ``toff``).

The gates depend only on positions, so they come from a table built once per (W, m, gates): the
write ``s`` and the log-decay ``log alpha`` of every phase of the period (floored at ``LOG_FLOOR``
where alpha = 0: products across a reset are then below 2e-9, 30x under fp32's rounding, zero in
every output). Kernels gather their rows by phase; no gate tensor per token exists. What the
chunked kernels would otherwise compute per program comes from per-phase tables built once per
(W, m, gates, S) in float64: each sub-chunk's cumulative log-decay ([S, m] a phase), the centres
its pairs are factorised on ([4, m]), and each token's weight in the state after it ([S, m], in
the operands' dtype). ``sub_chunking`` picks the sub-chunk size and pair form from the decays'
spread. The reference these tables are checked against is a direct float64 walk over each
sub-chunk's gates (tests/test_triton.py, ``test_phase_tables_hold_what_the_kernels_would_compute``).
"""

from __future__ import annotations

import functools

import torch

try:  # a guarded import: exported models (bla export) run without Triton, on the torch backend
    import triton.language as tl
except ImportError as exc:
    raise ImportError(f"the Triton BLA kernels need triton: {exc}") from exc

from . import triton_tuning as tuning
from .checks import Problem
from .device_cache import device_cache
from .gates import dirichlet_gates
from .triton_tuning import CENTRED, ELEMENTWISE, HALVES  # noqa: F401  (the pair forms, named here too)

# log alpha where alpha = 0 (a reset): e^-20 ~ 2e-9, 30x under fp32's rounding (2^-24 ~ 6e-8), so
# products across a reset vanish in every sum. No deeper: the floor adds to the decays' spread inside
# a sub-chunk, and at -20 the stride W/m = 64 (W=4096, m=64) fits one centre over 64 tokens (a
# spread of 156 against FACTOR_LOG_RANGE's 160; 166 at -30, which took the halves form's extra
# products: benchmarks/reports/2026-11-to-12.md, "A shallower reset floor").
LOG_FLOOR = -20.0


Keys = tuple[tuple[int, int], ...]  # (W, phase shift) per kv head


def phase_keys(problem: Problem) -> Keys:
    """Each kv head's (window, slot phase shift): what its gate rows depend on."""
    shifts = problem.shifts or (0,) * len(problem.windows)
    return tuple(zip(problem.windows, shifts))


@functools.lru_cache(maxsize=32)
def _gate_table_cpu(keys: Keys, slots: int, gates: str, bm: int):
    """(s, log alpha) float32 [sum of distinct W, bm] and the first row of each kv head's table."""
    rows, starts, first = [], {}, 0
    for w, shift in sorted(set(keys)):
        s, alpha, reset = dirichlet_gates(torch.arange(w), torch.tensor([w]), slots, gates=gates,
                                          shift=torch.tensor([shift]) if shift else None)  # fmt: skip
        la = torch.where(reset, torch.full_like(alpha, LOG_FLOOR), torch.log(alpha.clamp_min(1e-300))).clamp_min(LOG_FLOOR)
        tab = torch.zeros(2, w, bm, dtype=torch.float64)  # padded slots: s = 0, log alpha = 0
        tab[0, :, :slots], tab[1, :, :slots] = s[:, 0], la[:, 0]
        rows.append(tab)
        starts[w, shift] = first
        first += w
    table = torch.cat(rows, dim=1).float()
    return table[0].contiguous(), table[1].contiguous(), [starts[key] for key in keys]


# The factorised pairs stay within e^(+-80): fp32 and bf16 hold e^88. The sums over a sub-chunk
# that carry them keep some margin for large q . k: at a spread of 156 (W/m = 64) finite to
# |q . k| ~ 1.5e5, where 166 gave NaN from ~2e3 on (benchmarks/lab/headroom.py).
FACTOR_LOG_RANGE = 160.0


def _phase_cumsums(key: tuple[int, int], slots: int, gates: str, sub: int) -> torch.Tensor:
    """float64 [W, sub, BM]: the cumulative log-decay l (resets at LOG_FLOOR) of a sub-chunk of
    ``sub`` tokens starting at each phase of the period (of phase key ``key`` = (W, shift))."""
    w = key[0]
    _, la, _ = _gate_table_cpu((key,), slots, gates, tuning.slot_block(slots))
    la = la[torch.arange(w + sub) % w].double()  # [W + sub, BM]
    cum = torch.cat([torch.zeros(1, la.shape[1], dtype=la.dtype), la.cumsum(0)])
    return (cum[1:].unfold(0, sub, 1)[:w] - cum[:w, :, None]).transpose(1, 2)


@functools.lru_cache(maxsize=64)
def diag_log_range(windows: tuple[int, ...], slots: int, gates: str, sub: int) -> float:
    """Largest spread of the cumulative log-decay inside any sub-chunk of ``sub`` tokens, over
    every phase, slot and window: whether its pairs can be factorised (a phase shift only rolls
    the phases, so the unshifted window answers for every shift)."""
    worst = 0.0
    for w in set(windows):
        win = _phase_cumsums((w, 0), slots, gates, sub)
        worst = max(worst, float((win.amax(1) - win.amin(1)).max()))
    return worst


def cum_table_fits(problem: Problem, sub: int) -> bool:
    """Whether the kernels read the per-phase table (at most the tuning table's limit; ``cum_mb=0``
    sums the log-decays in every kernel, the schedule the table replaced, to time it)."""
    rows = sum(w for w, _ in set(phase_keys(problem)))
    return rows * sub * tuning.slot_block(problem.slots) * 4 <= tuning.cum_table_limit()


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


@device_cache(maxsize=16)
def cum_table_on(keys: Keys, slots: int, gates: str, sub: int, device: str, bm: int):
    """float32 [sum of distinct W, sub, BM] and its centres [sum of distinct W, 4, BM], rows in the
    order of the gate table's (``bm`` keys the cache: the tables' width follows the slot block)."""
    rows = [_phase_cumsums(key, slots, gates, sub) for key in sorted(set(keys))]
    centres = torch.cat([_phase_centres(win) for win in rows])
    return torch.cat(rows).float().contiguous().to(device), centres.float().contiguous().to(device)


def cum_table(problem: Problem, sub: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The cumulative log-decay of a sub-chunk starting at every phase (what the kernels would
    otherwise sum per program: 29% of (3)'s time at W=512 on an H100), and the centres its pairs
    are factorised on (what (3) and (A) would otherwise reduce over the sub-chunk's tokens), built
    once per (windows, m, gates, S, device)."""
    return cum_table_on(phase_keys(problem), problem.slots, problem.gates, sub, str(device), tuning.slot_block(problem.slots))


@device_cache(maxsize=16)
def end_table_on(keys: Keys, slots: int, gates: str, sub: int, device: str, bm: int, dtype: torch.dtype):
    """[sum of distinct W, sub, BM] in the products' operand dtype: each token's weight s_t e^{T - l_t}
    in the state after a whole sub-chunk starting at every phase (the matrix (1) writes states with
    and (C) reads their gradients through), rows in the order of the gate table's."""
    tables = []
    for key in sorted(set(keys)):
        w = key[0]
        s_tab, la_tab, _ = _gate_table_cpu((key,), slots, gates, bm)
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
    end = end_table_on(phase_keys(problem), problem.slots, problem.gates, consts["S"], str(device), consts["BM"], dtype)
    return cum, centres, end


def sub_chunking(problem: Problem) -> tuple[int, int]:
    """(sub-chunk size, pair form): the largest sub-chunk (64, 32 or 16 tokens; 128 too with the
    tuning knob sub=128, measured slower; at most 8192 slot-token entries per tile, for registers) whose pairs are
    tensor-core products: CENTRED when the decays' range inside the sub-chunk is below
    FACTOR_LOG_RANGE, else HALVES when the range inside each of its halves is (W/m of a few
    hundred: 64 tokens at W=4096, m=64, instead of 32); else 16 tokens, ELEMENTWISE (W/m of
    about a thousand). The knob pairs=elementwise, halves or centred forces that form where it is
    safe (tests, benchmarks)."""
    p = problem
    largest, forced = tuning.knob("sub", tuning.SUB), tuning.knob("pairs", "")
    # the halves form clamps its cross factors at the boundary, exact only where log-decays never
    # rise (v2 rules); v1's can (alpha up to 1.22), so v1 takes smaller sub-chunks instead
    halves_exact = p.gates != "dirichlet_v1"
    if forced != "elementwise":
        for sub in (s for s in (128, 64, 32, 16) if s <= largest and s * tuning.slot_block(p.slots) <= 8192):
            if forced != "halves" and diag_log_range(p.windows, p.slots, p.gates, sub) < FACTOR_LOG_RANGE:
                return sub, CENTRED
            if forced != "centred" and halves_exact and sub >= 32 and diag_log_range(p.windows, p.slots, p.gates, sub // 2) < FACTOR_LOG_RANGE:
                return sub, HALVES
    return 16, ELEMENTWISE


@device_cache(maxsize=32)
def _gate_table_on(keys: Keys, slots: int, gates: str, device: str, bm: int):
    s, la, starts = _gate_table_cpu(keys, slots, gates, bm)
    return s.to(device), la.to(device), torch.tensor(starts, dtype=torch.int32, device=device)


def gate_tables(problem: Problem, device: torch.device):
    """The gate tables of a problem on ``device``, built once per (phase keys, m, gates, device,
    slot block: the slot_block knob changes the tables' row width)."""
    return _gate_table_on(phase_keys(problem), problem.slots, problem.gates, str(device), tuning.slot_block(problem.slots))

