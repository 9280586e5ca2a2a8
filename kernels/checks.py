"""Input validation shared by every BLA backend.

Each check raises ValueError naming the argument and what was expected (spec section 4), and
the result is a normalised description of the problem that the backends consume.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch

from .gates import DEFAULT_GATES, check_gates

State = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Problem:
    """Normalised shapes of one ``bla_attention`` call."""

    batch: int  # B
    seq_len: int  # T
    num_heads: int  # H (query heads)
    num_kv_heads: int  # H_kv (heads that own a slot state)
    head_dim_k: int
    head_dim_v: int
    slots: int
    windows: tuple[int, ...]  # one per kv head
    scale: float
    num_seqs: int  # N: B, or the number of documents with cu_seqlens
    cu_seqlens: torch.Tensor | None  # int64 [N + 1] on q's device
    offset: torch.Tensor  # int64 [N] on q's device
    gates: str = DEFAULT_GATES  # "dirichlet", "fejer" or "dirichlet_v1" (spec section 1)
    shifts: tuple[int, ...] | None = None  # slot phase shift per kv head (spec section 6); None: all 0

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def window_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor(self.windows, dtype=torch.int64, device=device)

    def shift_tensor(self, device: torch.device) -> torch.Tensor | None:
        return None if self.shifts is None else torch.tensor(self.shifts, dtype=torch.int64, device=device)

    def rows(self, start: int, stop: int) -> "Problem":
        """The same problem over batch rows [start, stop) (equal-length rows: each its own sequence)."""
        if self.cu_seqlens is not None:
            raise ValueError("Problem.rows: packed documents (cu_seqlens) are one batch row, not split by rows")
        n = min(stop, self.batch) - start
        return dataclasses.replace(self, batch=n, num_seqs=n, offset=self.offset[start:stop])


def normalise_shifts(phase_shift: int | Sequence[int], windows: tuple[int, ...], slots: int) -> tuple[int, ...] | None:
    """Slot phase shifts (spec section 6, staggered heads), one per kv head, each in [0, W/m);
    None when every shift is 0 (plain BLA)."""
    if isinstance(phase_shift, torch.Tensor):
        phase_shift = phase_shift.tolist()
    ints = lambda xs: all(isinstance(x, int) and not isinstance(x, bool) for x in xs)  # noqa: E731
    if ints([phase_shift]):
        shifts = (phase_shift,) * len(windows)
    elif isinstance(phase_shift, (list, tuple)) and ints(phase_shift):
        if len(phase_shift) != len(windows):
            raise ValueError(f"phase_shift must be an int or one int per kv head ({len(windows)}), got {len(phase_shift)}")
        shifts = tuple(phase_shift)
    else:
        raise ValueError(f"phase_shift must be an int or a list of ints per kv head, got {phase_shift!r}")
    for h, (shift, W) in enumerate(zip(shifts, windows)):
        if not 0 <= shift < W // slots:
            raise ValueError(f"phase_shift of kv head {h} must lie in [0, W/m = {W // slots}), got {shift}")
    return shifts if any(shifts) else None


def check_gate_inputs(beta, log_gamma, shape: tuple[int, ...], device: torch.device, gates: str, validate_values: bool) -> bool:
    """The data-dependent gates of spec section 6: beta (selective write) and log_gamma (scalar
    forgetting), each [B, T, H_kv] ([B, H_kv] for a step) on q's device; with ``validate_values``
    their values too (beta in [0, 1], log_gamma finite and <= 0: a host synchronisation).
    Returns whether either is given (the Triton kernels take neither)."""
    names = "[B, H_kv]" if len(shape) == 2 else "[B, T, H_kv]"
    for name, x in (("beta", beta), ("log_gamma", log_gamma)):
        if x is None:
            continue
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor {names} = {list(shape)}, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name} must have shape {names} = {list(shape)}, got {list(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} must be on q's device {device}, got {x.device}")
    if beta is not None and gates == "dirichlet_v1":
        raise ValueError("beta (the selective write) is defined for the v2 gates 'dirichlet' and 'fejer', not 'dirichlet_v1'")
    if validate_values:
        if beta is not None and not bool(((beta >= 0) & (beta <= 1)).all()):
            raise ValueError("beta must lie in [0, 1] (the strength of each write)")
        if log_gamma is not None and not bool((torch.isfinite(log_gamma) & (log_gamma <= 0)).all()):
            raise ValueError("log_gamma must be finite and <= 0 (the log of a forgetting factor in (0, 1])")
    return beta is not None or log_gamma is not None


def normalise_windows(window: int | Sequence[int], slots: int, num_heads: int, num_kv_heads: int) -> tuple[int, ...]:
    """One window per kv head; ``window`` may be an int, or a list per query head or per kv head."""
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"slots must be a positive int, got {slots!r}")
    if isinstance(window, torch.Tensor):
        window = window.tolist()
    if isinstance(window, int) and not isinstance(window, bool):
        per_head = [window] * num_kv_heads
    elif isinstance(window, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in window):
        if len(window) == num_kv_heads:
            per_head = list(window)
        elif len(window) == num_heads:
            group = num_heads // num_kv_heads
            per_head = []
            for g in range(num_kv_heads):
                ws = set(window[g * group : (g + 1) * group])
                if len(ws) != 1:
                    raise ValueError(
                        f"window: query heads {g * group}..{(g + 1) * group - 1} share kv head {g} and so "
                        f"must share its window, got {sorted(ws)}"
                    )
                per_head.append(ws.pop())
        else:
            raise ValueError(
                f"window: expected an int or a list of {num_heads} (query heads) or {num_kv_heads} (kv heads) "
                f"ints, got a list of {len(window)}"
            )
    else:
        raise ValueError(f"window must be an int or a list of ints, got {window!r}")
    for w in per_head:
        if w < slots or w % slots != 0:
            raise ValueError(f"window: slots={slots} must divide every window and be at most it, got window {w}")
    return tuple(per_head)


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: bool) -> None:
    names = {"q": q, "k": k, "v": v}
    ndim = 3 if step else 4
    layout = "[B, H, d]" if step else "[B, T, H, d]"
    for name, x in names.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
        if x.dim() != ndim:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    lead = q.shape[: ndim - 2]
    if k.shape[: ndim - 2] != lead or v.shape[: ndim - 2] != lead:
        raise ValueError(
            f"q, k, v must agree on {'B' if step else 'B, T'}: got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of heads, got {k.shape[-2]} and {v.shape[-2]}")
    if q.shape[-2] % k.shape[-2] != 0:
        raise ValueError(f"q heads ({q.shape[-2]}) must be a multiple of k/v heads ({k.shape[-2]}) for GQA")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share d_k, got {q.shape[-1]} and {k.shape[-1]}")


def check_state(state: State, num_seqs: int, num_kv_heads: int, slots: int, dk: int, dv: int, name: str) -> None:
    if not (isinstance(state, (tuple, list)) and len(state) == 2 and all(isinstance(s, torch.Tensor) for s in state)):
        raise ValueError(f"{name} must be a pair of tensors (K, V), got {type(state).__name__}")
    sk, sv = state
    want_k, want_v = (num_seqs, num_kv_heads, slots, dk), (num_seqs, num_kv_heads, slots, dv)
    if tuple(sk.shape) != want_k or tuple(sv.shape) != want_v:
        raise ValueError(
            f"{name} must be (K {list(want_k)}, V {list(want_v)}) = [N, H_kv, m, d], "
            f"got K {list(sk.shape)}, V {list(sv.shape)}"
        )
    if not (sk.is_floating_point() and sv.is_floating_point()):
        raise ValueError(f"{name} must be floating point, got {sk.dtype}, {sv.dtype}")


def check_problem(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | Sequence[int],
    slots: int,
    scale: float | None,
    initial_state: State | None,
    cu_seqlens: torch.Tensor | None,
    offset: int | torch.Tensor,
    gates: str = DEFAULT_GATES,
    validate_values: bool = True,
    phase_shift: int | Sequence[int] = 0,
) -> Problem:
    """Shapes, dtypes and devices always (no device access); with ``validate_values`` also the
    values of ``cu_seqlens`` and a tensor ``offset``, which reads them back from the device (a
    host synchronisation on a GPU). Callers that made those values themselves (the model's
    layers: the packer's boundaries, offsets from positions) pass False."""
    check_gates(gates)
    _check_qkv(q, k, v, step=False)
    B, T, H, dk = q.shape
    Hkv, dv = v.shape[2], v.shape[3]
    windows = normalise_windows(window, slots, H, Hkv)

    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be a 1-D integer tensor [N + 1] of document starts")
        if B != 1:
            raise ValueError(f"cu_seqlens needs the documents packed into batch 1, got B={B}")
        cu = cu_seqlens.to(device=q.device, dtype=torch.int64)
        if cu.numel() < 2:
            raise ValueError(f"cu_seqlens must hold at least [0, T], got {cu.numel()} entries")
        if validate_values and (int(cu[0]) != 0 or int(cu[-1]) != T):
            raise ValueError(f"cu_seqlens must start at 0 and end at T={T}, got {cu.tolist()}")
        if validate_values and bool((cu[1:] < cu[:-1]).any()):
            raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
        num_seqs = cu.numel() - 1
    else:
        cu = None
        num_seqs = B

    if isinstance(offset, torch.Tensor):
        if offset.is_floating_point() or offset.dim() > 1 or (offset.dim() == 1 and offset.numel() != num_seqs):
            raise ValueError(f"offset must be an int or an integer tensor [N={num_seqs}], got {tuple(offset.shape)} {offset.dtype}")
        off = offset.to(device=q.device, dtype=torch.int64).expand(num_seqs).clone()
        negative = validate_values and bool((off < 0).any())  # a device-to-host sync
    elif isinstance(offset, int) and not isinstance(offset, bool):
        off = torch.full((num_seqs,), offset, dtype=torch.int64, device=q.device)
        negative = offset < 0
    else:
        raise ValueError(f"offset must be an int or an integer tensor, got {offset!r}")
    if negative:
        raise ValueError("offset must be non-negative (tokens already consumed)")

    if scale is None:
        scale = dk**-0.5
    elif not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None, got {scale!r}")

    if initial_state is not None:
        check_state(initial_state, num_seqs, Hkv, slots, dk, dv, "initial_state")

    shifts = normalise_shifts(phase_shift, windows, slots)
    return Problem(B, T, H, Hkv, dk, dv, slots, windows, float(scale), num_seqs, cu, off, gates, shifts)


def check_step(q, k, v, state, position, window, slots, scale, gates: str = DEFAULT_GATES,
               validate_values: bool = True, phase_shift: int | Sequence[int] = 0) -> Problem:  # fmt: skip
    """As ``check_problem``: ``validate_values`` False skips reading ``position`` back from the device."""
    check_gates(gates)
    _check_qkv(q, k, v, step=True)
    B, H, dk = q.shape
    Hkv, dv = v.shape[1], v.shape[2]
    windows = normalise_windows(window, slots, H, Hkv)
    if state is not None:
        check_state(state, B, Hkv, slots, dk, dv, "state")
    if not isinstance(position, torch.Tensor) or position.is_floating_point() or position.shape not in ((B,), ()):
        raise ValueError(f"position must be an integer tensor [B={B}], got {position!r}")
    if validate_values and bool((position < 0).any()):
        raise ValueError("position must be non-negative")
    if scale is None:
        scale = dk**-0.5
    pos = position.to(device=q.device, dtype=torch.int64).expand(B)
    shifts = normalise_shifts(phase_shift, windows, slots)
    return Problem(B, 1, H, Hkv, dk, dv, slots, windows, float(scale), B, None, pos, gates, shifts)
