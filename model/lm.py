"""The decoder-only LM: embeddings, pre-norm blocks (RMSNorm, token mixer, SwiGLU), final norm, head."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import flex
from .config import ModelConfig
from .gsa_mixer import GSAMixer  # noqa: F401  (importing a kind's module registers it: gsa here, bla/attn/swa below)
from .layers import RMSNorm, SwiGLU, rope_table, upcast
from .loss import IGNORE, linear_cross_entropy
from .mixers import positions_from_cu_seqlens
from .registry import mixer_kind


@dataclass
class LMOutput:
    logits: torch.Tensor | None  # [B, T, vocab]; None when the loss went through the head in chunks
    loss: torch.Tensor | None = None
    cache: "DecodeCache | None" = None


@dataclass
class DecodeCache:
    """Per-layer caches plus the number of tokens consumed: the next token's position, an int
    when every row has consumed as many, else one per row (a batch of prompts of other lengths,
    each with its own position and so its own BLA phase)."""

    layers: list
    length: int | torch.Tensor = 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)

    @staticmethod
    def stack(caches: list["DecodeCache"]) -> "DecodeCache":
        """The rows of several caches (e.g. prompts prefilled one by one) as one batch to decode together."""
        if not caches:
            raise ValueError("DecodeCache.stack needs at least one cache")
        layers = [type(parts[0]).stack(list(parts)) for parts in zip(*(c.layers for c in caches))]
        rows = [c.rows() for c in caches]
        device = next((t.device for t in _tensors(layers)), torch.device("cpu"))
        lengths = torch.cat([torch.as_tensor(c.length, device=device).expand(n) for c, n in zip(caches, rows)])
        return DecodeCache(layers, lengths)

    def rows(self) -> int:
        if isinstance(self.length, torch.Tensor):
            return self.length.numel()
        first = next(_tensors(self.layers), None)
        if first is None:
            raise ValueError("an empty decode cache has no rows yet: prefill it first")
        return first.shape[0]


def _tensors(layers: list):
    for layer in layers:
        for value in vars(layer).values():
            yield from (v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, torch.Tensor))


class Head(nn.Linear):
    """The output projection; given targets, the loss itself through ``linear_cross_entropy`` (a
    module call either way, so ZeRO-3 gathers the weight as for any layer)."""

    loss_compile: dict | None = None  # torch.compile options of the chunked loss (set by BLALM.compile_blocks)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, loss_chunk: int = 0) -> torch.Tensor:
        if targets is None:
            return super().forward(x)
        return linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.weight, targets.reshape(-1), loss_chunk, self.loss_compile)


CHECKPOINTING = ("none", "block", "ops")


def _saved_by_ops_policy(ctx, op, *args, **kwargs):
    """``ops`` checkpointing: keep the outputs of matrix products and token mixers (costly to
    recompute), recompute the rest (norms, activations, RoPE, gates: cheap, and most of the
    activation memory). Called for every op of a checkpointed block: a set lookup."""
    from torch.utils.checkpoint import CheckpointPolicy

    costly = op in _costly_aten_ops() or getattr(op, "name", str)() == "bla::chunk_fwd"  # BLA (bla.kernels.triton_ops)
    return CheckpointPolicy.MUST_SAVE if costly else CheckpointPolicy.PREFER_RECOMPUTE


@functools.lru_cache(maxsize=1)
def _costly_aten_ops() -> frozenset:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.linear.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):  # fmt: skip
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    if hasattr(torch.ops.higher_order, "flex_attention"):  # packed or windowed attention in compiled CUDA blocks (bla.model.flex)
        ops.add(torch.ops.higher_order.flex_attention)
    flex.load_varlen()
    if flex.varlen is not None and hasattr(torch.ops.torch_attn, "_varlen_attn"):  # the same through flash's varlen kernel
        ops.add(torch.ops.torch_attn._varlen_attn.default)
    return frozenset(ops)


class Block(nn.Module):
    checkpointing = "none"  # activation checkpointing in training: none | block (all recomputed) | ops (see CHECKPOINTING)

    def __init__(self, cfg: ModelConfig, mixer: str):
        super().__init__()
        self.kind = mixer
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = mixer_kind(mixer).build(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_hidden)

    def forward(self, x, positions, cu_seqlens=None, cache=None, rope=None):
        if self.checkpointing == "none" or cache is not None or not (self.training and torch.is_grad_enabled()):
            return self._forward(x, positions, cu_seqlens, cache, rope)
        extra = {}
        if self.checkpointing == "ops":
            from torch.utils.checkpoint import create_selective_checkpoint_contexts

            extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _saved_by_ops_policy)
        return torch.utils.checkpoint.checkpoint(self._forward, x, positions, cu_seqlens, None, rope, use_reentrant=False, **extra)

    def _forward(self, x, positions, cu_seqlens, cache, rope):
        y, cache = self.mixer(self.mixer_norm(x), positions, cu_seqlens, cache, rope)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), cache


class BLALM(nn.Module):
    """Decoder-only LM whose token mixers come from ``cfg.layer_pattern``.

    ``forward(input_ids, cu_seqlens=None, targets=None)``: ``targets`` are the next tokens at the
    same positions as ``input_ids`` (already shifted: ``model(ids[:, :-1], targets=ids[:, 1:])``;
    -100 is ignored). Named apart from Hugging Face's unshifted ``labels`` (which the exported
    class takes) so neither is passed for the other. With ``cache`` (from
    ``new_cache``) the tokens continue the cached sequences: prefill and decoding.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, kind) for kind in cfg.mixers)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = Head(cfg.d_model, cfg.vocab_size, bias=False)
        self.uses_rope = any(kind in ("attn", "swa") for kind in cfg.mixers) or cfg.bla.rope
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # residual projections scaled by depth (GPT-2)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=cfg.init_std / (2 * cfg.n_layers) ** 0.5)

    def set_checkpointing(self, policy: str) -> None:
        """Activation checkpointing of every block in training: one of ``CHECKPOINTING``."""
        if policy not in CHECKPOINTING:
            raise ValueError(f"activation checkpointing must be one of {CHECKPOINTING}, got {policy!r}")
        for block in self.blocks:
            block.checkpointing = policy

    def compile_blocks(self, **options) -> None:
        """``torch.compile`` each block in place (parameter names unchanged, so checkpoints and
        exports are those of the eager model), and each chunk of the chunked loss (its passes over
        the logits fused; ``bla.model.loss``). Blocks of one kind share their compiled code; the
        embedding stays eager (a lookup). ``mode`` applies to the blocks only."""
        for block in self.blocks:
            block.compile(**options)
        self.head.loss_compile = {k: v for k, v in options.items() if k != "mode"}

    def _init(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)

    def new_cache(self, max_context: int | None = None) -> DecodeCache:
        """Empty decode caches; ``max_context`` turns full-attention caches into a sliding context
        of that many tokens (BLA and SWA caches are bounded already)."""

        return DecodeCache([b.mixer.new_cache(max_context) for b in self.blocks])

    def forward(
        self,
        input_ids: torch.Tensor,
        cu_seqlens: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        cache: DecodeCache | None = None,
        positions: torch.Tensor | None = None,
        loss_chunk: int = 0,
        logits_to_keep: int = 0,
        labels: None = None,
    ) -> LMOutput:
        """``loss_chunk`` > 0 (with ``targets``): the loss through the head ``loss_chunk`` tokens at a
        time (``bla.model.loss``), never holding [tokens, vocab] logits; ``logits`` is then None.
        ``logits_to_keep`` > 0: the logits of the last that many positions only (a prompt's prefill
        needs its last: at 128k tokens the whole [T, vocab] would be 8 GB in bf16)."""
        if labels is not None:
            raise TypeError("BLALM takes targets= (the next tokens, already shifted: model(ids[:, :-1], "
                            "targets=ids[:, 1:])); labels= (unshifted, Hugging Face's convention) is for the exported class")
        if logits_to_keep and targets is not None:
            raise ValueError("logits_to_keep is for generation: targets need the logits of every position")
        B, T = input_ids.shape
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        if cache is not None and cu_seqlens is not None:
            raise ValueError("cache and cu_seqlens cannot be combined: decoding runs one sequence per row")
        if cu_seqlens is not None:  # one int64 copy on the device for every layer (the kernels key their layout on it)
            cu_seqlens = cu_seqlens.to(device=input_ids.device, dtype=torch.int64)
        if positions is None:
            if cu_seqlens is not None:
                if B != 1:
                    raise ValueError(f"cu_seqlens needs the documents packed into batch 1, got B={B}")
                positions = positions_from_cu_seqlens(cu_seqlens.to(input_ids.device), T)
            else:
                start = cache.length if cache is not None else 0
                if isinstance(start, torch.Tensor):  # one position per row
                    positions = start.to(input_ids.device)[:, None] + torch.arange(T, device=input_ids.device)
                else:
                    positions = torch.arange(start, start + T, device=input_ids.device)[None].expand(B, T)
        x = self.embed(input_ids)
        rope = rope_table(positions, self.cfg.head_dim, self.cfg.rope_theta) if self.uses_rope else None
        layer_caches = []
        for i, block in enumerate(self.blocks):
            x, c = block(x, positions, cu_seqlens, cache.layers[i] if cache is not None else None, rope)
            layer_caches.append(c)
        new_cache = DecodeCache(layer_caches, cache.length + T) if cache is not None else None
        if targets is not None and loss_chunk > 0:
            return LMOutput(None, self.head(self.norm(x), targets, loss_chunk), new_cache)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(upcast(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
        return LMOutput(logits, loss, new_cache)

