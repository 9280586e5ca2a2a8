"""The Triton kernels' tuning table: every default in one place, and one override for experiments.

The kernels tune themselves from the problem; no setting is needed to run them well. The rules
below were measured on Hopper (H100 and H200; the only GPU family timed so far, and the one every
GPU uses until another is measured). Each names what decides it and where it was measured:

    what                        decided by                      default (rule)
    sub-chunk, pair form        W/m (the decays' spread)         largest of 64/32/16 tokens whose pairs factorise
                                                                 (CENTRED, else HALVES, else 16-token ELEMENTWISE)
    slot block                  m                                m padded to a power of two >= 64 (SLOT_BLOCK_FLOOR)
    backward slot tiles         slot block                       64-slot tiles at a 128-slot block (SLOT_TILE_BLOCKS)
    chunk / segment             sequences x kv heads             a chunk = one sub-chunk; SEGMENT_TOKENS a segment,
                                                                 halved below MIN_PROGRAMS programs
    segment scan                segments of the longest sequence two levels of SCAN_GROUP from SCAN_GROUP_FROM
    scan rows                   slot block                       SCAN_ROWS slot rows a program
    states kept apart (SPLIT)   slot block                       up to SPLIT_SLOTS slots
    per-phase tables            their size                       up to CUM_TABLE_BYTES
    warps, stages, registers    m, kernel                        4 warps up to 128 slots, else 8; 1 stage; MAXNREG
    e^l from A (FACTOR_EL)      kernel, pair form, slot block    on, except FACTOR_EL_OFF

**One override** for experiments and tests: the environment variable ``BLA_TRITON_TUNE``
(``sub=32,pairs=halves,warps.fwd_out=8``), or in code ``with override(sub=32, pairs="halves"):``.
Its knobs (``KNOBS``) are read through this module only; a bad name or value is a ValueError
naming it. docs/tuning.md lists them with what each was measured to do.
"""

from __future__ import annotations

import contextlib
import functools
import os

# The in-sub-chunk pair forms (the kernels' PAIRS constexpr).
ELEMENTWISE, CENTRED, HALVES = 0, 1, 2
KERNELS = ("fwd_local", "fwd_out", "bwd_chunk", "bwd_tokens")

# ---------------------------------------------------------------------------- the defaults (Hopper)

SUB = 64  # largest sub-chunk: 128 measured slower
SLOT_BLOCK_FLOOR = 64  # 16- and 32-slot tiles miscompile on Hopper's tensor cores (Triton 3.6)
SPLIT_SLOTS = 64  # a chunk's and its segment's states used apart up to this many slots (measured faster)
# Above this the kernels sum the log-decays themselves: 128 MiB holds m = 128 at W = 4096 (its
# forward+backward 2.846 -> 2.441 ms of kernels on an H200), shared by every layer of a (W, m, gates).
CUM_TABLE_BYTES = 128 << 20
SEGMENT_TOKENS = 1024  # work item of (1) and of (B)'s first level: tokens run with a state in registers
MIN_PROGRAMS = 512  # segments x kv heads below which segments shrink (about 4 per SM of an H100)
# Slot rows per scan program. Scan time per forward+backward, W = 512, H200: m = 64: 0.17 ms at
# 64 rows, 0.32 at 32, 0.42 at 16; m = 256: 0.81 ms at 64, 1.66 at 32, 6.88 in one program.
SCAN_ROWS = 64
# The two-level segment scan: runs of SCAN_GROUP, used from SCAN_GROUP_FROM segments (B=1,
# T=128k: 6.08 / 7.32 ms against 6.96 / 8.20 in one level at W = 512 / 4096; at 32 segments its
# extra host work made the call slower).
SCAN_GROUP, SCAN_GROUP_FROM = 8, 64
# The backward's slot tiles: at 128-slot blocks 64-slot tiles, one launch each (m = 128 W = 512:
# 3.947 -> 3.436 ms; 256 slots in four tiles were slower, so they stay in one).
SLOT_TILE, SLOT_TILE_BLOCKS = 64, (128,)
TILE_RUNS = ("launches", "grid", "program")  # launches measured fastest (2.516 / 2.576 / 2.950 ms, m = 128)
# Register caps measured faster, by (kernel, slot block): (C) 0.190 -> 0.173 ms at 168 (m = 64).
MAXNREG = {("bwd_tokens", 64): 168}
# Where e^l keeps a tile of its own instead of A e^mid: (3) at centred 64-slot blocks (0.268
# against 0.295 ms there; slower everywhere else).
FACTOR_EL_OFF = {("fwd_out", CENTRED, 64)}


def default_warps(slots: int) -> int:
    """4 warps up to 128 slots (faster than 8 at every sub-chunk size; m = 128: 4.01 against 4.82
    ms of kernels per forward+backward on an H200), 8 above."""
    return 4 if slots <= 128 else 8


# ---------------------------------------------------------------------------- the override


def _pow2(n: int) -> bool:
    return n >= 1 and not n & (n - 1)


def _one_of(*allowed):
    def check(value):
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(map(str, allowed))}")
        return value

    return check


def _int(test, what: str):
    def check(value):
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"must be {what}") from None
        if isinstance(value, bool) or not test(number):
            raise ValueError(f"must be {what}")
        return number

    return check


# name -> (checker, what it does). Per-kernel knobs take ``name.kernel`` too (kernels: KERNELS).
KNOBS = {
    "sub": (_int(lambda n: n in (16, 32, 64, 128), "16, 32, 64 or 128"), "largest sub-chunk (tokens)"),
    "pairs": (_one_of("elementwise", "halves", "centred"), "force a pair form where it is safe"),
    "chunk": (_int(_pow2, "a power of two (tokens)"), "chunk of several sub-chunks (measured slower)"),
    "slot_block": (_int(lambda n: n in (16, 32, 64), "16, 32 or 64"), "the slot block's floor (< 64 miscompiles on Hopper)"),
    "split_slots": (_int(lambda n: n >= 0, "a slot count >= 0"), "keep chunk and segment states apart up to this"),
    "slot_tile": (_int(lambda n: n == 0 or (n >= 16 and _pow2(n)), "0 (off) or a power of two of at least 16"),
                  "the backward's slot tile"),  # fmt: skip
    "tile_run": (_one_of(*TILE_RUNS), "how the slot tiles run"),
    "cum_mb": (_int(lambda n: n >= 0, "a whole number of MiB"), "per-phase tables' size limit (0: none)"),
    "segment": (_int(lambda n: n >= 1, "a positive token count"), "tokens per forward segment"),
    "scan_rows": (_int(_pow2, "a power of two"), "slot rows per scan program"),
    "scan_group": (_int(lambda n: n == 0 or n >= 2, "0 (one level) or at least 2 segments"), "the two-level segment scan"),
    "launch": (_one_of("direct", "jit"), "direct launches, or Triton's JIT every call"),
    "warps": (_int(lambda n: n >= 1 and _pow2(n), "a power of two"), "warps a program"),
    "stages": (_int(lambda n: n >= 1, "a positive number"), "software pipeline stages"),
    "maxnreg": (_int(lambda n: n >= 1, "a positive number"), "a cap on registers a thread"),
    "factor_el": (_int(lambda n: n in (0, 1), "0 or 1"), "e^l as A e^mid (1) or its own tile (0)"),
}
PER_KERNEL = ("warps", "stages", "maxnreg", "factor_el")
ENV = "BLA_TRITON_TUNE"


def _checked(name: str, value, source: str):
    base, _, kernel = name.partition(".")
    if base not in KNOBS or (kernel and (base not in PER_KERNEL or kernel not in KERNELS)):
        raise ValueError(f"{source}: unknown tuning knob {name!r}; knobs: {', '.join(KNOBS)} "
                         f"({', '.join(PER_KERNEL)} also per kernel: {base or 'warps'}.fwd_out, kernels {', '.join(KERNELS)})")  # fmt: skip
    try:
        return KNOBS[base][0](value)
    except ValueError as exc:
        raise ValueError(f"{source}: {name} {exc}, got {value!r}") from None


@functools.lru_cache(maxsize=16)
def _parsed(raw: str) -> dict:
    knobs = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{ENV}={raw!r}: expected name=value items separated by commas, e.g. sub=32,warps.fwd_out=8")
        knobs[name.strip()] = _checked(name.strip(), value.strip(), ENV)
    return knobs


_STACK: list[dict] = []  # override() contexts, innermost last
_ENVIRON = getattr(os.environ, "_data", None)  # POSIX: the encoded environment os.environ reads through
_ENV_KEY = os.environ.encodekey(ENV) if _ENVIRON is not None else ENV


def _raw_env() -> str:
    """The override variable, read on every call without os.environ's per-call encoding."""
    raw = _ENVIRON.get(_ENV_KEY) if _ENVIRON is not None else os.environ.get(ENV)
    return raw.decode() if isinstance(raw, bytes) else (raw or "")


def active() -> dict:
    """The knobs set now: ``BLA_TRITON_TUNE``'s, then any ``override`` contexts' over them."""
    knobs = _parsed(_raw_env())
    if _STACK:
        knobs = {**knobs, **_STACK[-1]}
    return knobs


def key() -> tuple:
    """What the active knobs are, cheaply (the kernels' plan cache keys on it): the variable's text
    and the innermost override's knobs (by value: a later context may reuse an earlier one's id)."""
    return (_raw_env(), tuple(sorted(_STACK[-1].items())) if _STACK else ())


@contextlib.contextmanager
def override(**knobs):
    """Set knobs for the calls inside (tests, benchmarks): ``override(sub=32, pairs="halves")``;
    per kernel as ``override(**{"warps.fwd_out": 8})`` or ``override(warps={"fwd_out": 8})``."""
    flat = {}
    for name, value in knobs.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{kernel}": v for kernel, v in value.items()})
        else:
            flat[name] = value
    checked = {name: _checked(name, value, "override") for name, value in flat.items() if value is not None}
    _STACK.append({**(_STACK[-1] if _STACK else {}), **checked})
    try:
        yield
    finally:
        _STACK.pop()


def knob(name: str, default=None):
    return active().get(name, default)


def kernel_knob(name: str, kernel: str, default):
    """A per-kernel knob: ``name.kernel`` if set, else ``name`` for every kernel, else ``default``."""
    knobs = active()
    return knobs.get(f"{name}.{kernel}", knobs.get(name, default))


# ---------------------------------------------------------------------------- the rules


def pow2_at_least_16(n: int) -> int:
    """The power of two at or above n, at least 16 (bit arithmetic: it runs several times a call)."""
    return max(16, 1 << (int(n) - 1).bit_length())


def slot_block(slots: int) -> int:
    """Slots padded to a power of two of at least SLOT_BLOCK_FLOOR (padded slots are masked). With
    32 slots the backward chunk kernel made out-of-range shared-memory accesses (compute-sanitizer,
    H100, 2026-11-24); with 16 the forward's outputs differed from call to call and, at d = 32,
    held NaN where new memory starts as NaN (H200, 2026-12-01, benchmarks/lab/determinism.py).
    ``slot_block=16`` brings the small tiles back (CPU tests of the slot-tiled backward)."""
    return max(pow2_at_least_16(slots), pow2_at_least_16(knob("slot_block", SLOT_BLOCK_FLOOR)))


def cum_table_limit() -> int:
    """Bytes of per-phase tables the kernels read (``cum_mb=0``: they sum in every kernel)."""
    limit = knob("cum_mb")
    return CUM_TABLE_BYTES if limit is None else limit << 20


def slot_tiles(bm: int) -> int:
    tile = knob("slot_tile")
    if tile is None:
        return bm // SLOT_TILE if bm in SLOT_TILE_BLOCKS else 1
    return 1 if tile == 0 else max(1, bm // tile)


def tile_run() -> str:
    return knob("tile_run", "launches")


def split_states(bm: int) -> bool:
    return bm <= knob("split_slots", SPLIT_SLOTS)


def factor_el(kernel: str, pairs: int, bm: int) -> bool:
    return bool(kernel_knob("factor_el", kernel, int((kernel, pairs, bm) not in FACTOR_EL_OFF)))


def launch_options(slots: int, bm: int, kernel: str) -> dict:
    opts = dict(num_warps=kernel_knob("warps", kernel, default_warps(slots)), num_stages=kernel_knob("stages", kernel, 1))
    maxnreg = kernel_knob("maxnreg", kernel, MAXNREG.get((kernel, bm)))
    return opts if maxnreg is None else dict(opts, maxnreg=maxnreg)


def scan_rows(bm: int) -> int:
    return min(knob("scan_rows", SCAN_ROWS), bm)


def scan_group() -> int | None:
    """None: the default rule (two levels of SCAN_GROUP from SCAN_GROUP_FROM segments); 0: one level."""
    return knob("scan_group")


def segment_chunks(num_kv_heads: int, num_seqs: int, tokens: int, chunk: int) -> int:
    """Chunks per segment: SEGMENT_TOKENS, halved (down to one chunk) while the call would have
    fewer than MIN_PROGRAMS segments x kv heads, so short or few sequences still fill the GPU."""
    forced = knob("segment")
    if forced is not None:
        return forced // chunk or 1
    seg = SEGMENT_TOKENS // chunk
    while seg > 1 and num_kv_heads * (num_seqs + tokens // (seg * chunk)) < MIN_PROGRAMS:
        seg //= 2
    return seg


def direct_launches() -> bool:
    return knob("launch", "direct") == "direct"
