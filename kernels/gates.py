"""BLA's slot writes and decays, computed from token positions (spec section 1, v2).

Slot j of a head with window W and m slots sits at phase theta_j = j * W / m. A token at phase
p has the interpolation vector d[j] = D(p - theta_j), D the periodic Dirichlet kernel with m
nodes on period W. The ``gates`` option turns d into the GSA write ``s`` and decay ``alpha``:

    "dirichlet" (default)   s = d      alpha = 1 - d^2    (the diagonal of the exact overwrite I - d d^T)
    "fejer"                 s = d^2    alpha = 1 - d^2    (convex: s = 1 - alpha, as GSA ties them)
    "dirichlet_v1"          s = d      alpha = 1 - d      (spec v1: alpha reaches 1.22 on D's side lobes)

With the v2 rules 0 <= alpha <= 1 for every W and m, so the state never grows. "dirichlet_v1"
stays so that checkpoints trained with it compute what they were trained with.

The gates depend only on positions, never on data, so every backend computes them from integer
phases. Values at the nodes are set exactly (d = 1 at its own node, 0 at the others) instead of
being left to sin() rounding: this is what makes m = W equal sliding-window attention exactly
and what lets the chunked algorithms find resets (alpha = 0) by integer tests.
"""

from __future__ import annotations

import math

import torch

GATES = ("dirichlet", "fejer", "dirichlet_v1")
# The three defaults, here only. The operator keeps the spec's API default (`bla_attention(gates=
# "dirichlet")`). A model trains with `fejer`, chosen on issue 19's evidence (experiments/reports/2026-11-to-12-sweeps.md, answer 3):
# over 3 seeds it beat `dirichlet` on RegBench at every state (m = 4 / 16 / 64: 0.525 / 0.584 / 0.748
# against 0.518 / 0.566 / 0.703, disjoint ranges) and tied it on LM loss and MQAR; its state is a
# convex combination of keys (s = 1 - alpha), so a slot never outgrows the largest key.
DEFAULT_GATES = "dirichlet"  # the operator's
MODEL_GATES = "fejer"  # a model's (model.bla.gates)
LEGACY_GATES = "dirichlet_v1"  # what a saved config without a ``gates`` key was trained with


def check_gates(gates: str) -> str:
    if gates not in GATES:
        raise ValueError(f"gates must be one of {GATES}, got {gates!r}")
    return gates


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


_RULES = {  # gates -> (s, e) of the interpolation weights d, where alpha = 1 - e (e: what the write erases)
    "dirichlet": lambda d: (d, d * d),
    "fejer": lambda d: (d * d, d * d),
    "dirichlet_v1": lambda d: (d, d),
}


def dirichlet_gates(
    positions: torch.Tensor,
    window: torch.Tensor,
    slots: int,
    valid: torch.Tensor | None = None,
    gates: str = DEFAULT_GATES,
    shift: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    log_gamma: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Writes, decays and reset flags for every position, head and slot.

    positions: integer tensor [...] (phase position: tokens consumed in the document, offset included)
    window:    integer tensor [Hw] (one window per head that owns a slot state)
    valid:     optional bool tensor [...]; invalid (padding) tokens get s = 0, alpha = 1
    gates:     "dirichlet" (default), "fejer" or "dirichlet_v1"
    The extensions of spec section 6 (None: off, and the result is that of section 1 bit for bit):
    shift:     integer tensor [Hw] in [0, W/m): head h's slots sit at phases j W/m + shift_h
    beta:      [..., Hw] in [0, 1], the selective write: s <- beta s, alpha = 1 - beta (1 - alpha)
    log_gamma: [..., Hw] <= 0, the scalar forgetting: alpha <- exp(log_gamma) alpha

    Returns ``s``, ``alpha`` (float64, [..., Hw, m]) and
    ``reset`` (bool, [..., Hw, m]), where reset marks alpha == 0 exactly (the token sits on the
    slot's own node and, with a write gate, beta == 1). Gradients reach beta and log_gamma.
    """
    rule = _RULES[check_gates(gates)]
    window = window.to(device=positions.device, dtype=torch.int64)
    stride = window // slots  # [Hw]
    theta = torch.arange(slots, device=positions.device, dtype=torch.int64)[None, :] * stride[:, None]
    if shift is not None:
        theta = theta + shift.to(device=positions.device, dtype=torch.int64)[:, None]
    x = torch.remainder(positions[..., None, None].to(torch.int64) - theta, window[:, None])  # [..., Hw, m]
    # D == 1 exactly at its own node; with a single slot D is 1 everywhere (every token resets).
    reset = (x == 0) | (slots == 1)
    other_node = (torch.remainder(x, stride[:, None]) == 0) & ~reset
    d = dirichlet_kernel(x, window[:, None], slots)
    d = torch.where(reset, torch.ones_like(d), torch.where(other_node, torch.zeros_like(d), d))
    s, erased = rule(d)
    if beta is not None:  # a partial overwrite of strength beta: a slot resets only where beta == 1
        b = beta[..., None].to(torch.float64)
        s, erased = b * s, b * erased
        reset = reset & (b == 1)
    alpha = 1.0 - erased
    if log_gamma is not None:
        alpha = torch.exp(log_gamma[..., None].to(torch.float64)) * alpha
    if valid is not None:
        keep = valid[..., None, None]
        s = torch.where(keep, s, torch.zeros_like(s))
        alpha = torch.where(keep, alpha, torch.ones_like(alpha))
        reset = reset & keep
    alpha = torch.where(reset, torch.zeros_like(alpha), alpha)
    return s, alpha, reset


def state_norm_bound(window: int, slots: int, gates: str = DEFAULT_GATES) -> float:
    """``max_j sum_t |s_t[j]|`` over one period: with v2 gates a slot's norm never exceeds the
    largest key norm times this (spec section 2, bounded state)."""
    s, _, _ = dirichlet_gates(torch.arange(window), torch.tensor([window]), slots, gates=gates)
    return float(s[:, 0].abs().sum(0).max())
