"""Public BLA operator: ``bla_attention`` (a whole sequence) and ``bla_step`` (one decode step)."""

from __future__ import annotations

import importlib.util
import os
from typing import Sequence

import torch

from .checks import State, check_gate_inputs, check_problem, check_step
from .chunked import bla_chunked
from .gates import DEFAULT_GATES
from .reference import bla_reference, step_reference

BACKENDS = ("auto", "triton", "torch", "reference")


def _constant_under_compile(fn):
    """``torch.compiler.assume_constant_result`` (torch.compile takes the answer as a constant:
    find_spec is not traceable) without its import of torch._dynamo, 1.3 s of every ``bla``
    command; the decorator only marks the function so (tests/test_compile.py checks it still does)."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_under_compile
def triton_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton backend can run on ``device``, and why not when it cannot."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    try:
        from . import triton_bla  # noqa: F401
    except ImportError as exc:
        return False, f"the Triton kernels are not available: {exc}"
    if device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "TRITON_INTERPRET=1: Triton's interpreter on the CPU"
        return False, f"Triton kernels need a CUDA device (got {device.type}); set TRITON_INTERPRET=1 to interpret them"
    return True, "CUDA device"


def _resolve_backend(backend: str, device: torch.device, data_gated: bool = False) -> str:
    """``data_gated``: spec section 6's data-dependent gates are asked for, which the Triton kernels lack."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        ok, _ = triton_available(device)
        return "triton" if ok and device.type == "cuda" and not data_gated else "torch"
    if backend == "triton" and data_gated:
        raise ValueError("backend='triton' does not implement beta or log_gamma (spec section 6) yet: "
                         "use backend='torch' or 'auto'")  # fmt: skip
    if backend == "triton":
        ok, why = triton_available(device)
        if not ok:
            raise ValueError(f"backend='triton' cannot run: {why}")
    return backend


def bla_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int | Sequence[int],
    slots: int,
    scale: float | None = None,
    initial_state: State | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    offset: int | torch.Tensor = 0,
    backend: str = "auto",
    gates: str = DEFAULT_GATES,
    validate_values: bool = True,
    beta: torch.Tensor | None = None,
    log_gamma: torch.Tensor | None = None,
    phase_shift: int | Sequence[int] = 0,
) -> tuple[torch.Tensor, State | None]:
    """Blurry Window Attention over whole sequences.

    Args:
        q, k: [B, T, H, d_k] and [B, T, H_kv, d_k]; v: [B, T, H_kv, d_v]. H_kv < H is GQA: the
            query heads of a group read one slot state.
        window: W, an int or a list per head (per query head, equal inside a GQA group, or per kv head).
        slots: m, dividing every window.
        scale: softmax scale over slots, default d_k ** -0.5.
        initial_state: (K [N, H_kv, m, d_k], V [N, H_kv, m, d_v]); zeros when None.
        output_final_state: also return the state after the last token of every sequence.
        cu_seqlens: int [N + 1] document starts when documents are packed into B = 1; each
            document starts from its own initial state (zeros by default) at phase ``offset``.
        offset: tokens already consumed (int or [N] tensor): the phase continues from there.
        backend: "auto" (Triton on CUDA, torch otherwise), "triton", "torch" or "reference".
        gates: the slot write and decay (spec section 1): "dirichlet" (s = d, alpha = 1 - d^2,
            the default), "fejer" (s = d^2, alpha = 1 - d^2) or "dirichlet_v1" (s = d,
            alpha = 1 - d; earlier checkpoints; it grows by about 1.22^(W/m)).
        validate_values: check the values of ``cu_seqlens`` and a tensor ``offset`` too, which
            reads them back from the device; False for callers that made them (the model's layers:
            no host synchronisation per call). Shapes, dtypes and devices are always checked.
        beta, log_gamma, phase_shift: the extensions of spec section 6, off by default (None, 0:
            the result is plain BLA's bit for bit). ``beta`` [B, T, H_kv] in [0, 1], the selective
            write (s <- beta s, alpha <- 1 - beta (1 - alpha)); ``log_gamma`` [B, T, H_kv] <= 0, the
            scalar forgetting (alpha <- exp(log_gamma) alpha); ``phase_shift`` an int or one int per
            kv head in [0, W/m): head h's slots sit at phases j W/m + shift_h. The Triton kernels
            take phase shifts, not beta or log_gamma yet: with either, "auto" runs the torch backend.

    Returns:
        o [B, T, H, d_v] in q's dtype, and the final state (float32, or float64 for float64
        inputs) or None.

    Example:
        >>> q = k = v = torch.randn(1, 16, 2, 8)
        >>> o, (K, V) = bla_attention(q, k, v, window=8, slots=4, output_final_state=True)
        >>> o.shape, K.shape
        (torch.Size([1, 16, 2, 8]), torch.Size([1, 2, 4, 8]))
    """
    problem = check_problem(q, k, v, window, slots, scale, initial_state, cu_seqlens, offset, gates, validate_values, phase_shift)
    data_gated = check_gate_inputs(beta, log_gamma, tuple(k.shape[:3]), q.device, gates, validate_values)
    chosen = _resolve_backend(backend, q.device, data_gated)
    if chosen == "reference":
        o, state = bla_reference(q, k, v, problem, initial_state, beta, log_gamma)
        if q.dtype != torch.float64:
            state = tuple(s.float() for s in state)
    elif chosen == "torch":
        o, state = bla_chunked(q, k, v, problem, initial_state, beta=beta, log_gamma=log_gamma)
    else:
        from .triton_bla import rows_per_call
        from .triton_ops import bla_triton

        rows = rows_per_call(problem, q.dtype)
        if rows is None:
            o, state = bla_triton(q, k, v, problem, initial_state)
        else:  # past the kernels' int32 offsets: pieces of rows that fit (rows are independent sequences)
            pieces = [(slice(s, s + rows), problem.rows(s, s + rows)) for s in range(0, problem.batch, rows)]
            done = [bla_triton(q[r], k[r], v[r], part, None if initial_state is None else (initial_state[0][r], initial_state[1][r]))
                    for r, part in pieces]  # fmt: skip
            o = torch.cat([piece[0] for piece in done])
            state = (torch.cat([piece[1][0] for piece in done]), torch.cat([piece[1][1] for piece in done]))
    return o, (state if output_final_state else None)


def bla_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: State | None,
    position: torch.Tensor,
    window: int | Sequence[int],
    slots: int,
    scale: float | None = None,
    gates: str = DEFAULT_GATES,
    validate_values: bool = True,
    beta: torch.Tensor | None = None,
    log_gamma: torch.Tensor | None = None,
    phase_shift: int | Sequence[int] = 0,
) -> tuple[torch.Tensor, State]:
    """One decode step: q [B, H, d_k], k [B, H_kv, d_k], v [B, H_kv, d_v], position [B] (the
    token's position in its document, offset included). ``state`` None starts from zeros.
    ``gates`` and ``phase_shift`` must be those of the prefill that made ``state``; ``beta`` and
    ``log_gamma`` [B, H_kv] are this token's (see ``bla_attention``). ``validate_values`` False
    skips reading ``position`` back from the device (see ``bla_attention``).

    Returns o [B, H, d_v] in q's dtype and the new state, in the same format as
    ``bla_attention``'s final state, so a prefill's state feeds decoding directly.
    """
    problem = check_step(q, k, v, state, position, window, slots, scale, gates, validate_values, phase_shift)
    data_gated = check_gate_inputs(beta, log_gamma, tuple(k.shape[:2]), q.device, gates, validate_values)
    sdtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if state is None:
        B, G, m = problem.batch, problem.num_kv_heads, problem.slots
        state = (q.new_zeros(B, G, m, problem.head_dim_k, dtype=sdtype), q.new_zeros(B, G, m, problem.head_dim_v, dtype=sdtype))
    else:
        state = tuple(s.to(sdtype) for s in state)
    if q.is_cuda and not data_gated:
        ok, _ = triton_available(q.device)
        if ok:
            from .triton_ops import bla_step_triton

            return bla_step_triton(q, k, v, state, problem)
    o, new_state = _torch_step(q, k, v, state, problem, beta, log_gamma)
    return o.to(q.dtype), new_state


def _torch_step(q, k, v, state, problem, beta=None, log_gamma=None):
    return step_reference(q, k, v, state, problem.offset, problem.window_tensor(q.device), problem.slots, problem.scale,
                          gates=problem.gates, shift_G=problem.shift_tensor(q.device), beta_BG=beta, log_gamma_BG=log_gamma)  # fmt: skip


def bla_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: State,
    position: torch.Tensor,
    window: int | Sequence[int],
    slots: int,
    scale: float | None = None,
    gates: str = DEFAULT_GATES,
    beta: torch.Tensor | None = None,
    log_gamma: torch.Tensor | None = None,
    phase_shift: int | Sequence[int] = 0,
) -> torch.Tensor:
    """``bla_step`` into a preallocated state: ``state`` (fp32 K [B, H_kv, m, d_k], V [B, H_kv, m,
    d_v], contiguous) is updated in place and o [B, H, d_v] returned. Nothing is read back from the
    device and nothing allocated depends on the context: a decode step built on it can be captured
    as a CUDA graph (``bla.model.decode``)."""
    problem = check_step(q, k, v, state, position, window, slots, scale, gates, validate_values=False, phase_shift=phase_shift)
    data_gated = check_gate_inputs(beta, log_gamma, tuple(k.shape[:2]), q.device, gates, validate_values=False)
    sk, sv = state
    if sk.dtype != torch.float32 or sv.dtype != torch.float32 or not (sk.is_contiguous() and sv.is_contiguous()):
        raise ValueError(f"bla_step_ needs a contiguous float32 state, got {sk.dtype}, {sv.dtype}")
    if q.is_cuda and not data_gated and triton_available(q.device)[0]:
        from .triton_ops import op_shifts, step_

        return step_(q, k, v, sk, sv, problem.offset, list(problem.windows), problem.slots, problem.scale, problem.gates,
                     op_shifts(problem))  # fmt: skip
    o, (nk, nv) = _torch_step(q, k, v, state, problem, beta, log_gamma)
    sk.copy_(nk)
    sv.copy_(nv)
    return o.to(q.dtype)
