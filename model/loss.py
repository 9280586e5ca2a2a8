"""Linear + cross-entropy in chunks: the training loss without the [tokens, vocab] logits.

The head's logits are the largest activation of a small LM (16k tokens x 32k vocabulary is 2 GB
in fp32, plus their half-precision copy), and a plain ``cross_entropy(head(h))`` keeps them for
the backward. Here the tokens go through the head in chunks: each chunk's logits give its loss
and, at once, its gradients with respect to the hidden states and the head's weight (softmax
minus the one-hot target), accumulated in fp32; the logits are dropped before the next chunk.
The backward only scales the stored gradients, so nothing is recomputed. Logits and softmax
are fp32 (fp64 for fp64 inputs) whatever the inputs' dtype; the matrix products run in the
inputs' dtype.

Eager, one chunk is about ten kernels that each pass over its [chunk, vocab] logits (the fp32
copy, the log-sum-exp, the gather, the exponential, the one-hot, the mask, the cast back); on a
GPU these passes cost more than the head's matrix products (issue 43's profile of the 350m step:
an exponential and a multiply over the logits alone took 6 ms of a 115 ms step). ``compiled``
runs each chunk through ``torch.compile`` (the model's ``compile_blocks`` turns it on), which
fuses them into a reduction and one pass: the same arithmetic, in fewer passes.
"""

from __future__ import annotations

import torch

IGNORE = -100  # labels without a target (torch's cross_entropy default)


def _chunk(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, acc: torch.dtype, grads: bool):
    """One chunk of tokens: its summed loss and, with ``grads``, d(summed loss)/d(h) and /d(weight)
    (fp32 or fp64, in ``acc``). A function of its own so that it can be compiled as a whole."""
    logits = (h @ weight.t()).to(acc)
    keep = y != IGNORE
    target = torch.where(keep, y, 0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(1, target[:, None])[:, 0]) * keep).sum()
    if not grads:
        return loss, None, None
    # d(sum of losses)/d logits = softmax - one-hot, zero where there is no target
    g = logits.sub_(lse[:, None]).exp_()  # in place: one [chunk, vocab] buffer, not two
    g[torch.arange(g.shape[0], device=g.device), target] -= 1.0
    g = g.mul_(keep[:, None]).to(h.dtype)
    return loss, (g @ weight).to(acc), (g.t() @ h).to(acc)


_COMPILED_CHUNKS: dict = {}


def _compiled_chunk(options: tuple):
    """``_chunk`` compiled once per process and ``torch.compile`` options (its shapes: the full
    chunk and the last one)."""
    if options not in _COMPILED_CHUNKS:
        _COMPILED_CHUNKS[options] = torch.compile(_chunk, dynamic=False, **dict(options))
    return _COMPILED_CHUNKS[options]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, compiled: dict | None):
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # fp32 at least
        one_chunk = _chunk if compiled is None else _compiled_chunk(tuple(sorted(compiled.items())))
        total = torch.zeros((), dtype=acc, device=hidden.device)
        d_hidden = torch.zeros_like(hidden, dtype=acc) if grads else None
        d_weight = torch.zeros_like(weight, dtype=acc) if grads else None
        count = (labels != IGNORE).sum()
        for a in range(0, hidden.shape[0], chunk):
            loss, dh, dw = one_chunk(hidden[a : a + chunk], weight, labels[a : a + chunk], acc, grads)
            total += loss
            if grads:
                d_hidden[a : a + chunk] = dh
                d_weight += dw
        loss = total / count.clamp_min(1)
        if grads:
            scale = 1.0 / count.clamp_min(1).to(acc)
            ctx.save_for_backward(d_hidden * scale, d_weight * scale)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        d_hidden, d_weight = ctx.saved_tensors
        dh_dtype, dw_dtype = ctx.dtypes
        return (d_hidden * grad_loss).to(dh_dtype), (d_weight * grad_loss).to(dw_dtype), None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 2048, compiled: dict | None = None
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden [N, D] @ weight [V, D].T`` against ``labels [N]`` (IGNORE is
    left out), ``chunk`` tokens at a time: the same value and gradients as
    ``cross_entropy((hidden @ weight.T).float(), labels)`` without ever holding [N, V] logits.
    ``compiled``: each chunk through ``torch.compile`` with these options (``{}``: the defaults),
    which fuses the passes over its logits."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: expected hidden [N, D], weight [V, D], labels [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")  # fmt: skip
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be positive, got {chunk}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk, compiled)
