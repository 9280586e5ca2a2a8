"""Linear + cross-entropy in chunks: the training loss without the [tokens, vocab] logits.

The head's logits are the largest activation of a small LM (16k tokens x 32k vocabulary is 2 GB
in fp32, plus their half-precision copy), and a plain ``cross_entropy(head(h))`` keeps them for
the backward. Here the tokens go through the head in chunks: each chunk's logits give its loss
and, at once, its gradients with respect to the hidden states and the head's weight (softmax
minus the one-hot target), accumulated in fp32; the logits are dropped before the next chunk.
The backward only scales the stored gradients, so nothing is recomputed. Logits and softmax
are fp32 (fp64 for fp64 inputs) whatever the inputs' dtype; the matrix products run in the
inputs' dtype.
"""

from __future__ import annotations

import torch

IGNORE = -100  # labels without a target (torch's cross_entropy default)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int):
        grads = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # fp32 at least
        total = torch.zeros((), dtype=acc, device=hidden.device)
        d_hidden = torch.zeros_like(hidden, dtype=acc) if grads else None
        d_weight = torch.zeros_like(weight, dtype=acc) if grads else None
        count = (labels != IGNORE).sum()
        for a in range(0, hidden.shape[0], chunk):
            h, y = hidden[a : a + chunk], labels[a : a + chunk]
            logits = (h @ weight.t()).to(acc)
            keep = y != IGNORE
            target = torch.where(keep, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, target[:, None])[:, 0]) * keep).sum()
            if grads:  # d(sum of losses)/d logits = softmax - one-hot, zero where there is no target
                g = logits.sub_(lse[:, None]).exp_()  # in place: one [chunk, vocab] buffer, not two
                g[torch.arange(g.shape[0], device=g.device), target] -= 1.0
                g = g.mul_(keep[:, None]).to(hidden.dtype)
                d_hidden[a : a + chunk] = g @ weight
                d_weight += g.t() @ h
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
        return (d_hidden * grad_loss).to(dh_dtype), (d_weight * grad_loss).to(dw_dtype), None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Mean cross-entropy of ``hidden [N, D] @ weight [V, D].T`` against ``labels [N]`` (IGNORE is
    left out), ``chunk`` tokens at a time: the same value and gradients as
    ``cross_entropy((hidden @ weight.T).float(), labels)`` without ever holding [N, V] logits."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: expected hidden [N, D], weight [V, D], labels [N]; got "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)}, {tuple(labels.shape)}")  # fmt: skip
    if chunk < 1:
        raise ValueError(f"linear_cross_entropy: chunk must be positive, got {chunk}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, chunk)
