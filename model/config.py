"""Model configuration: typed dataclasses, YAML presets, ``key=value`` overrides, validation.

One source of truth: the resolved ``ModelConfig`` is what builds the model and what every
checkpoint saves (``to_dict``/``from_dict`` round-trip exactly).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bla.kernels import BACKENDS
from bla.kernels.gates import GATES, LEGACY_GATES, MODEL_GATES

PHASE_SHIFTS = ("off", "staggered")


@dataclass
class BLAConfig:
    """Options of the BLA token mixer (spec section 3)."""

    slots: int = 64  # m
    window: int | list[int] = 512  # W, or one per kv head (multi-resolution heads)
    short_conv: int = 0  # kernel of the causal depthwise conv on q/k/v; 0 = off
    rope: bool = False  # RoPE on q and k before BLA
    output_norm: bool = True  # per-head RMSNorm of the mixer output
    output_gate: bool = True  # SiLU gate x W_g on the output
    qk_norm: bool = False  # per-head RMSNorm of q and k before BLA (bounds the slot scores; an issue 19 ablation)
    backend: str = "auto"  # bla_attention backend
    gates: str = MODEL_GATES  # slot write/decay rule (spec section 1); a saved config without it is dirichlet_v1
    # spec section 6's extensions, off by default (a saved config without them: off)
    write_gate: bool = False  # selective write: beta = sigmoid(x w + b) per token and kv head
    forget_gate: bool = False  # scalar forgetting: gamma = sigmoid(x w + b) ** (1 / 16) per token and kv head
    phase_shift: str = "off"  # "staggered": kv head h's slots shifted by floor(h r / H_kv) positions


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None = n_heads (no GQA)
    layer_pattern: list[str] = field(default_factory=lambda: ["bla"])  # cycled over the layers
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = mlp_ratio * d_model, rounded up to mlp_multiple
    mlp_multiple: int = 64
    swa_window: int = 512
    attn_short_conv: int = 0  # bla.short_conv for the attn and swa layers (like-for-like recall baselines); 0 = off
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    init_std: float = 0.02
    bla: BLAConfig = field(default_factory=BLAConfig)

    # ---- derived ----
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def mlp_hidden(self) -> int:
        h = int(self.mlp_ratio * self.d_model)
        return -(-h // self.mlp_multiple) * self.mlp_multiple

    @property
    def mixers(self) -> list[str]:
        """The mixer of every layer, the pattern cycled to ``n_layers``."""
        return [self.layer_pattern[i % len(self.layer_pattern)] for i in range(self.n_layers)]

    def bla_windows(self) -> list[int]:
        w = self.bla.window
        return [w] * self.kv_heads if isinstance(w, int) else list(w)

    def bla_phase_shifts(self) -> list[int]:
        """Per kv head slot phase shifts: staggered heads sample the window between each other's
        nodes, s_h = floor(h r_h / H_kv) (spec section 6); all 0 when off."""
        if self.bla.phase_shift == "off":
            return [0] * self.kv_heads
        return [h * (w // self.bla.slots) // self.kv_heads for h, w in enumerate(self.bla_windows())]

    # ---- validation ----
    def validate(self) -> "ModelConfig":
        def bad(msg: str) -> None:
            raise ValueError(f"model config: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "swa_window"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                bad(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            bad(f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        if self.n_heads % self.kv_heads:
            bad(f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads}")
        if not self.layer_pattern:
            bad("layer_pattern must name at least one mixer")
        from .registry import MIXERS  # filled by the mixer modules (bla.model imports them)

        for m in self.layer_pattern:
            if m not in MIXERS:
                bad(f"unknown mixer {m!r} in layer_pattern; expected one of {tuple(MIXERS)}")
        for m in dict.fromkeys(self.layer_pattern):
            for problem in MIXERS[m].validate(self):
                bad(f"{m} layers: {problem}")
        slots = self.bla.slots
        if not isinstance(slots, int) or slots < 1:
            bad(f"bla.slots must be a positive int, got {slots!r}")
        windows = self.bla_windows()
        if len(windows) != self.kv_heads:
            bad(f"bla.window: expected an int or {self.kv_heads} windows (one per kv head), got {len(windows)}")
        for w in windows:
            if not isinstance(w, int) or w < slots or w % slots:
                bad(f"bla.slots={slots} must divide every bla.window and be at most it, got window {w!r}")
        for name, kernel in (("bla.short_conv", self.bla.short_conv), ("attn_short_conv", self.attn_short_conv)):
            if not isinstance(kernel, int) or kernel < 0:
                bad(f"{name} must be an int >= 0, got {kernel!r}")
        if self.bla.gates not in GATES:
            bad(f"bla.gates must be one of {GATES}, got {self.bla.gates!r}")
        if self.bla.backend not in BACKENDS:
            bad(f"bla.backend must be one of {BACKENDS}, got {self.bla.backend!r}")
        for name in ("write_gate", "forget_gate"):
            if not isinstance(getattr(self.bla, name), bool):
                bad(f"bla.{name} must be true or false, got {getattr(self.bla, name)!r}")
        if self.bla.phase_shift not in PHASE_SHIFTS:
            bad(f"bla.phase_shift must be one of {PHASE_SHIFTS}, got {self.bla.phase_shift!r}")
        if self.bla.write_gate and self.bla.gates == LEGACY_GATES:
            bad(f"bla.write_gate needs the v2 gates (dirichlet or fejer), got {LEGACY_GATES}")
        return self

    # ---- (de)serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"model config: unknown keys {sorted(unknown)}")
        bla = d.pop("bla", {}) or {}
        unknown = set(bla) - {f.name for f in dataclasses.fields(BLAConfig)}
        if unknown:
            raise ValueError(f"model config: unknown keys bla.{sorted(unknown)}")
        if isinstance(d.get("layer_pattern"), str):
            d["layer_pattern"] = [s.strip() for s in d["layer_pattern"].split(",")]
        return cls(**d, bla=BLAConfig(**bla)).validate()

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> "ModelConfig":
        """A config a checkpoint or export saved. Those written before ``bla.gates`` existed were
        trained with spec v1's gates, so a missing key means ``dirichlet_v1``, not the default."""
        d = dict(d)
        d["bla"] = {"gates": LEGACY_GATES, **(d.get("bla") or {})}
        return cls.from_dict(d)

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})


def preset_names() -> list[str]:
    files = resources.files("bla.model").joinpath("presets").iterdir()
    return sorted(p.name[: -len(".yaml")] for p in files if p.name.endswith(".yaml"))


def load_preset(name: str) -> ModelConfig:
    """A named preset (``tiny``, ``125m``, ``350m``, ``1.3b``) or a path to a YAML file."""
    if name.endswith((".yaml", ".yml")) or "/" in name:
        return ModelConfig.from_yaml(name)
    path = resources.files("bla.model").joinpath("presets", f"{name}.yaml")
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(preset_names())}")
    return ModelConfig.from_dict(yaml.safe_load(path.read_text()))


def parse_value(text: str) -> Any:
    """A CLI override value: YAML scalars and lists (``3``, ``true``, ``[bla, attn]``); numbers
    YAML 1.1 leaves as strings (``1e-3``) become floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def split_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value")
    key, value = item.split("=", 1)
    return key, value


def set_dotted(d: dict[str, Any], key: str, value: str) -> None:
    """Set ``a.b.c`` in a nested config dict, refusing keys the config does not have."""
    node = d
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise ValueError(f"override {key!r}: {part!r} is not a config section")
        node = node[part]
    if parts[-1] not in node:
        raise ValueError(f"override {key!r}: unknown key; known here: {sorted(node)}")
    node[parts[-1]] = parse_value(value)


def apply_overrides(cfg: ModelConfig, overrides: list[str]) -> ModelConfig:
    """Apply ``key=value`` overrides (dotted keys reach nested sections, e.g. ``bla.slots=32``)."""
    d = cfg.to_dict()
    for item in overrides:
        set_dotted(d, *split_override(item))
    return ModelConfig.from_dict(d)
