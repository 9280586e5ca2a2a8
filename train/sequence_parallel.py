"""Sequence parallelism: one packed row split along the sequence over the ranks of a group.

Each rank holds a contiguous slice of the row (positions and document boundaries intact) and
runs every layer on it; layers exchange only what crosses a slice boundary:

* BLA: the state after a segment is affine in the state before it, S_out = Gamma (.) S_in +
  Lambda, with Gamma the product of decays over the segment (positions only) and Lambda the
  segment's final state from zero (spec section 5). Every rank computes (Gamma, Lambda) of its
  last segment, the group all-gathers them (a few slot states per layer), and each rank scans
  them to get the initial state of its first segment; autograd carries the gradients of those
  states back to the ranks that made them. A slice holding W tokens of its last document has
  Gamma = 0: only the neighbour's state matters.
* Full softmax attention: keys and values are all-gathered (autograd); SWA: only a halo of the
  last W - 1 keys and values of the previous rank(s). Local queries attend with the global
  causal, same-document (and window) mask.
* The short convolution takes the previous rank's last kernel - 1 inputs as its halo.

The model stays single-device: ``enable`` attaches these forwards to a built model's mixers,
``shard`` cuts a packed batch for a rank. Tests: tests/test_sequence_parallel.py.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bla.kernels import bla_attention, dirichlet_gates
from bla.model.layers import apply_rope
from bla.model.mixers import BLAMixer, SoftmaxMixer, _document_ids, _start_positions, positions_from_cu_seqlens


@dataclass
class SPContext:
    """The group and, per batch, where this rank's slice sits in the packed row."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    slice_start: int = 0
    total_len: int = 0
    global_cu: torch.Tensor | None = None  # document/row boundaries of the whole packed row
    segment_positions: torch.Tensor | None = None  # [1, T_local] positions inside global segments
    continues: bool = False  # the slice's first segment continues the previous rank's last one
    comm_bytes: dict[str, int] = field(default_factory=dict)  # per layer, this step


def shard(batch: dict, ctx: SPContext) -> dict:
    """This rank's slice of a packed batch ([1, T] tensors and cu_seqlens); fills ``ctx``."""
    ids = batch["input_ids"]
    T = ids.shape[1]
    if T % ctx.size:
        raise ValueError(f"sequence parallelism: the packed row of {T} tokens does not split into {ctx.size} equal slices")
    n = T // ctx.size
    a, b = ctx.rank * n, (ctx.rank + 1) * n
    cu = batch["cu_seqlens"].to(torch.int64)
    inner = sorted({int(c) - a for c in cu.tolist() if a < c < b})
    local_cu = torch.tensor([0, *inner, n], dtype=torch.int32)
    ctx.slice_start, ctx.total_len, ctx.global_cu = a, T, cu
    ctx.segment_positions = positions_from_cu_seqlens(cu, T)[:, a:b]
    ctx.continues = a > 0 and a not in set(cu.tolist())
    ctx.comm_bytes = {}
    out = {k: v[:, a:b] for k, v in batch.items() if k != "cu_seqlens"}
    out["cu_seqlens"] = local_cu
    return out


class _AllGather(torch.autograd.Function):
    """All-gather inside a group; the backward sums every rank's gradients (an all-reduce, which
    gloo supports in subgroups; torch.distributed.nn's version resolves ranks globally there)."""

    @staticmethod
    def forward(ctx, x, group, rank, size):
        ctx.group, ctx.rank = group, rank
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None


def _gather(x: torch.Tensor, ctx: SPContext) -> tuple[list[torch.Tensor], torch.Tensor]:
    """All-gather with autograd, and a zero ``tie`` to add to the layer's output: every rank must
    back-propagate through every collective (in the same order), including ranks that do not
    use what they gathered (rank 0 needs no halo), or the backward's collectives deadlock."""
    stacked = _AllGather.apply(x.contiguous(), ctx.group, ctx.rank, ctx.size)
    return list(stacked.unbind(0)), stacked.sum() * 0.0


def _gather_const(x: torch.Tensor, ctx: SPContext) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(ctx.size)]
    dist.all_gather(out, x.contiguous(), group=ctx.group)
    return out


def _count(ctx: SPContext, name: str, *tensors: torch.Tensor) -> None:
    ctx.comm_bytes[name] = ctx.comm_bytes.get(name, 0) + sum(t.numel() * t.element_size() for t in tensors) * ctx.size


def _project_qkv(self: BLAMixer | SoftmaxMixer, x, ctx: SPContext):
    """q, k, v [B, T, heads, d] of this rank's slice; a short convolution takes the previous
    rank's last kernel - 1 inputs as its halo."""
    B, T, _ = x.shape
    H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
    if self.conv is None:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    else:
        K = self.conv.kernel
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        tails, tie = _gather(qkv[:, T - (K - 1) :], ctx)  # everyone's last K-1 inputs: the halos
        _count(ctx, self._sp_name + ".conv", tails[0])
        halo = tails[ctx.rank - 1] if ctx.rank > 0 else torch.zeros_like(tails[0])
        qkv, _ = self.conv(qkv + tie, ctx.segment_positions.to(x.device), halo)
        q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
    return q.view(B, T, H, d), k.view(B, T, Hkv, d), v.view(B, T, Hkv, d)


def _bla_forward(self: BLAMixer, x, positions, cu_seqlens=None, cache=None):
    ctx: SPContext = self._sp
    if cache is not None:
        raise ValueError("sequence parallelism is for training and scoring, not decoding with a cache")
    B, T, _ = x.shape
    H, Hkv, d, m = self.n_heads, self.n_kv_heads, self.head_dim, self.slots
    q, k, v = _project_qkv(self, x, ctx)
    if self.cfg.bla.rope:
        q, k = apply_rope(q, positions, self.cfg.rope_theta), apply_rope(k, positions, self.cfg.rope_theta)

    cu = cu_seqlens.to(torch.int64)
    last = int(cu[-2])
    # Lambda: the last segment's final state from zero; Gamma: its decay (positions only)
    _, (lam_k, lam_v) = bla_attention(
        q[:, last:], k[:, last:], v[:, last:], self.windows, m, output_final_state=True,
        offset=int(positions[0, last]), backend=self.cfg.bla.backend, gates=self.cfg.bla.gates,
    )  # fmt: skip
    _, alpha, _ = dirichlet_gates(positions[0, last:], torch.tensor(self.windows, device=x.device), m, gates=self.cfg.bla.gates)
    gamma = alpha.prod(dim=0).to(lam_k.dtype)  # [Hkv, m]; exactly 0 where a slot reset
    single = len(cu) == 2
    flags = torch.tensor([float(ctx.continues), float(single)], device=x.device)
    nk = lam_k.numel()
    packed, tie = _gather(torch.cat([lam_k.reshape(-1), lam_v.reshape(-1)]), ctx)  # one collective
    lams_k = [t[:nk].view_as(lam_k) for t in packed]
    lams_v = [t[nk:].view_as(lam_v) for t in packed]
    gammas, all_flags = _gather_const(gamma, ctx), _gather_const(flags, ctx)
    _count(ctx, self._sp_name + ".bla", lam_k, lam_v, gamma)
    S = None  # state at the end of rank i's slice, i < this rank
    for i in range(ctx.rank):
        cont_i, single_i = bool(all_flags[i][0]), bool(all_flags[i][1])
        if cont_i and single_i and S is not None:
            S = (gammas[i][None, :, :, None] * S[0] + lams_k[i], gammas[i][None, :, :, None] * S[1] + lams_v[i])
        else:
            S = (lams_k[i], lams_v[i])
    N = len(cu) - 1
    init_k = lam_k.new_zeros(N, Hkv, m, d)
    init_v = lam_v.new_zeros(N, Hkv, m, v.shape[-1])
    if ctx.continues and S is not None:
        init_k = torch.cat([S[0], init_k[1:]])
        init_v = torch.cat([S[1], init_v[1:]])
    o, _ = bla_attention(q, k, v, self.windows, m, initial_state=(init_k, init_v), cu_seqlens=cu_seqlens,
                         offset=_start_positions(positions, cu_seqlens), backend=self.cfg.bla.backend,
                         gates=self.cfg.bla.gates)  # fmt: skip
    o = o + tie
    if self.out_norm is not None:
        o = self.out_norm(o)
    o = o.reshape(B, T, H * d)
    if self.gate_proj is not None:
        o = o * F.silu(self.gate_proj(x))
    return self.o_proj(o), None


def _softmax_forward(self: SoftmaxMixer, x, positions, cu_seqlens=None, cache=None):
    ctx: SPContext = self._sp
    if cache is not None:
        raise ValueError("sequence parallelism is for training and scoring, not decoding with a cache")
    B, T, _ = x.shape
    H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
    q, k, v = _project_qkv(self, x, ctx)
    q = apply_rope(q, positions, self.cfg.rope_theta).transpose(1, 2)
    k = apply_rope(k, positions, self.cfg.rope_theta).transpose(1, 2)
    v = v.transpose(1, 2)
    kv = torch.cat([k, v], dim=-1)
    q_idx = ctx.slice_start + torch.arange(T, device=x.device)
    if self.window is None:  # full attention: every rank's keys and values
        kv_parts, _ = _gather(kv, ctx)  # every part feeds the attention below
        kv_all = torch.cat(kv_parts, dim=2)
        k_idx = torch.arange(ctx.total_len, device=x.device)
        _count(ctx, self._sp_name + ".attn", k, v)
    else:  # SWA: a halo of the last W - 1 keys and values, from as many previous ranks as it spans
        halo = min(self.window - 1, T)
        tails, tie = _gather(kv[:, :, T - halo :], ctx)
        _count(ctx, self._sp_name + ".swa", tails[0])
        first = max(0, ctx.rank - -(-(self.window - 1) // T))  # ceil((W - 1) / T) ranks back
        kv_all = torch.cat([*tails[first : ctx.rank], kv + tie], dim=2)
        k_idx = torch.cat([torch.arange((i + 1) * T - halo, (i + 1) * T, device=x.device) for i in range(first, ctx.rank)]
                          + [q_idx])  # fmt: skip
    k_all, v_all = kv_all[..., :d], kv_all[..., d:]
    doc = _document_ids(ctx.global_cu, ctx.total_len, x.device)[0]
    allowed = (k_idx[None, :] <= q_idx[:, None]) & (doc[k_idx][None, :] == doc[q_idx][:, None])
    if self.window is not None:
        allowed &= q_idx[:, None] - k_idx[None, :] < self.window
    o = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=allowed[None, None], enable_gqa=Hkv != H)
    return self.o_proj(o.transpose(1, 2).reshape(B, T, H * d)), None


def enable(model, ctx: SPContext) -> SPContext:
    """Make every mixer of ``model`` sequence-parallel over ``ctx``'s group (in place)."""
    unsupported = sorted({b.kind for b in model.blocks} - {"bla", "attn", "swa"})
    if unsupported:
        raise ValueError(f"sequence parallelism supports bla, attn and swa layers, not {unsupported}")
    for i, block in enumerate(model.blocks):
        mixer = block.mixer
        mixer._sp, mixer._sp_name = ctx, f"layer{i}"
        forward = _bla_forward if isinstance(mixer, BLAMixer) else _softmax_forward
        mixer.forward = types.MethodType(forward, mixer)
    return ctx


def new_groups(sp_size: int) -> tuple[SPContext, int, int]:
    """Split the world into groups of ``sp_size`` consecutive ranks; returns this rank's context,
    its data-parallel index and the number of data-parallel groups."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % sp_size:
        raise ValueError(f"sequence_parallel_size={sp_size} does not divide the world size {world}")
    mine = None
    for g in range(world // sp_size):
        ranks = list(range(g * sp_size, (g + 1) * sp_size))
        group = dist.new_group(ranks)  # every rank takes part in creating every group
        if rank in ranks:
            mine = SPContext(group, rank - ranks[0], sp_size)
    return mine, rank // sp_size, world // sp_size
