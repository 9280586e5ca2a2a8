"""Hugging Face model class of a bla-lm model (written by ``bla export``).

``BLAForCausalLM`` wraps bla-lm's own ``BLALM`` (in an export, the ``bla_*.py`` files beside this
one are copies of bla-lm's model and kernel sources, and ``bla export`` points the ``bla.model``
imports below at them; in the repository this module imports bla-lm itself), so the exported
model computes exactly what the training stack computed.

``generate()`` follows transformers' contract: the cache is a ``Cache`` (``BLAGenerationCache``,
holding bla-lm's per-layer decode caches: a BLA layer's is its constant-size slot state), it
comes and goes under the current keyword (``cache``; ``past_key_values`` is accepted too), and
after the prompt each step feeds the model one new token. A padded batch (``attention_mask``
with zeros, left padding for generation) is prefilled row by row on each row's own tokens and
then decoded together, every row at its own position: pad tokens never enter a BLA state or
shift its phase, and each row's result is the one it gets alone.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from bla.model.config import ModelConfig
from bla.model.layers import RMSNorm, ShortConv
from bla.model.decode import StaticDecoder, decodes_static_by_default
from bla.model.lm import BLALM, DecodeCache

from .configuration_bla import BLALMConfig

# the output field transformers reads the cache from: ``cache`` since 5.x's rename, else ``past_key_values``
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class BLAGenerationCache(Cache):
    """What ``generate()`` carries between steps: bla-lm's per-layer decode caches, and how many
    columns of ``input_ids`` they have consumed (padding included)."""

    is_compileable = False  # generate() must not compile the forward around it
    is_croppable = False  # a BLA state cannot be rolled back to an earlier token

    def __init__(self, decode: DecodeCache, columns: int):
        super().__init__(layers=[])
        self.decode, self.columns = decode, columns
        self.static: StaticDecoder | None = None  # the fast path's buffers, once decoding has begun there

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # BLA and SWA layers keep no maximum; attention grows

    def nbytes(self) -> int:
        return self.static.nbytes() if self.static is not None else self.decode.nbytes()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows ``beam_idx`` of every cached tensor (and of per-row lengths)."""
        if self.static is not None:
            self.static.reorder(beam_idx)
            return

        def pick(t):
            if isinstance(t, torch.Tensor):
                return t.index_select(0, beam_idx.to(t.device))
            if isinstance(t, tuple):
                return tuple(pick(x) for x in t)
            return t

        for layer in self.decode.layers:
            for f in dataclasses.fields(layer):
                setattr(layer, f.name, pick(getattr(layer, f.name)))
        self.decode.length = pick(self.decode.length)


class BLAPreTrainedModel(PreTrainedModel):
    config_class = BLALMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _is_stateful = True  # no assisted generation: a state cannot be rewound

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the cache is ours, built in forward()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Only for weights missing from a checkpoint: bla-lm's initialisation."""
        std = self.config.bla_model.get("init_std", 0.02)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, ShortConv):
            identity = torch.zeros_like(module.weight)
            identity[:, -1] = 1.0
            init.copy_(module.weight, identity)


class BLAForCausalLM(BLAPreTrainedModel, GenerationMixin):
    """``static_decoding``: after the prompt, decode over bla-lm's static buffers
    (``bla.model.decode.StaticDecoder``; on CUDA each token is one replayed CUDA graph, the
    buffers doubling when attention's fill up). None: on CUDA when every mixer supports it."""

    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}
    static_decoding: bool | None = None
    supports_gradient_checkpointing = True

    def __init__(self, config: BLALMConfig):
        super().__init__(config)
        self.model = BLALM(ModelConfig.from_saved(config.bla_model))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.head

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute every block in the backward (bla-lm's ``activation_checkpointing=block``)."""
        self.model.set_checkpointing("block")

    def gradient_checkpointing_disable(self) -> None:
        self.model.set_checkpointing("none")

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(block.checkpointing != "none" for block in self.model.blocks)

    def prepare_inputs_for_generation(self, input_ids, cache=None, attention_mask=None, use_cache=True, **kwargs):
        cache = cache if cache is not None else kwargs.get("past_key_values")
        if cache is not None:  # feed only the columns the cache has not consumed: one token per step
            input_ids = input_ids[:, cache.get_seq_length() :]
        return {"input_ids": input_ids, "cache": cache, "attention_mask": attention_mask, "use_cache": use_cache}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: BLAGenerationCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: BLAGenerationCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``labels`` follow the Hugging Face convention: the inputs themselves, shifted here."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("BLAForCausalLM takes input_ids (inputs_embeds is not supported)")
        for name in ("output_hidden_states", "output_attentions"):  # asked for, never silently None
            if kwargs.get(name):
                raise ValueError(f"BLAForCausalLM does not return {name.removeprefix('output_')}: BLA layers keep "
                                 f"slot states, not per-layer outputs or attention maps (pass {name}=False)")  # fmt: skip
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, BLAGenerationCache):
            raise ValueError(f"cache must be a BLAGenerationCache, got {type(cache).__name__}")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True) and not self.training
        padded = attention_mask is not None and not bool(attention_mask.bool().all())
        if padded and cache is None:
            logits, decode = self._rows_alone(input_ids, attention_mask.bool(), use_cache)
        else:
            if padded and not bool(attention_mask[:, -input_ids.shape[1] :].bool().all()):
                raise ValueError("BLAForCausalLM: after the prompt, every new token must be real (attention_mask 1)")
            if cache is not None and input_ids.shape[1] == 1 and self._decodes_static():
                return CausalLMOutputWithPast(logits=self._static_step(cache, input_ids), **{_CACHE_FIELD: cache})
            decode = cache.decode if cache is not None else (self.model.new_cache() if use_cache else None)
            out = self.model(input_ids, cache=decode, positions=position_ids if not padded else None)
            logits, decode = out.logits, out.cache
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100) if padded else labels[:, 1:]
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100)
        out_cache = None
        if decode is not None:
            columns = (cache.columns if cache is not None else 0) + input_ids.shape[1]
            out_cache = cache if cache is not None else BLAGenerationCache(decode, columns)
            out_cache.decode, out_cache.columns = decode, columns
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: out_cache})

    def _decodes_static(self) -> bool:
        return self.static_decoding if self.static_decoding is not None else decodes_static_by_default(self.model)

    def _static_step(self, cache: BLAGenerationCache, input_ids) -> torch.Tensor:
        """One token per row through the cache's StaticDecoder (built from its decode caches at the
        first step): logits [B, 1, V]."""
        if cache.static is None:
            lengths = torch.as_tensor(cache.decode.length).expand(input_ids.shape[0])
            cache.static = StaticDecoder(self.model, input_ids.shape[0], max(256, 2 * int(lengths.max())))
            cache.static.load(cache.decode)
            cache.decode = None  # the static buffers hold the state from now on
        if cache.static.longest >= cache.static.max_context:
            cache.static.grow(2 * cache.static.max_context)
        cache.columns += 1
        return cache.static.step(input_ids[:, 0]).clone()[:, None]

    def _rows_alone(self, input_ids, mask, use_cache: bool):
        """A padded batch with no cache yet: each row's real tokens (one contiguous run) through the
        model alone, their logits where they stand (zeros at pads), and the rows' caches stacked."""
        logits = None
        caches = []
        for row in range(input_ids.shape[0]):
            where = mask[row].nonzero()[:, 0]
            if where.numel() == 0 or where[-1] - where[0] + 1 != where.numel():
                raise ValueError("BLAForCausalLM: each row's attention_mask must mark one run of real tokens (left or right padding)")
            out = self.model(input_ids[row : row + 1, where[0] : where[-1] + 1], cache=self.model.new_cache() if use_cache else None)
            if logits is None:
                logits = out.logits.new_zeros(*input_ids.shape, out.logits.shape[-1])
            logits[row, where[0] : where[-1] + 1] = out.logits[0]
            caches.append(out.cache)
        # a cache only where every row ends at the last column (left padding: generation can go on)
        return logits, (DecodeCache.stack(caches) if use_cache and bool(mask[:, -1].all()) else None)
