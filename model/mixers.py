"""Token mixers: the BLA layer (spec section 3) and softmax attention (full causal or sliding
window), registered as the kinds ``bla``, ``attn`` and ``swa`` (``bla.model.registry``).

Every mixer takes ``x [B, T, D]``, the position of each token inside its document
(``positions [B, T]``), optional packing (``cu_seqlens``, with B = 1), an optional cache and
RoPE's (cos, sin) table for those positions (``rope``, built once per forward), and returns
``(y, cache)``. With a cache the tokens continue the cached sequence (prefill then
decode); the cache of a BLA layer has a constant size, that of ``attn`` grows with the
context and that of ``swa`` is a rolling window.

Each forward runs project -> exchange -> mix -> output once. ``exchange`` is None on one
device; sequence parallelism (``bla.train.sequence_parallel``) sets it on every layer to what
crosses a slice boundary: the short convolution's halo, BLA's start states (a scan over the
slices' states) or the keys and values of earlier slices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bla.kernels import bla_attention, bla_step, bla_step_
from bla.kernels.checks import normalise_windows

from .config import ModelConfig
from .flex import flex_applies, load_varlen, masked_attention, varlen_applies, varlen_attention
from .layers import RMSNorm, ShortConv, apply_rope
from .registry import MixerKind, projection_params, register


@dataclass
class BLACache:
    state: tuple[torch.Tensor, torch.Tensor] | None = None  # (K [B, H_kv, m, d_k], V [B, H_kv, m, d_v])
    conv: torch.Tensor | None = None  # last (kernel - 1) q/k/v projections [B, kernel-1, 3D']

    def nbytes(self) -> int:
        tensors = list(self.state or ()) + ([self.conv] if self.conv is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    @staticmethod
    def stack(caches: list["BLACache"]) -> "BLACache":
        """The rows of several caches as one batch (the slot state has one size whatever the length)."""
        state = None if caches[0].state is None else tuple(torch.cat(part) for part in zip(*(c.state for c in caches)))
        return BLACache(state, _cat_rows([c.conv for c in caches]))


@dataclass
class KVCache:
    k: torch.Tensor | None = None  # [B, H_kv, L, d] (after RoPE)
    v: torch.Tensor | None = None
    window: int | None = None  # keep at most window - 1 past tokens (swa)
    conv: torch.Tensor | None = None  # with attn_short_conv: the last (kernel - 1) q/k/v projections

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.conv) if t is not None)

    @staticmethod
    def stack(caches: list["KVCache"]) -> "KVCache":
        """The rows of several caches as one batch: shorter rows are padded on the left (before
        their first key), where the keys' positions are negative and the mask leaves them out."""
        if caches[0].k is None:
            return KVCache(None, None, caches[0].window, _cat_rows([c.conv for c in caches]))
        longest = max(c.k.shape[2] for c in caches)
        k, v = ([F.pad(t, (0, 0, longest - t.shape[2], 0)) for t in ts] for ts in ([c.k for c in caches], [c.v for c in caches]))
        return KVCache(torch.cat(k), torch.cat(v), caches[0].window, _cat_rows([c.conv for c in caches]))


def _cat_rows(tensors: list) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(tensors)


FUSE_PROJECTIONS = True  # compiled: one matmul for the input projections (off: benchmarks/training.py's A/B)


def input_projections(mixer: nn.Module, x, fused: bool | None = None) -> list[torch.Tensor]:
    """x through the layer's input projections: q, k, v, and the output gate's where the layer has
    one. ``fused`` (None: when compiled, on rows of more than one token) makes them one matmul over
    the weights stacked, so x is read once and the backward gives x one gradient instead of a sum
    of four (the plain baseline projects q, k and v as one too). Eager keeps one call a module:
    ZeRO-3 (eager only) gathers a weight in its own module's forward hook; the weights and
    state-dict keys stay as they are either way."""
    mods = [mixer.q_proj, mixer.k_proj, mixer.v_proj]
    if getattr(mixer, "gate_proj", None) is not None:
        mods.append(mixer.gate_proj)
    if fused is None:  # not for one token a row (decoding): stacking the weights would cost more than it saves
        fused = FUSE_PROJECTIONS and torch.compiler.is_compiling() and x.shape[-2] > 1
    if not fused:
        return [m(x) for m in mods]
    weight = torch.cat([m.weight for m in mods])
    return list(F.linear(x, weight).split([m.out_features for m in mods], dim=-1))


def project_qkv(mixer: nn.Module, x, positions, cu_seqlens, conv_past):
    """q [B, T, H, d], k and v [B, T, H_kv, d] through the mixer's short convolution if it has one,
    the convolution's decode buffer (None without one) and the output gate's pre-activation (None
    without one). Under sequence parallelism the convolution's past is the previous slice's last
    inputs (the exchange's halo)."""
    B, T, _ = x.shape
    H, Hkv, d = mixer.n_heads, mixer.n_kv_heads, mixer.head_dim
    conv_buf = None
    q, k, v, *gate = input_projections(mixer, x)
    if mixer.conv is not None:
        qkv = torch.cat([q, k, v], dim=-1)
        if mixer.exchange is not None:
            conv_past = mixer.exchange.conv_halo(qkv, mixer.conv.kernel)
            conv_pos = mixer.exchange.segment_positions.to(x.device)
        else:
            # the convolution reads back only inside a segment: a packed row's previous segment
            # is another document, or another part of the stream, even where positions continue
            conv_pos = positions if cu_seqlens is None else positions_from_cu_seqlens(cu_seqlens, T)
        qkv, conv_buf = mixer.conv(qkv, conv_pos, conv_past)
        q, k, v = qkv.split([H * d, Hkv * d, Hkv * d], dim=-1)
    return q.view(B, T, H, d), k.view(B, T, Hkv, d), v.view(B, T, Hkv, d), conv_buf, (gate[0] if gate else None)


def conv_static_buffer(mixer: nn.Module, batch: int, device, dtype) -> dict:
    """The short convolution's decode buffer for ``bla.model.decode`` (empty without one)."""
    if mixer.conv is None:
        return {}
    return {"conv": torch.zeros(batch, mixer.conv.kernel - 1, mixer.conv.weight.shape[0], device=device, dtype=dtype)}


def load_conv_static(mixer: nn.Module, buf: dict, row: int, cache) -> None:
    if mixer.conv is not None:
        buf["conv"][row].copy_(cache.conv[0])


def project_step(mixer: nn.Module, x, position, buf: dict):
    """q, k, v and the output gate's pre-activation (None without one) of one token per row (x [B, 1, D],
    position [B]) for a static decode step, the convolution's buffer updated in place."""
    q, k, v, conv_buf, gate = project_qkv(mixer, x, position[:, None], None, buf.get("conv"))
    if conv_buf is not None:
        buf["conv"].copy_(conv_buf)
    return q, k, v, gate


def _no_cache_under_exchange(mixer: nn.Module, cache) -> None:
    if mixer.exchange is not None and cache is not None:
        raise ValueError("sequence parallelism is for training and scoring, not decoding with a cache")


WRITE_BIAS = 3.0  # beta = sigmoid(3) = 0.95 at the start: nearly plain BLA's full writes
FORGET_BIAS = 5.0  # gamma = sigmoid(5) ** (1/16) = 0.9996 at the start: 0.42 over 2048 tokens
FORGET_TAU = 16  # gamma = sigmoid(.) ** (1 / tau), as GSA damps its forget gate


class BLAMixer(nn.Module):
    exchange = None  # sequence parallelism's "state_scan" exchange, when set

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, H, Hkv, d = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.cfg = cfg
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, d
        # checked once, here (the config's checks and the operator's own): every call then skips
        # the value checks that would read cu_seqlens and offsets back from the device
        self.windows = list(normalise_windows(cfg.bla_windows(), cfg.bla.slots, H, Hkv))
        self.slots = cfg.bla.slots
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * d, bias=False)
        self.conv = ShortConv((H + 2 * Hkv) * d, cfg.bla.short_conv) if cfg.bla.short_conv else None
        self.out_norm = RMSNorm(d, cfg.norm_eps) if cfg.bla.output_norm else None
        self.q_norm = RMSNorm(d, cfg.norm_eps) if cfg.bla.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.norm_eps) if cfg.bla.qk_norm else None
        self.gate_proj = nn.Linear(D, H * d, bias=False) if cfg.bla.output_gate else None
        self.o_proj = nn.Linear(H * d, D, bias=False)
        # spec section 6: data-steered writes and forgetting (one scalar per token and kv head), staggered slots
        self.beta_proj = _gate_projection(D, Hkv, WRITE_BIAS) if cfg.bla.write_gate else None
        self.gamma_proj = _gate_projection(D, Hkv, FORGET_BIAS) if cfg.bla.forget_gate else None
        self.shifts = cfg.bla_phase_shifts()

    def data_gates(self, x: torch.Tensor) -> dict:
        """``beta`` and ``log_gamma`` [B, T, H_kv] for the operator, those switched on: float32
        (float64 in a float64 model, where a float32 rounding would be the largest error)."""
        gates, dtype = {}, torch.promote_types(x.dtype, torch.float32)
        if self.beta_proj is not None:
            gates["beta"] = torch.sigmoid(self.beta_proj(x).to(dtype))
        if self.gamma_proj is not None:
            gates["log_gamma"] = F.logsigmoid(self.gamma_proj(x).to(dtype)) / FORGET_TAU
        return gates

    def new_cache(self, max_context: int | None = None) -> BLACache:
        return BLACache()

    def forward(self, x, positions, cu_seqlens=None, cache: BLACache | None = None, rope=None):
        _no_cache_under_exchange(self, cache)
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        q, k, v, conv_buf, gate = project_qkv(self, x, positions, cu_seqlens, cache.conv if cache is not None else None)
        q, k = self.normed(q, k)
        if self.cfg.bla.rope:
            q = apply_rope(q, positions, self.cfg.rope_theta, rope)
            k = apply_rope(k, positions, self.cfg.rope_theta, rope)
        state = cache.state if cache is not None else None
        gates = self.data_gates(x)
        if self.exchange is not None:  # each document's start state: from the earlier slices
            state = self.exchange.start_states(self, q, k, v, positions, cu_seqlens, gates)
        o, state = self.mix(q, k, v, x, positions, cu_seqlens, state, cache is not None, gates)
        if self.out_norm is not None:
            o = self.out_norm(o)
        o = o.reshape(B, T, H * d)
        if gate is not None:
            o = o * F.silu(gate)
        new_cache = BLACache(state, conv_buf) if cache is not None else None
        return self.o_proj(o), new_cache

    def normed(self, q, k):
        """q and k through their per-head RMSNorms (``bla.qk_norm``), else as they are."""
        if self.q_norm is None:
            return q, k
        return self.q_norm(q), self.k_norm(k)

    def static_buffers(self, batch: int, max_context: int, device, dtype) -> dict:
        """Preallocated decode state (``bla.model.decode``): the fp32 slot state and the conv's inputs."""
        Hkv, d, m = self.n_kv_heads, self.head_dim, self.slots
        return {"K": torch.zeros(batch, Hkv, m, d, device=device), "V": torch.zeros(batch, Hkv, m, d, device=device),
                **conv_static_buffer(self, batch, device, dtype)}  # fmt: skip

    def load_static(self, buf: dict, row: int, cache: BLACache, length: int) -> None:
        """Row ``row`` of ``buf`` from a prefilled one-row cache."""
        buf["K"][row].copy_(cache.state[0][0])
        buf["V"][row].copy_(cache.state[1][0])
        load_conv_static(self, buf, row, cache)

    def grow_static(self, buf: dict, max_context: int) -> dict:
        return buf  # a constant-size state

    def decode_step(self, x, position, buf: dict):
        """One token per row (x [B, 1, D], position [B]) over the static buffers, updated in place:
        the same projections, convolution and gates as ``forward``, no allocation that depends on
        the context (so the step can be captured as a CUDA graph)."""
        B = x.shape[0]
        positions = position[:, None]
        q, k, v, gate = project_step(self, x, position, buf)
        q, k = self.normed(q, k)
        if self.cfg.bla.rope:
            q = apply_rope(q, positions, self.cfg.rope_theta)
            k = apply_rope(k, positions, self.cfg.rope_theta)
        gates = {name: g[:, 0] for name, g in self.data_gates(x).items()}
        o = bla_step_(q[:, 0], k[:, 0], v[:, 0], (buf["K"], buf["V"]), position, self.windows, self.slots, gates=self.cfg.bla.gates,
                      phase_shift=self.shifts, **gates)  # fmt: skip
        o = o[:, None]
        if self.out_norm is not None:
            o = self.out_norm(o)
        o = o.reshape(B, 1, -1)
        if gate is not None:
            o = o * F.silu(gate)
        return self.o_proj(o)

    def mix(self, q, k, v, x, positions, cu_seqlens, state, keep_state: bool, gates: dict):
        """BLA over [B, T, heads, d]: one decode step, or whole sequences (chunked) from ``state``
        (per sequence, or per packed document); ``gates`` from ``data_gates(x)``."""
        if keep_state and q.shape[1] == 1:
            o, state = bla_step(q[:, 0], k[:, 0], v[:, 0], state, positions[:, 0], self.windows, self.slots,
                                gates=self.cfg.bla.gates, validate_values=False, phase_shift=self.shifts,
                                **{name: g[:, 0] for name, g in gates.items()})  # fmt: skip
            return o[:, None], state
        return bla_attention(
            q, k, v, self.windows, self.slots,
            initial_state=state,
            output_final_state=keep_state,
            cu_seqlens=cu_seqlens,
            offset=start_positions(positions, cu_seqlens),
            backend=self.cfg.bla.backend,
            gates=self.cfg.bla.gates,
            validate_values=False,
            phase_shift=self.shifts,
            **gates,
        )  # fmt: skip


def _gate_projection(d_model: int, kv_heads: int, bias: float) -> nn.Linear:
    """One scalar gate per kv head from the layer input; the bias sets where it starts (the
    model's init draws the weight)."""
    proj = nn.Linear(d_model, kv_heads)
    nn.init.constant_(proj.bias, bias)
    return proj


def bla_params(cfg: ModelConfig) -> int:
    D, H, Hkv, d, b = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.bla
    n = projection_params(cfg)
    n += H * d * D if b.output_gate else 0
    n += (int(b.write_gate) + int(b.forget_gate)) * Hkv * (D + 1)
    n += (H + 2 * Hkv) * d * b.short_conv
    return n + (d if b.output_norm else 0) + (2 * d if b.qk_norm else 0)


def slot_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of reading and writing m slots of d_k + d_v (spec section 3)."""
    return 4 * cfg.n_heads * cfg.bla.slots * (cfg.head_dim + cfg.head_dim)


def slot_state(cfg: ModelConfig, seq_len: int) -> int:
    return cfg.kv_heads * cfg.bla.slots * (cfg.head_dim + cfg.head_dim)


def _rope_needs_even_head_dim(cfg: ModelConfig) -> list[str]:
    return [f"RoPE needs an even head_dim, got {cfg.head_dim}"] if cfg.head_dim % 2 else []


def bla_validate(cfg: ModelConfig) -> list[str]:
    return _rope_needs_even_head_dim(cfg) if cfg.bla.rope else []


register(MixerKind(
    "bla", BLAMixer, bla_params, slot_flops, slot_state, validate=bla_validate,
    exchange="state_scan",  # Blurry Window Attention: m slots per head over a window of W tokens
))  # fmt: skip


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """[1, T] index of every token inside its segment of a packed row."""
    cu = cu_seqlens.to(torch.int64)
    t = torch.arange(T, device=cu.device)
    return (t - cu[document_ids(cu, T, cu.device)[0]])[None]


def start_positions(positions_BT: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Position of each sequence's (or packed document's) first token: BLA's phase offset."""
    if cu_seqlens is None:
        return positions_BT[:, 0]
    starts = cu_seqlens[:-1].to(positions_BT.device, torch.int64).clamp(max=positions_BT.shape[1] - 1)
    empty = cu_seqlens[1:] == cu_seqlens[:-1]
    return torch.where(empty.to(positions_BT.device), 0, positions_BT[0, starts])


def attention_mask(q_pos, k_pos, q_doc, k_doc, window: int | None) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk] mask: causal, same document, and within the window when given. Keys
    at negative positions do not exist (the left padding of a batch of caches of other lengths)."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    allowed = (diff >= 0) & (q_doc[:, :, None] == k_doc[:, None, :]) & (k_pos[:, None, :] >= 0)
    if window is not None:
        allowed &= diff < window
    return allowed[:, None]


class SoftmaxMixer(nn.Module):
    """Causal softmax attention with RoPE; ``window`` set makes it sliding-window (SWA)."""

    exchange = None  # sequence parallelism's "kv_gather" (attn) or "kv_halo" (swa) exchange, when set
    use_flex = staticmethod(flex_applies)  # masked attention through FlexAttention? (tests force it on the CPU)
    use_varlen = staticmethod(varlen_applies)  # through flash's variable-length kernel? (tests give the CPU a stand-in)

    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        D, H, Hkv, d = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.cfg, self.window = cfg, window
        self.n_heads, self.n_kv_heads, self.head_dim = H, Hkv, d
        load_varlen()  # flash's variable-length kernel, for packed documents and windows on CUDA
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * d, bias=False)
        self.conv = ShortConv((H + 2 * Hkv) * d, cfg.attn_short_conv) if cfg.attn_short_conv else None
        self.o_proj = nn.Linear(H * d, D, bias=False)

    def new_cache(self, max_context: int | None = None) -> KVCache:
        """Empty; full attention keeps every key unless ``max_context`` makes it a sliding context."""
        return KVCache(window=self.window if self.window is not None else max_context)

    def static_buffers(self, batch: int, max_context: int, device, dtype) -> dict:
        """Preallocated keys and values (``bla.model.decode``): ``max_context`` slots for attn, a
        ring of ``window`` for swa; each slot's key position (-1: empty) and the conv's inputs."""
        L = max_context if self.window is None else min(self.window, max_context)
        Hkv, d = self.n_kv_heads, self.head_dim
        return {"k": torch.zeros(batch, Hkv, L, d, device=device, dtype=dtype), "v": torch.zeros(batch, Hkv, L, d, device=device, dtype=dtype),
                "key_pos": torch.full((batch, L), -1, dtype=torch.long, device=device), **conv_static_buffer(self, batch, device, dtype)}  # fmt: skip

    def load_static(self, buf: dict, row: int, cache: KVCache, length: int) -> None:
        """Row ``row`` of ``buf`` from a one-row cache of ``length`` tokens (its keys right-aligned;
        left padding, at negative positions, is left out)."""
        L = buf["k"].shape[2]
        if cache.k is not None:
            n = cache.k.shape[2]
            if self.window is None and length > L:
                raise ValueError(f"a prompt of {length} tokens does not fit a static cache of max_context={L}")
            pos = torch.arange(length - n, length, device=buf["k"].device)
            real = (pos >= 0) & (pos >= length - L)
            pos, keys, values = pos[real], cache.k[0][:, real], cache.v[0][:, real]
            slot = pos % L
            buf["k"][row][:, slot] = keys
            buf["v"][row][:, slot] = values
            buf["key_pos"][row][slot] = pos
        load_conv_static(self, buf, row, cache)

    def grow_static(self, buf: dict, max_context: int) -> dict:
        """The buffers for a larger ``max_context``, holding the same keys. A buffer shorter than
        the window has never wrapped (every position is below its length: the decoder refuses to
        go past max_context), so each key keeps its slot."""
        B, _, L, _ = buf["k"].shape
        new = self.static_buffers(B, max_context, buf["k"].device, buf["k"].dtype)
        if new["k"].shape[2] == L:
            return buf
        new["k"][:, :, :L], new["v"][:, :, :L], new["key_pos"][:, :L] = buf["k"], buf["v"], buf["key_pos"]
        if "conv" in buf:
            new["conv"] = buf["conv"]
        return new

    def decode_step(self, x, position, buf: dict):
        """One token per row over the static buffers (see ``BLAMixer.decode_step``): its key and
        value go to slot position mod L, and the query reads every filled slot inside its window."""
        B = x.shape[0]
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        positions = position[:, None]
        q, k, v, _ = project_step(self, x, position, buf)
        q = apply_rope(q, positions, self.cfg.rope_theta).transpose(1, 2)
        k = apply_rope(k, positions, self.cfg.rope_theta).transpose(1, 2)
        L = buf["k"].shape[2]
        slot = (position % L)[:, None]
        index = slot[:, None, :, None].expand(B, Hkv, 1, d)
        buf["k"].scatter_(2, index, k)
        buf["v"].scatter_(2, index, v.transpose(1, 2))
        buf["key_pos"].scatter_(1, slot, positions)
        key_pos = buf["key_pos"]
        allowed = key_pos >= 0
        if self.window is not None:
            allowed &= positions - key_pos < self.window
        o = F.scaled_dot_product_attention(q, buf["k"], buf["v"], attn_mask=allowed[:, None, None, :], enable_gqa=Hkv != H)
        return self.o_proj(o.transpose(1, 2).reshape(B, 1, H * d))

    def forward(self, x, positions, cu_seqlens=None, cache: KVCache | None = None, rope=None):
        _no_cache_under_exchange(self, cache)
        B, T, _ = x.shape
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v, conv_buf, _ = project_qkv(self, x, positions, cu_seqlens, cache.conv if cache is not None else None)
        q = apply_rope(q, positions, self.cfg.rope_theta, rope).transpose(1, 2)
        k = apply_rope(k, positions, self.cfg.rope_theta, rope).transpose(1, 2)
        v = v.transpose(1, 2)

        new_cache = None
        # a full-attention cache may carry a sliding context (perplexity of long documents)
        window = self.window if self.window is not None else (cache.window if cache is not None else None)
        masked = cache is None and (cu_seqlens is not None or (window is not None and window < T))  # not plain causal
        o = mask = None
        if self.exchange is not None:  # earlier slices' keys and values, and the global mask
            k, v, mask = self.exchange.key_context(self, k, v)
        elif masked and self.use_varlen(q, window):
            # packed documents or a sliding window on CUDA: flash's variable-length kernel, no T x T mask
            o = varlen_attention(q, k, v, cu_seqlens, window, enable_gqa=Hkv != H)
        elif masked and self.use_flex(q):
            # the same, compiled on CUDA where flash's kernel does not apply: block-sparse FlexAttention
            doc = document_ids(cu_seqlens, T, x.device)[0] if cu_seqlens is not None else None
            o = masked_attention(q, k, v, doc, window, enable_gqa=Hkv != H)
        elif cu_seqlens is None and (window is None or window >= T) and (cache is None or cache.k is None):
            # plain causal (a prompt's prefill too): SDPA's own (flash) path, no T x T mask
            if cache is not None:
                keep = T if window is None else min(T, window - 1)
                new_cache = KVCache(k[:, :, T - keep :], v[:, :, T - keep :], window, conv_buf)
        else:
            k_pos = positions
            if cache is not None:
                if cache.k is not None:
                    past = cache.k.shape[2]
                    k, v = torch.cat([cache.k, k], dim=2), torch.cat([cache.v, v], dim=2)
                    k_pos = torch.cat([positions[:, :1] - past + torch.arange(past, device=x.device), positions], dim=1)
                keep = k.shape[2] if window is None else min(k.shape[2], window - 1)
                new_cache = KVCache(k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :], window, conv_buf)
            doc = document_ids(cu_seqlens, T, x.device) if cu_seqlens is not None else torch.zeros_like(positions)
            k_doc = torch.zeros_like(k_pos) if cu_seqlens is None else doc
            mask = attention_mask(positions, k_pos, doc, k_doc, window)
        if o is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=Hkv != H)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * d)), new_cache


def document_ids(cu_seqlens: torch.Tensor, T: int, device) -> torch.Tensor:
    """[1, T] index of each token's document."""
    starts = cu_seqlens.to(device)[1:-1]
    return torch.searchsorted(starts, torch.arange(T, device=device), right=True)[None]


def softmax_params(cfg: ModelConfig) -> int:
    return projection_params(cfg) + (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim * cfg.attn_short_conv


def _swa_keys(cfg: ModelConfig, seq_len: int) -> float:
    """Keys a query reads, min(W, t + 1), averaged over the sequence."""
    W, T = cfg.swa_window, seq_len
    return (min(W, T) * (min(W, T) + 1) / 2 + max(T - W, 0) * W) / T


register(MixerKind(
    "attn", lambda cfg: SoftmaxMixer(cfg, window=None), softmax_params,
    flops_per_token=lambda cfg, T: 2 * cfg.n_heads * cfg.head_dim * T,  # two products over half of the square
    state_elements=lambda cfg, T: cfg.kv_heads * T * 2 * cfg.head_dim,
    validate=_rope_needs_even_head_dim, exchange="kv_gather",  # causal softmax attention with RoPE
))  # fmt: skip
register(MixerKind(
    "swa", lambda cfg: SoftmaxMixer(cfg, window=cfg.swa_window), softmax_params,
    flops_per_token=lambda cfg, T: 4 * cfg.n_heads * cfg.head_dim * _swa_keys(cfg, T),
    state_elements=lambda cfg, T: cfg.kv_heads * min(cfg.swa_window, T) * 2 * cfg.head_dim,
    validate=_rope_needs_even_head_dim, exchange="kv_halo",  # sliding-window softmax attention (swa_window), RoPE
))  # fmt: skip
