"""Softmax attention over packed documents and sliding windows through FlexAttention's
block-sparse kernels.

SDPA takes a packed row's document mask (or a sliding window) as a dense [T, T] boolean and
computes every block of it: a 16k-token row of ~512-token documents does ~30x the work it needs
(issue 43: the packed 350m attn model trained at 36,782 tokens/s, 0.28x the BLA model's packed
rows in the same run, one H100, 2026-12-07). FlexAttention skips the blocks that the mask empties and
fuses the rest. It is fast only compiled, so the model takes it inside compiled blocks
(``compile_blocks``) on CUDA; eager, SDPA with the dense mask as before (the two are tested equal).
Each softmax layer builds its block mask from the document ids inside its compiled block: one
pass over the row's (T / 128)^2 blocks a layer. Building it once a step and handing it to every
layer, as RoPE's table is, waits on a GPU measurement of what the repeated pass costs.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


def flex_applies(q: torch.Tensor) -> bool:
    """Whether this call is traced by torch.compile for a CUDA device (where FlexAttention's
    kernels are generated); callers also leave decode caches and sequence parallelism to SDPA."""
    return q.is_cuda and torch.compiler.is_compiling()


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document: torch.Tensor | None,
                     window: int | None, enable_gqa: bool) -> torch.Tensor:  # fmt: skip
    """Causal attention ``[B, H, T, d]`` in which query ``i`` reads key ``j`` when ``j <= i``, both lie
    in the same document (``document`` [T]: each token's document index, one packed row; None:
    the row is one document) and ``i - j < window`` (None: no window). Token order is position
    order inside a document, so index differences are position differences."""
    T = q.shape[2]

    def mask_mod(b, h, i, j):
        keep = i >= j
        if document is not None:
            keep = keep & (document[i] == document[j])
        if window is not None:
            keep = keep & (i - j < window)
        return keep

    block_mask = create_block_mask(mask_mod, None, None, T, T, device=q.device)
    return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
