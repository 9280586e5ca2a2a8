"""The decode step: one token per sequence, the fp32 state updated in place (``step``)."""

from __future__ import annotations

import torch

try:  # a guarded import: exported models (bla export) run without Triton, on the torch backend
    import triton
    import triton.language as tl
except ImportError as exc:
    raise ImportError(f"the Triton BLA kernels need triton: {exc}") from exc

from .checks import Problem
from .device_cache import device_cache
from .triton_plan import _pick, plan
from .triton_tables import LOG_FLOOR, gate_tables


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


def step(q, k, v, sk, sv, problem: Problem) -> torch.Tensor:
    """One decode step: o [B, H, d_v]; the fp32 state (sk, sv; contiguous) is updated in place."""
    p = problem
    o = torch.empty(p.batch, p.num_heads, p.head_dim_v, device=q.device, dtype=q.dtype)
    gs, gl, toff = gate_tables(p, q.device)
    consts = _pick(plan(p, q.dtype).consts, "H", "HKV", "M", "BM", "DK", "BDK", "DV", "BDV")
    _bla_step_kernel[(p.batch, p.num_kv_heads)](
        q.contiguous(), k.contiguous(), v.contiguous(), o, sk, sv, p.offset.to(torch.int32).contiguous(),
        _windows_on(p.windows, str(q.device)), toff, gs, gl, p.scale, **consts, FLOOR=LOG_FLOOR,
    )  # fmt: skip
    return o


@device_cache(maxsize=64)
def _windows_on(windows: tuple[int, ...], device: str) -> torch.Tensor:
    """int32 windows per kv head on ``device``, made once: a decode step copies nothing from the
    host (a captured CUDA graph may not)."""
    return torch.tensor(windows, dtype=torch.int32, device=device)
