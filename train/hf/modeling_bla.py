"""Hugging Face model class of a bla-lm model (written by ``bla export``).

``BLAForCausalLM`` wraps bla-lm's own ``BLALM`` (in an export, the ``bla_*.py`` files beside this
one are copies of bla-lm's model and kernel sources, and ``bla export`` points the ``bla.model``
imports below at them; in the repository this module imports bla-lm itself), so the exported model computes exactly what the
training stack computed. ``generate()`` keeps bla-lm's decode caches: a BLA layer's cache is its
constant-size slot state, whatever the context length.

Limitation: rows of a batch must have the same length (no padding). Pad tokens would enter a
BLA layer's state; generate prompts of different lengths in separate calls.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from bla.model.config import ModelConfig
from bla.model.layers import RMSNorm, ShortConv
from bla.model.lm import BLALM, DecodeCache

from .configuration_bla import BLALMConfig


class BLAGenerationCache:
    """What ``generate()`` carries between steps: bla-lm's per-layer decode caches."""

    is_compileable = False  # generate() must not compile the forward around it
    is_croppable = False  # a BLA state cannot be rolled back to an earlier token

    def __init__(self, decode: DecodeCache):
        self.decode = decode

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.decode.length

    def nbytes(self) -> int:
        return self.decode.nbytes()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows ``beam_idx`` of every cached tensor."""

        def pick(t):
            if isinstance(t, torch.Tensor):
                return t.index_select(0, beam_idx.to(t.device))
            if isinstance(t, tuple):
                return tuple(pick(x) for x in t)
            return t

        for layer in self.decode.layers:
            for f in dataclasses.fields(layer):
                setattr(layer, f.name, pick(getattr(layer, f.name)))


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
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}

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

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True, **kwargs):
        if past_key_values is not None:  # feed only the tokens the cache has not consumed
            input_ids = input_ids[:, past_key_values.get_seq_length() :]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "attention_mask": attention_mask, "use_cache": use_cache}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: BLAGenerationCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``labels`` follow the Hugging Face convention: the inputs themselves, shifted here."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("BLAForCausalLM takes input_ids (inputs_embeds is not supported)")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError(
                "BLAForCausalLM does not take padded batches (attention_mask has zeros): pad tokens would "
                "enter BLA's state; give rows of equal length, or one prompt per call"
            )
        if past_key_values is not None and not isinstance(past_key_values, BLAGenerationCache):
            raise ValueError(f"past_key_values must be a BLAGenerationCache, got {type(past_key_values).__name__}")
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True) and not self.training
        decode = past_key_values.decode if past_key_values is not None else (self.model.new_cache() if use_cache else None)
        out = self.model(input_ids, cache=decode, positions=position_ids)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        cache = None
        if out.cache is not None:
            cache = past_key_values if past_key_values is not None else BLAGenerationCache(out.cache)
            cache.decode = out.cache
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, past_key_values=cache)
