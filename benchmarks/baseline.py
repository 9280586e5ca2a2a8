"""The plain baseline of ``python benchmarks/training.py --baseline``: a llama-style transformer
and its training step in plain PyTorch (torch.compile, bf16 autocast, fused AdamW, SDPA flash),
with no DeepSpeed and no project code, so the stack's overhead is measured against it in the
same process. Self-contained on purpose: it must not get faster or slower with our code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.RMSNorm(d), nn.RMSNorm(d)
        self.qkv, self.o = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.gate_up, self.down = nn.Linear(d, 2 * hidden, bias=False), nn.Linear(hidden, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.heads, D // self.heads).transpose(1, 3).unbind(2)
        q, k = (torch.cat([t[..., ::2] * cos - t[..., 1::2] * sin, t[..., ::2] * sin + t[..., 1::2] * cos], -1) for t in (q, k))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, D)
        x = x + self.o(y)
        gate, up = self.gate_up(self.n2(x)).chunk(2, -1)
        return x + self.down(F.silu(gate) * up)


class PlainTransformer(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, hidden: int, theta: float = 10000.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d, heads, hidden) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.inv_freq = 1.0 / theta ** (torch.arange(0, d // heads, 2).float() / (d // heads))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids, labels):
        angles = torch.arange(ids.shape[1], device=ids.device)[:, None].float() * self.inv_freq.to(ids.device)
        cos, sin = angles.cos(), angles.sin()
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x)).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1))


def make_step(model: nn.Module, lr: float = 3e-4, forward=None):
    """A step function: forward under bf16 autocast, backward, clip, fused AdamW. ``forward(ids,
    labels) -> loss`` defaults to the whole model through torch.compile. Returns ``step(ids,
    labels)`` (the loss stays on the device)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    forward = forward or torch.compile(model)

    def step(ids, labels):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = forward(ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step
