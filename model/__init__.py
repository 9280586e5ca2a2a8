"""The BLA language model: config, mixers, the LM and its size/FLOP/state accounting."""

from .config import BLAConfig, ModelConfig, apply_overrides, load_preset, preset_names
from .lm import BLALM, DecodeCache, LMOutput
from .stats import flops_per_token, param_count, state_size

__all__ = [
    "BLAConfig", "BLALM", "DecodeCache", "LMOutput", "ModelConfig", "apply_overrides",
    "flops_per_token", "load_preset", "param_count", "preset_names", "state_size",
]  # fmt: skip
