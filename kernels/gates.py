"""Dirichlet write weights and decays of BLA, computed from token positions.

Slot j of a head with window W and m slots sits at phase theta_j = j * W / m. A token at phase
p writes w[j] = D(p - theta_j) into slot j and the slot decays by alpha[j] = 1 - w[j], where D is
the periodic Dirichlet kernel with m nodes on period W (spec section 1).

The gates depend only on positions, never on data, so every backend computes them from integer
phases. Values at the nodes are set exactly (1 at its own node, 0 at the others) instead of
being left to sin() rounding: this is what makes m = W equal sliding-window attention exactly
and what lets the chunked algorithm find resets (alpha = 0) by integer tests.
"""

from __future__ import annotations

import math

import torch


def dirichlet_kernel(x: torch.Tensor, window: torch.Tensor, slots: int) -> torch.Tensor:
    """D(x) for integer offsets ``x`` in [0, W) and float64 result; ``window`` broadcasts with x."""
    x64 = x.to(torch.float64)
    w64 = window.to(torch.float64)
    at_node = torch.remainder(x, window // slots) == 0
    # Nodes are handled exactly by the caller; give the formula a harmless argument there.
    x_safe = torch.where(at_node, torch.full_like(x64, 0.5), x64)
    num = torch.sin(math.pi * slots * x_safe / w64)
    if slots % 2 == 1:
        den = slots * torch.sin(math.pi * x_safe / w64)
    else:
        den = slots * torch.tan(math.pi * x_safe / w64)
    return num / den


def dirichlet_gates(
    positions: torch.Tensor, window: torch.Tensor, slots: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Write weights, decays and reset flags for every position, head and slot.

    positions: integer tensor [...] (phase position: tokens consumed in the document, offset included)
    window:    integer tensor [Hw] (one window per head that owns a slot state)
    valid:     optional bool tensor [...]; invalid (padding) tokens get w = 0, alpha = 1

    Returns ``w``, ``alpha`` (float64, [..., Hw, m]) and ``reset`` (bool, [..., Hw, m]), where
    reset marks alpha == 0 exactly (the token sits on the slot's own node).
    """
    window = window.to(device=positions.device, dtype=torch.int64)
    stride = window // slots  # [Hw]
    theta = torch.arange(slots, device=positions.device, dtype=torch.int64)[None, :] * stride[:, None]
    x = torch.remainder(positions[..., None, None].to(torch.int64) - theta, window[:, None])  # [..., Hw, m]
    # D == 1 exactly at its own node; with a single slot D is 1 everywhere (every token resets).
    reset = (x == 0) | (slots == 1)
    other_node = (torch.remainder(x, stride[:, None]) == 0) & ~reset
    d = dirichlet_kernel(x, window[:, None], slots)
    w = torch.where(reset, torch.ones_like(d), torch.where(other_node, torch.zeros_like(d), d))
    if valid is not None:
        keep = valid[..., None, None]
        w = torch.where(keep, w, torch.zeros_like(w))
        reset = reset & keep
    alpha = 1.0 - w
    alpha = torch.where(reset, torch.zeros_like(alpha), alpha)
    return w, alpha, reset
