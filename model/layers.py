"""Building blocks shared by the mixers and the LM: RMSNorm, SwiGLU, RoPE, short causal conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors to float32 for accuracy-sensitive math; float32/64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xu = upcast(x)
        y = xu * torch.rsqrt(xu.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * upcast(self.weight)).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def rope_table(positions_BT: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, 1, dim/2] (float32) of RoPE's angles at integer positions: built once
    per forward and shared by every layer (recomputed inside each fused kernel, per head and
    layer, they cost the attn model 8% of its step on an H200)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions_BT.device, dtype=torch.float32) / dim)
    angles = positions_BT.to(torch.float32)[..., None] * inv_freq  # [B, T, d/2]
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x_BTHD: torch.Tensor, positions_BT: torch.Tensor, theta: float, table=None) -> torch.Tensor:
    """Rotary embedding (rotate-half form) at integer positions ``positions_BT``; ``table`` is
    ``rope_table``'s (cos, sin) for those positions, when the caller has it."""
    d = x_BTHD.shape[-1]
    cos, sin = table if table is not None else rope_table(positions_BT, d, theta)
    x = upcast(x_BTHD)
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x_BTHD.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time that never reads across a document start.

    ``positions_BT`` (the token's index inside its document) tells how many earlier tokens
    belong to the same document, so packed documents stay apart. Decoding carries the last
    ``kernel - 1`` inputs in a buffer.
    """

    def __init__(self, dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.weight = nn.Parameter(torch.zeros(dim, kernel))
        with torch.no_grad():
            self.weight[:, -1] = 1.0  # starts as the identity
            self.weight.add_(torch.randn_like(self.weight) * 0.02)

    def forward(
        self, x_BTD: torch.Tensor, positions_BT: torch.Tensor, past_BKD: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns silu(conv(x)) and the last ``kernel - 1`` inputs (the decode buffer)."""
        K = self.kernel
        B, T, D = x_BTD.shape
        past = past_BKD if past_BKD is not None else x_BTD.new_zeros(B, K - 1, D)
        full = torch.cat([past.to(x_BTD.dtype), x_BTD], dim=1)  # [B, K-1+T, D]
        # each tap's weights as one contiguous row: a column of weight [D, K] is strided, and eager
        # CPU multiplies by a strided operand slowly (each of the main job's convolutions, [8, 256, 576]
        # on one thread of the 2-core CPU machine, 2026-12-07, took 35 ms forward and backward, 22 ms
        # so: the same products and sums, in the same order)
        taps = self.weight.t().contiguous()
        y = None
        for lag in range(K):
            term = full[:, K - 1 - lag : K - 1 - lag + T] * taps[K - 1 - lag]
            if lag:  # tap `lag` reads token t - lag, which is in the same document iff position >= lag
                term = term * (positions_BT >= lag).to(x_BTD.dtype)[..., None]
            y = term if y is None else y + term
        return F.silu(y), full[:, -(K - 1) :] if K > 1 else full[:, :0]
