"""Hugging Face configuration of a bla-lm model (written by ``bla export``).

The architecture is described by one dict, ``bla_model``: bla-lm's own ``ModelConfig``, exactly
as training saved it. The usual Hugging Face names (``vocab_size``, ``hidden_size``,
``num_hidden_layers``, ``tie_word_embeddings``) are derived from it, never set separately, so
the two descriptions cannot disagree.
"""

from transformers import PretrainedConfig

_DERIVED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "tie_word_embeddings")


class BLALMConfig(PretrainedConfig):
    model_type = "bla_lm"

    def __init__(self, bla_model: dict | None = None, **kwargs):
        self.bla_model = dict(bla_model or {})
        for name in _DERIVED:  # written to config.json for tools that read them; rebuilt here
            kwargs.pop(name, None)
        self.vocab_size = self.bla_model.get("vocab_size", 32000)
        self.hidden_size = self.bla_model.get("d_model", 768)
        self.num_hidden_layers = self.bla_model.get("n_layers", 12)
        self.num_attention_heads = self.bla_model.get("n_heads", 12)
        kwargs.setdefault("pad_token_id", 0)
        kwargs.setdefault("bos_token_id", 1)
        kwargs.setdefault("eos_token_id", 2)
        super().__init__(tie_word_embeddings=self.bla_model.get("tie_embeddings", True), **kwargs)
