"""Comparators shared by the tests: one place that names the tensor that differs."""

from __future__ import annotations

import torch


def assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    """Fail with the tensor's name, the worst error and where it is; NaN anywhere fails."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite values"
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    if not bool((err <= bound).all()):
        worst = int((err - bound).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), a.shape))
        raise AssertionError(
            f"{name}: max abs error {err.max().item():.3e} (atol {atol:g}, rtol {rtol:g}); "
            f"worst at {idx}: {a.flatten()[worst].item():.6g} vs {e.flatten()[worst].item():.6g}"
        )


def random_qkv(B, T, H, Hkv, dk, dv, dtype=torch.float64, seed=0, device="cpu", requires_grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_(requires_grad)  # noqa: E731
    return mk(B, T, H, dk), mk(B, T, Hkv, dk), mk(B, T, Hkv, dv)


def random_state(N, Hkv, m, dk, dv, dtype=torch.float64, seed=1, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return mk(N, Hkv, m, dk), mk(N, Hkv, m, dv)
