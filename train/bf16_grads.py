"""DeepSpeed's BF16_Optimizer (the GPU default: bf16 weights, fp32 gradients and master weights)
with its gradient hand-over done as one foreach add.

After each backward the optimiser adds every bf16 gradient into its fp32 copy, parameter by
parameter, as ``hp.add_(lp.to(float32))``: a cast into a new tensor, then an add, two kernels and
an allocation per parameter. The 350m model's step on an H100 spends about 5 ms of kernels on
them (199-247 copies and 211-259 adds among ~100 ms, benchmarks/reports/2026-12-07-throughput.md),
work the plain compiled loop it is measured against does not do. ``torch._foreach_add_`` takes the
bf16 gradients as they are (the add promotes to float32 inside the kernel), so the cast and its
allocation go; the sums are the same to the bit (an fp32 add of the same fp32-exact values).
"""

from __future__ import annotations

import torch

_NEEDS = ("bf16_groups", "fp32_groups_gradients", "fp32_groups_has_gradients", "update_hp_grads")


def fuse_hp_grad_update(optimizer) -> bool:
    """Give this BF16_Optimizer the foreach hand-over; True when it took it. Any other optimiser, or
    one set up in a way the fused update does not cover (``immediate_grad_update``, whose hooks add
    each gradient as it comes; expert-parallel folding; a DeepSpeed without these fields), keeps
    DeepSpeed's own."""
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if not isinstance(optimizer, BF16_Optimizer) or not all(hasattr(optimizer, name) for name in _NEEDS):
        return False
    if getattr(optimizer, "immediate_grad_update", False) or getattr(optimizer, "autoep_folding_tp_group", None) is not None:
        return False

    @torch.no_grad()
    def update_hp_grads(clear_lp_grads: bool = False) -> None:
        fp32, bf16 = [], []
        for i, group in enumerate(optimizer.bf16_groups):
            for j, lp in enumerate(group):
                if lp.grad is None:
                    continue
                hp = optimizer.fp32_groups_gradients[i][j]
                fp32.append(hp.data)
                bf16.append(lp.grad.data.view(hp.shape))
                lp._hp_grad = hp  # what DeepSpeed's own update leaves behind (its gradient-norm and checkpoint paths read it)
                optimizer.fp32_groups_has_gradients[i][j] = True
        if fp32:
            torch._foreach_add_(fp32, bf16)
            if clear_lp_grads:
                torch._foreach_zero_(bf16)

    optimizer.update_hp_grads = update_hp_grads  # the instance's: every caller (backward, step) takes it
    return True
