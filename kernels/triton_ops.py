"""The Triton kernels as torch custom operators (``torch.library``), with their autograd.

``torch.compile`` traces through a custom operator without a graph break: it sees the op's
schema and its fake (shape-only) implementation, never the Triton launch code. Three ops:

- ``bla::chunk_fwd(q, k, v, h0k?, h0v?, cu_seqlens?, offset, windows, slots, scale, gates, shifts)``
  -> o, the final state (hk, hv) and the eight buffers the backward reads;
- ``bla::chunk_bwd`` -> dq, dk, dv, dh0k, dh0v (empty tensors without an initial state);
- ``bla::step_(q, k, v, sk!, sv!, position, windows, slots, scale, gates, shifts)`` -> o: one decode
  step, the fp32 state updated in place (static buffers, as a captured CUDA graph needs).

The saved buffers' shapes depend only on the problem's shapes and its (windows, m, gates) plan,
never on ``cu_seqlens``' values (an upper bound for packed documents): see
``triton_plan.saved_rows``. (An export's copy registers them under its own namespace.)
"""

from __future__ import annotations

import re

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .checks import Problem, State
from .triton_bla import backward, forward, saved_layout, step
from .triton_plan import INTERPRETING

# "bla" here; a copy of this module (an export's, loaded by transformers under another name)
# registers its ops under its own namespace, so both can live in one process
NAMESPACE = "bla" if __name__ == "bla.kernels.triton_ops" else "bla_" + re.sub(r"\W", "_", __name__)


def op_shifts(problem: Problem) -> list[int]:
    """The ops' ``shifts``: a slot phase shift per kv head (spec section 6), zeros for none (never
    an empty list: the custom-op machinery would take that for a list of tensors)."""
    return list(problem.shifts or (0,) * len(problem.windows))


def _shifts(shifts: list[int]) -> tuple[int, ...] | None:
    return tuple(shifts) if any(shifts) else None


def _problem(q, k, v, cu_seqlens, offset, windows, slots, scale, gates, shifts) -> Problem:
    B, T, H, dk = q.shape
    n = B if cu_seqlens is None else cu_seqlens.numel() - 1
    return Problem(B, T, H, k.shape[2], dk, v.shape[3], slots, tuple(windows), scale, n, cu_seqlens, offset, gates, _shifts(shifts))


@torch.library.custom_op(f"{NAMESPACE}::chunk_fwd", mutates_args=())
def chunk_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, h0k: torch.Tensor | None, h0v: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None, offset: torch.Tensor, windows: list[int], slots: int, scale: float, gates: str,
    shifts: list[int],
) -> list[torch.Tensor]:  # fmt: skip
    p = _problem(q, k, v, cu_seqlens, offset, windows, slots, scale, gates, shifts)
    o, hk, hv, saved = forward(q, k, v, h0k, h0v, p)
    return [o, hk, hv, *saved]


@chunk_fwd.register_fake
def _(q, k, v, h0k, h0v, cu_seqlens, offset, windows, slots, scale, gates, shifts):
    p = _problem(q, k, v, cu_seqlens, offset, windows, slots, scale, gates, shifts)
    with unset_fake_temporarily():  # the plan is built (and cached) from real host tensors
        layout = saved_layout(p, q.dtype)
    n, hkv, m = p.num_seqs, p.num_kv_heads, p.slots
    o = q.new_empty(q.shape[:-1] + (p.head_dim_v,))
    hk = q.new_empty(n, hkv, m, p.head_dim_k, dtype=torch.float32)
    hv = q.new_empty(n, hkv, m, p.head_dim_v, dtype=torch.float32)
    return [o, hk, hv, *(q.new_empty(shape, dtype=dtype) for shape, dtype in layout)]


@torch.library.custom_op(f"{NAMESPACE}::chunk_bwd", mutates_args=())
def chunk_bwd(
    do: torch.Tensor, dhk: torch.Tensor | None, dhv: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    o: torch.Tensor, saved: list[torch.Tensor], cu_seqlens: torch.Tensor | None, offset: torch.Tensor, windows: list[int], slots: int,
    scale: float, gates: str, shifts: list[int], use_h0: bool,
) -> list[torch.Tensor]:  # fmt: skip
    p = _problem(q, k, v, cu_seqlens, offset, windows, slots, scale, gates, shifts)
    dq, dk, dv, dh0k, dh0v = backward(do, dhk, dhv, q, k, v, o, saved, p, use_h0)
    if not use_h0:
        dh0k, dh0v = q.new_empty(0), q.new_empty(0)
    return [dq, dk, dv, dh0k, dh0v]


@chunk_bwd.register_fake
def _(do, dhk, dhv, q, k, v, o, saved, cu_seqlens, offset, windows, slots, scale, gates, shifts, use_h0):
    if use_h0:
        n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
        dh0k = q.new_empty(n, k.shape[2], slots, q.shape[-1], dtype=torch.float32)
        dh0v = q.new_empty(n, k.shape[2], slots, v.shape[-1], dtype=torch.float32)
    else:
        dh0k, dh0v = q.new_empty(0), q.new_empty(0)
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dh0k, dh0v]


def _setup_context(ctx, inputs, output):
    q, k, v, h0k, h0v, cu_seqlens, offset, windows, slots, scale, gates, shifts = inputs
    # unused outputs' gradients stay None: materialised, they were 9 zero tensors per backward (the
    # 7 saved buffers of then and the final state; 0.15 GB at B=4, T=8192, H=16), 0.7 ms of host time
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, output[0], cu_seqlens, offset, *output[3:])
    ctx.args = (list(windows), slots, scale, gates, list(shifts))
    ctx.use_h0 = h0k is not None
    ctx.state_dtypes = (output[1].dtype, output[2].dtype) if h0k is None else (h0k.dtype, h0v.dtype)
    ctx.mark_non_differentiable(*output[3:])


def _input_grads(run_backward, ctx, do, dhk, dhv, q, k, v):
    """dq, dk, dv and the initial state's gradients (None without one) through ``run_backward``
    (the backward op when traced, the launch code when eager). Autograd hands None for outputs
    nobody used: the final state's (the kernels start their scan from zeros), or o's."""
    if do is None:
        do = torch.zeros(q.shape[:-1] + (v.shape[-1],), device=q.device, dtype=q.dtype)
    dq, dk, dv, dh0k, dh0v = run_backward(do, dhk, dhv, q, k, v)
    if not ctx.use_h0:
        return dq, dk, dv, None, None
    return dq, dk, dv, dh0k.to(ctx.state_dtypes[0]), dh0v.to(ctx.state_dtypes[1])


def _backward(ctx, grads):
    q, k, v, o, cu_seqlens, offset, *saved = ctx.saved_tensors

    def run(*args):
        return chunk_bwd(*args, o, saved, cu_seqlens, offset, *ctx.args, ctx.use_h0)

    return *_input_grads(run, ctx, *grads[:3], q, k, v), None, None, None, None, None, None, None


chunk_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op(f"{NAMESPACE}::step_", mutates_args=("sk", "sv"))
def step_(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sk: torch.Tensor, sv: torch.Tensor, position: torch.Tensor,
    windows: list[int], slots: int, scale: float, gates: str, shifts: list[int],
) -> torch.Tensor:  # fmt: skip
    B, H, dk = q.shape
    p = Problem(B, 1, H, k.shape[1], dk, v.shape[2], slots, tuple(windows), scale, B, None, position, gates, _shifts(shifts))
    return step(q, k, v, sk, sv, p)


@step_.register_fake
def _(q, k, v, sk, sv, position, windows, slots, scale, gates, shifts):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


class _Chunk(torch.autograd.Function):
    """The eager path: the same forward and backward as ``chunk_fwd``'s autograd, without the
    custom operator's machinery (dispatch, schema checks, output pytrees, the aliasing check),
    which cost 1.4 ms of host time per forward+backward at B=4, T=8192 on an H200 against the
    kernels' 1.5 ms of GPU time (benchmarks/reports/2026-11-to-12.md): eager calls were host-bound."""

    @staticmethod
    def forward(ctx, q, k, v, h0k, h0v, problem: Problem):
        o, hk, hv, saved = forward(q, k, v, h0k, h0v, problem)
        ctx.save_for_backward(q, k, v, o, *saved)
        ctx.problem = problem
        ctx.use_h0 = h0k is not None
        ctx.state_dtypes = (hk.dtype, hv.dtype) if h0k is None else (h0k.dtype, h0v.dtype)
        ctx.set_materialize_grads(False)
        return o, hk, hv

    @staticmethod
    def backward(ctx, do, dhk, dhv):
        q, k, v, o, *saved = ctx.saved_tensors

        def run(*args):
            return backward(*args, o, saved, ctx.problem, ctx.use_h0)

        return *_input_grads(run, ctx, do, dhk, dhv, q, k, v), None


def _traced() -> bool:
    """Whether this call is traced rather than run: torch.compile, or a dispatch mode (fake
    tensors, selective activation checkpointing's policy) that must see the custom operator."""
    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


def bla_triton(q, k, v, problem: Problem, initial_state: State | None) -> tuple[torch.Tensor, State]:
    p = problem
    h0k, h0v = initial_state if initial_state is not None else (None, None)
    dtype = q.dtype
    if INTERPRETING and dtype == torch.bfloat16:
        # Triton's CPU interpreter handles bf16 wrongly; there, run the fp32 kernel on upcast
        # inputs (autograd casts the gradients back). GPUs run it natively; fp16 runs as is.
        q, k, v = q.float(), k.float(), v.float()
    if _traced():
        o, hk, hv, *_ = chunk_fwd(q, k, v, h0k, h0v, p.cu_seqlens, p.offset, list(p.windows), p.slots, p.scale, p.gates,
                                  op_shifts(p))  # fmt: skip
    else:
        o, hk, hv = _Chunk.apply(q, k, v, h0k, h0v, p)
    return o.to(dtype), (hk, hv)


def bla_step_triton(q, k, v, state: State, problem: Problem) -> tuple[torch.Tensor, State]:
    """Functional: the new state is a copy (``step_`` updates given fp32 buffers in place)."""
    p = problem
    sk, sv = (s.float().contiguous().clone() for s in state)
    o = step_(q, k, v, sk, sv, p.offset, list(p.windows), p.slots, p.scale, p.gates, op_shifts(p))
    return o, (sk, sv)
