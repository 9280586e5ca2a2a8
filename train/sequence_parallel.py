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

The model stays single-device: each mixer runs project -> exchange -> mix -> output, and
``enable`` sets every layer's ``exchange`` to the one its kind declares (``bla.model.registry``:
"state_scan", "kv_gather" or "kv_halo"); ``shard`` cuts a packed batch for a rank.
Tests: tests/test_sequence_parallel.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from bla.kernels import bla_attention, dirichlet_gates
from bla.model.mixers import attention_mask, document_ids, positions_from_cu_seqlens
from bla.model.registry import MIXERS, mixer_kind


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


class Exchange:
    """What crosses a slice boundary for one layer. Every exchange carries the short
    convolution's halo: the previous rank's last kernel - 1 inputs."""

    def __init__(self, ctx: SPContext, name: str):
        self.ctx, self.name = ctx, name

    @property
    def segment_positions(self) -> torch.Tensor:
        return self.ctx.segment_positions

    def conv_halo(self, qkv: torch.Tensor, kernel: int) -> torch.Tensor:
        tails, tie = _gather(qkv[:, qkv.shape[1] - (kernel - 1) :], self.ctx)  # everyone's last inputs
        _count(self.ctx, self.name + ".conv", tails[0])
        halo = tails[self.ctx.rank - 1] if self.ctx.rank > 0 else torch.zeros_like(tails[0])
        return halo + tie


class StateScan(Exchange):
    """BLA: each rank's last segment as (Gamma, Lambda), all-gathered and scanned into the start
    state of this rank's first document (zeros for the others)."""

    def start_states(self, mixer, q, k, v, positions, cu_seqlens, gates: dict | None = None):
        """``gates``: the mixer's data-dependent beta/log_gamma (spec section 6) [1, T, H_kv]."""
        ctx, windows, m = self.ctx, mixer.windows, mixer.slots
        Hkv, d = mixer.n_kv_heads, mixer.head_dim
        backend, gates_rule = mixer.cfg.bla.backend, mixer.cfg.bla.gates
        gates = gates or {}
        shifts = mixer.shifts
        cu = cu_seqlens.to(torch.int64)
        last = int(cu[-2])
        tail = {name: g[:, last:] for name, g in gates.items()}
        # Lambda: the last segment's final state from zero; Gamma: its decay (positions, and data when gated)
        _, (lam_k, lam_v) = bla_attention(q[:, last:], k[:, last:], v[:, last:], windows, m, output_final_state=True,
                                          offset=int(positions[0, last]), backend=backend, gates=gates_rule,
                                          phase_shift=shifts, **tail)  # fmt: skip
        shift_t = torch.tensor(shifts, device=q.device) if any(shifts) else None
        _, alpha, _ = dirichlet_gates(positions[0, last:], torch.tensor(windows, device=q.device), m, gates=gates_rule,
                                      shift=shift_t, beta=_first_row(tail.get("beta")), log_gamma=_first_row(tail.get("log_gamma")))  # fmt: skip
        gamma = alpha.prod(dim=0).to(lam_k.dtype)  # [Hkv, m]; exactly 0 where a slot reset
        flags = torch.tensor([float(ctx.continues), float(len(cu) == 2)], device=q.device)
        nk, nv = lam_k.numel(), lam_v.numel()
        if gates:  # Gamma depends on data: gathered with autograd beside Lambda
            packed, tie = _gather(torch.cat([lam_k.reshape(-1), lam_v.reshape(-1), gamma.reshape(-1)]), ctx)
            gammas = [t[nk + nv :].view_as(gamma) for t in packed]
        else:
            packed, tie = _gather(torch.cat([lam_k.reshape(-1), lam_v.reshape(-1)]), ctx)  # one collective
            gammas = _gather_const(gamma, ctx)
        lams_k = [t[:nk].view_as(lam_k) for t in packed]
        lams_v = [t[nk : nk + nv].view_as(lam_v) for t in packed]
        all_flags = _gather_const(flags, ctx)
        _count(ctx, self.name + ".bla", lam_k, lam_v, gamma)
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
        return init_k + tie, init_v + tie  # the tie: this rank back-propagates through the gather too


def _first_row(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x[0]


class KeyGather(Exchange):
    """Full attention: every rank's keys and values, attended under the global causal,
    same-document mask."""

    def key_context(self, mixer, k, v):
        ctx, T, d = self.ctx, k.shape[2], k.shape[-1]
        parts, _ = _gather(torch.cat([k, v], dim=-1), ctx)  # every part feeds the attention
        kv = torch.cat(parts, dim=2)
        _count(ctx, self.name + ".attn", k, v)
        k_idx = torch.arange(ctx.total_len, device=k.device)
        return kv[..., :d], kv[..., d:], self._mask(k_idx, T, None)

    def _mask(self, k_idx: torch.Tensor, T: int, window: int | None) -> torch.Tensor:
        ctx = self.ctx
        q_idx = ctx.slice_start + torch.arange(T, device=k_idx.device)
        doc = document_ids(ctx.global_cu, ctx.total_len, k_idx.device)[0]
        return attention_mask(q_idx[None], k_idx[None], doc[q_idx][None], doc[k_idx][None], window)


class KeyHalo(KeyGather):
    """SWA: a halo of the last W - 1 keys and values, from as many previous ranks as it spans."""

    def key_context(self, mixer, k, v):
        ctx, T, d, W = self.ctx, k.shape[2], k.shape[-1], mixer.window
        kv = torch.cat([k, v], dim=-1)
        halo = min(W - 1, T)
        tails, tie = _gather(kv[:, :, T - halo :], ctx)
        _count(ctx, self.name + ".swa", tails[0])
        first = max(0, ctx.rank - -(-(W - 1) // T))  # ceil((W - 1) / T) ranks back
        kv_all = torch.cat([*tails[first : ctx.rank], kv + tie], dim=2)
        k_idx = torch.cat([torch.arange((i + 1) * T - halo, (i + 1) * T, device=k.device) for i in range(first, ctx.rank)]
                          + [ctx.slice_start + torch.arange(T, device=k.device)])  # fmt: skip
        return kv_all[..., :d], kv_all[..., d:], self._mask(k_idx, T, W)


EXCHANGES = {"state_scan": StateScan, "kv_gather": KeyGather, "kv_halo": KeyHalo}


def enable(model, ctx: SPContext) -> SPContext:
    """Make every mixer of ``model`` sequence-parallel over ``ctx``'s group (in place): each layer
    gets the exchange its kind declares."""
    kinds = [mixer_kind(b.kind) for b in model.blocks]
    unsupported = sorted({k.name for k in kinds if k.exchange is None})
    if unsupported:
        supported = sorted(name for name, k in MIXERS.items() if k.exchange)
        raise ValueError(f"sequence parallelism supports {', '.join(supported)} layers, not {unsupported}")
    for i, (block, kind) in enumerate(zip(model.blocks, kinds)):
        block.mixer.exchange = EXCHANGES[kind.exchange](ctx, f"layer{i}")
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
