"""Softmax attention over packed documents and sliding windows without a dense [T, T] mask.

SDPA takes a packed row's document mask (or a sliding window) as a dense [T, T] boolean and
computes every block of it: a 16k-token row of ~512-token documents does ~30x the work it needs
(issue 43: the packed 350m attn model trained at 36,782 tokens/s, 0.28x the BLA model's packed
rows in the same run, one H100, 2026-12-07). Two kernels skip what the mask empties:

- Flash attention's variable-length kernel (``torch.nn.attention.varlen``), on CUDA in half
  precision where torch has it: documents given by ``cu_seqlens`` (a batch's rows as documents of
  T tokens), the window as flash's left window; no mask to build and nothing to compile. Empty
  documents (``cu_seqlens`` padded to a capacity) take no work.
- FlexAttention's block-sparse kernels otherwise (float32, or a torch without varlen's
  window): fast only compiled, so the model takes it inside compiled blocks (``compile_blocks``)
  on CUDA. Each softmax layer builds its block mask from the document ids inside its compiled
  block: one pass over the row's (T / 128)^2 blocks a layer.

Eager on the CPU, SDPA with the dense mask as before; all three are tested equal.
"""

from __future__ import annotations

import inspect

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


def varlen_keywords(module) -> frozenset:
    """The keywords a ``torch.nn.attention.varlen``'s ``varlen_attn`` takes (they grew across releases)."""
    if module is None or not hasattr(module, "varlen_attn"):
        return frozenset()
    return frozenset(inspect.signature(module.varlen_attn).parameters)


varlen = None  # torch.nn.attention.varlen once load_varlen() has run (None: not yet, or this torch has none)
VARLEN_KEYWORDS: frozenset = frozenset()  # its varlen_attn's keywords: constants to torch.compile's tracing
_varlen_loaded = False


def load_varlen() -> None:
    """Import ``torch.nn.attention.varlen`` and read its keywords, once: when a softmax layer is
    built, not when this module is imported, never while torch.compile traces, and only where
    CUDA is (its kernel runs nowhere else). The import brings in the compiler, 1.7 s of start-up
    (2-core CPU machine, 2026-12-08, ``python -X importtime``) that ``bla --help`` and CPU runs
    should not pay for."""
    global varlen, VARLEN_KEYWORDS, _varlen_loaded
    if _varlen_loaded:
        return
    _varlen_loaded = True
    if not torch.cuda.is_available():
        return
    try:
        from torch.nn.attention import varlen as module
    except ImportError:  # a torch before varlen_attn
        return
    varlen, VARLEN_KEYWORDS = module, varlen_keywords(module)


def varlen_applies(q: torch.Tensor, window: int | None) -> bool:
    """Whether flash's variable-length kernel takes this call: CUDA, half precision (flash has no
    float32), and a ``varlen_attn`` that knows windows where there is one."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or not VARLEN_KEYWORDS:
        return False
    return "window_size" in VARLEN_KEYWORDS or (window is None and "is_causal" in VARLEN_KEYWORDS)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor | None,
                     window: int | None, enable_gqa: bool) -> torch.Tensor:  # fmt: skip
    """``masked_attention``'s result ``[B, H, T, d]`` through ``varlen_attn``: the documents are
    ``cu_seqlens``' (one packed row, B = 1) or the batch's rows; key j is read by query i when
    ``i - window < j <= i``, flash's left window of ``window - 1``. The bounds on a document's
    length are the row's T: fixed shapes and no host read of ``cu_seqlens``."""
    B, H, T, _ = q.shape
    if cu_seqlens is None:
        cu = torch.arange(B + 1, device=q.device, dtype=torch.int32) * T
    else:
        if B != 1:
            raise ValueError(f"packed documents come as one row, got a batch of {B}")
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    keys = VARLEN_KEYWORDS
    if enable_gqa and "enable_gqa" not in keys:  # an older varlen_attn: each query head gets its kv head's copy
        k, v = (x.repeat_interleave(H // x.shape[1], dim=1) for x in (k, v))
    options = {"enable_gqa": True} if enable_gqa and "enable_gqa" in keys else {}
    if "window_size" in keys:
        options["window_size"] = (-1 if window is None else window - 1, 0)
    else:
        options["is_causal"] = True

    def flat(x):  # [B, h, T, d] -> [B * T, h, d]: a view where x is a [B, T, h, d] tensor transposed, as the model's are
        return x.transpose(1, 2).reshape(B * T, x.shape[1], x.shape[3])

    o = varlen.varlen_attn(flat(q), flat(k), flat(v), cu, cu, T, T, **options)
    return o.view(B, T, H, v.shape[3]).transpose(1, 2)
