"""What a call's shapes, (windows, m, gates) and dtype decide, worked out once (``Plan``): the
kernels' constants, sub-chunking, launch options and saved buffers' shapes; and how a kernel is
launched (``launch``: Triton's JIT at the first call, the compiled kernel directly after)."""

from __future__ import annotations

import math
import os

import torch

try:  # a guarded import: exported models (bla export) run without Triton, on the torch backend
    import triton.language as tl
except ImportError as exc:
    raise ImportError(f"the Triton BLA kernels need triton: {exc}") from exc

from . import triton_tuning as tuning
from .checks import Problem
from .triton_tables import cum_table_fits, gate_tables, phase_tables, sub_chunking

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # read once, at import (Triton reads it then too)


# Matmul operands for half inputs: bf16 for fp16 too, since the factorised pair decays reach
# e^80, far beyond fp16's 65504, while bf16 has fp32's exponent range.
_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.bfloat16}


def constants(problem: Problem, dtype: torch.dtype) -> dict:
    p = problem
    sub, pairs = sub_chunking(p)
    # a chunk (the unit of parallel work and of stored states) is one sub-chunk: no state is
    # updated inside (3) or recomputed inside (A). The knob chunk=64 keeps 64-token chunks of
    # smaller sub-chunks (half the stored states; measured slower: benchmarks/reports/2026-11-to-12.md)
    chunk = max(sub, tuning.knob("chunk", sub))
    bm = tuning.slot_block(p.slots)
    tiles = tuning.slot_tiles(bm)
    return dict(
        H=p.num_heads, HKV=p.num_kv_heads, M=p.slots, BM=bm,
        DK=p.head_dim_k, BDK=tuning.pow2_at_least_16(p.head_dim_k), DV=p.head_dim_v, BDV=tuning.pow2_at_least_16(p.head_dim_v),
        C=chunk, S=sub, NS=chunk // sub, PAIRS=pairs, CUM=cum_table_fits(p, sub),
        # the chunk's and segment's states used apart (2 products each): measured faster up to 64
        # slots; above, their registers spill and one summed state is faster (benchmarks/reports/2026-11-to-12.md)
        SPLIT=tuning.split_states(bm),
        NT=tiles,
        TILE_RUN=tuning.tile_run() if tiles > 1 else "program",
        DT=tl.float32 if INTERPRETING else _DOT_DTYPES.get(dtype, tl.float32),
    )  # fmt: skip


def _pick(consts: dict, *names: str) -> dict:
    return {k: consts[k] for k in names}


def segment_chunks(problem: Problem, chunk: int) -> int:
    """Chunks per forward segment (the tuning table's rule, from the call's programs)."""
    p = problem
    return tuning.segment_chunks(p.num_kv_heads, p.num_seqs, p.batch * p.seq_len, chunk)


class Launcher:
    """One kernel at one set of constants. The first call goes through Triton's JIT (which
    compiles, or finds the kernel compiled for these arguments' specialisation: their dtypes and
    whether each pointer is 16-byte aligned); later calls whose arguments specialise the same
    way (every pointer aligned, the same dtypes and scalars, the same device) launch the compiled
    kernel directly. Triton's per-call binding and cache lookup were 0.45 ms of the host's 1.51 ms
    per eager forward+backward (seven launches) on an H200 (benchmarks/reports/2026-11-to-12.md, "Per-phase tables
    and direct launches"). The knob launch=jit takes Triton's path every call."""

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


def launch(kernel, grid, args: tuple, consts: dict) -> None:
    """Launch ``kernel`` over ``grid`` through its launcher at these constants (made once)."""
    key = (kernel, tuple(consts.items()))
    launcher = _LAUNCHERS.get(key)
    if launcher is None:
        if len(_LAUNCHERS) > 512:
            _LAUNCHERS.clear()
        launcher = _LAUNCHERS[key] = Launcher(kernel, consts)
    launcher(grid, args, direct=tuning.direct_launches())


_LOCAL = ("HKV", "BM", "DK", "BDK", "DV", "BDV", "C", "S", "NS", "DT")
PLANS: dict = {}


class Plan:
    """Everything about a call that its shapes, (windows, m, gates) and dtype decide, worked out
    once: a training step calls each layer's kernels with the same plan. Building it per call
    (sub-chunk choice, launch options, keyword dicts) was host time: caching it took the 350m
    BLA model from 105,189 to 133,306 tokens/s on an H200 (benchmarks/reports/2026-11-to-12.md)."""

    def __init__(self, problem: Problem, dtype: torch.dtype):
        p = problem
        self.consts = consts = constants(p, dtype)
        self.seg_chunks = segment_chunks(p, consts["C"])
        self.scan_rows = tuning.scan_rows(consts["BM"])
        self.scan_group = tuning.scan_group()
        opts = {kernel: tuning.launch_options(p.slots, consts["BM"], kernel) for kernel in tuning.KERNELS}
        factor_el = {kernel: tuning.factor_el(kernel, consts["PAIRS"], consts["BM"]) for kernel in ("fwd_out", "bwd_chunk")}
        self.fwd_local = {**_pick(consts, "CUM", *_LOCAL), "SEG_CHUNKS": self.seg_chunks, **opts["fwd_local"]}
        chunked = ("H", "M", "PAIRS", "CUM", "SPLIT", "NT", *_LOCAL)  # the constants of (3) and (A)
        self.fwd_out = {**_pick(consts, *chunked), "FACTOR_EL": factor_el["fwd_out"], **opts["fwd_out"]}
        # (A)'s launches: one, or one per slot tile (each its tile's constants)
        run, tiles = consts["TILE_RUN"], consts["NT"]
        bwd_chunk = {**_pick(consts, *chunked), "TILE_GRID": run == "grid", "FACTOR_EL": factor_el["bwd_chunk"],
                     **opts["bwd_chunk"]}  # fmt: skip
        self.bwd_chunk = ([{**bwd_chunk, "TILE0": t, "TILES": 1} for t in range(tiles)] if run == "launches"
                          else [{**bwd_chunk, "TILE0": 0, "TILES": 1 if run == "grid" else tiles}])  # fmt: skip
        self.bwd_tokens = {**_pick(consts, "H", "CUM", *_LOCAL), "PARTS": grad_parts(consts), **opts["bwd_tokens"]}
        self.saved = _saved_shapes(p, consts, self.seg_chunks)
        _check_32_bit_offsets(p, self.saved, grad_parts(consts))
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
    bm, bd = tuning.slot_block(p.slots), tuning.pow2_at_least_16(max(p.head_dim_k, p.head_dim_v))
    parts = tuning.slot_tiles(bm) if tuning.tile_run() == "grid" else 1  # the backward's dq, dk, dv parts
    tokens_bound = parts * p.batch * p.seq_len * max(p.num_heads, p.num_kv_heads) * bd  # q, k, v, o
    states_bound = p.batch * -(-p.seq_len // 16) * p.num_kv_heads * bm * bd  # saved states: chunks of >= 16 tokens
    if max(tokens_bound, states_bound) <= INT32_ELEMENTS:  # the common case: no plan built per call
        return None
    rows = p.batch
    while rows > 1:
        part = p.rows(0, rows)
        consts = constants(part, dtype)
        if _oversized(part, _saved_shapes(part, consts, segment_chunks(part, consts["C"])), grad_parts(consts)) is None:
            break
        rows = (rows + 1) // 2
    return None if rows == p.batch else rows


def grad_parts(consts: dict) -> int:
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


def plan(problem: Problem, dtype: torch.dtype) -> Plan:
    p = problem
    key = (p.batch, p.seq_len, p.num_heads, p.num_kv_heads, p.head_dim_k, p.head_dim_v, p.slots, p.windows, p.gates,
           p.shifts, p.num_seqs, p.cu_seqlens is None, dtype, tuning.key())  # fmt: skip
    if any(isinstance(x, torch.SymInt) for x in key):  # symbolic shapes (a compiler's fake run): not cached
        return Plan(p, dtype)
    found = PLANS.get(key)
    if found is None:
        if len(PLANS) > 256:
            PLANS.clear()
        found = PLANS[key] = Plan(p, dtype)
    return found


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
    return plan(problem, dtype).saved
