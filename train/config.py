"""Training configuration: one typed tree (model, data, optimiser, run), YAML presets, overrides.

``bla train [PRESET|file.yaml] key=value ...``; keys are dotted paths (``optim.lr=3e-4``,
``model.bla.slots=32``, ``data.sources=[stdlib:train]``). The resolved tree is validated at
start and saved with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bla.data.regbench import RegBenchConfig
from bla.data.synthetic import MQARConfig
from bla.data.tasks import task_named, task_names
from bla.model.config import ModelConfig, load_preset, set_dotted, split_override
from bla.model.lm import CHECKPOINTING

from .files import read_json


@dataclass
class DataConfig:
    task: str = "lm"  # lm (text sources) | mqar | regbench (synthetic; bla.data.task finds each by name)
    mqar: MQARConfig = field(default_factory=MQARConfig)  # the settings of a task live in a field named as it says
    regbench: RegBenchConfig = field(default_factory=RegBenchConfig)
    sources: list[str] = field(default_factory=lambda: ["stdlib:train"])  # see bla.data.parse_source
    val_sources: list[str] = field(default_factory=lambda: ["stdlib:validation"])
    mixture: str = "all_exhausted"  # several sources: all_exhausted (small ones repeat) | first_exhausted (none repeats)
    tokenizer: str = "auto"  # path to tokenizer.json / .model, or "auto": train one and cache it
    tokenizer_kind: str = "bpe"  # when training: bpe | sentencepiece
    shards: str = "auto"  # pre-tokenised shard dir; "auto": prepare into the cache; "none": stream
    seq_len: int = 256
    num_workers: int = 0
    seed: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | wsd (warmup, stable, then linear decay)
    decay_fraction: float = 0.2  # wsd: last fraction of steps spent decaying
    grad_clip: float = 1.0
    fused: bool = True  # torch's fused AdamW kernel (one launch per step for all parameters)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 300  # optimiser steps (the schedule spans these)
    stop_at: int = 0  # stop with a checkpoint once this step is reached (time-boxed jobs); 0 = run to steps
    micro_batch: int = 8  # rows of seq_len per micro-batch and rank
    grad_accum: int = 1
    zero_stage: int | str = "auto"  # 0-3, or auto: 1 in bf16 (DeepSpeed's fused bf16 optimizer with fp32 gradients), 0 in fp32
    sequence_parallel_size: int = 1  # ranks sharing each sequence (data parallelism across groups)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    activation_checkpointing: str = "none"  # none | block (recompute whole blocks) | ops (keep matmul and mixer outputs, recompute the rest)
    compile: bool | str = "auto"  # torch.compile each block: auto (on with CUDA, ZeRO <= 2, no SP) | true | false
    cuda_graphs: bool = False  # replay each compiled block as a CUDA graph (mode=reduce-overhead): no host launch time; CUDA (packed documents padded to a few shapes)
    loss_chunk: int = 2048  # training loss through the head this many tokens at a time (no [tokens, vocab] logits); 0 = plain
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    keep_last: int = 2
    log_every: int = 10
    out_dir: str = "runs/main"
    cache_dir: str = "~/.cache/bla"
    seed: int = 0
    deterministic: bool = False  # the same numbers in every process: no timing-picked kernels (train.trainer.repeatable_numerics); slower
    nan_policy: str = "skip"  # skip (drop the update of a step with a non-finite loss) | stop (save and exit)
    nonfinite_limit: int = 20  # consecutive non-finite micro-batches after which skip also saves and exits
    resume: str = "auto"  # auto (latest complete checkpoint in out_dir) | none | a checkpoint dir
    init_from: str = ""  # start from these weights (a run, checkpoint or bla export) with a fresh optimiser
    peak_flops: float = 0.0  # per device, for MFU; 0 = the datasheet figure of a known GPU, else measured once (train/peak.py)
    deepspeed_config: str = ""  # a DeepSpeed JSON merged over the generated config (offload, bucket sizes, ...)
    progress: bool = True

    def validate(self) -> "TrainConfig":
        def bad(msg: str) -> None:
            raise ValueError(f"train config: {msg}")

        self.model.validate()
        for name in ("steps", "micro_batch", "grad_accum", "eval_every", "eval_batches", "save_every", "keep_last",
                     "log_every", "stop_at", "seed"):  # fmt: skip
            if name in ("stop_at", "seed"):
                if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                    bad(f"{name} must be an int, got {getattr(self, name)!r}")
                continue
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(f"{name} must be a positive int, got {value!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "decay_fraction", "grad_clip"):
            value = getattr(self.optim, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                bad(f"optim.{name} must be a finite non-negative number, got {value!r}")
        betas = self.optim.betas
        if (not isinstance(betas, (list, tuple)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)):  # fmt: skip
            bad(f"optim.betas must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.95], got {betas!r}")
        out = Path(self.out_dir).expanduser()
        if out.exists() and not out.is_dir():
            bad(f"out_dir={self.out_dir} is a file, not a directory: name a directory (it is created if missing)")
        if self.optim.lr == 0:
            bad("optim.lr is 0: the weights would never change (give a positive learning rate)")
        if isinstance(self.optim.warmup_steps, bool) or not isinstance(self.optim.warmup_steps, int):
            bad(f"optim.warmup_steps must be an int, got {self.optim.warmup_steps!r}")
        if not 0 <= self.stop_at <= self.steps:
            bad(f"stop_at must be within [0, steps={self.steps}], got {self.stop_at}")
        if isinstance(self.data.seq_len, bool) or not isinstance(self.data.seq_len, int) or self.data.seq_len < 1:
            bad(f"data.seq_len must be a positive int, got {self.data.seq_len}")
        if not isinstance(self.sequence_parallel_size, int) or self.sequence_parallel_size < 1:
            bad(f"sequence_parallel_size must be a positive int, got {self.sequence_parallel_size!r}")
        if (self.micro_batch * self.data.seq_len) % self.sequence_parallel_size:
            bad(f"micro_batch x data.seq_len = {self.micro_batch * self.data.seq_len} tokens must split evenly over "
                f"sequence_parallel_size={self.sequence_parallel_size} ranks")  # fmt: skip
        if self.zero_stage not in ("auto", 0, 1, 2, 3) or isinstance(self.zero_stage, bool):
            bad(f"zero_stage must be auto, 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad(f"precision must be auto, fp32 or bf16, got {self.precision!r} (fp16 is not supported)")
        if self.optim.schedule not in ("cosine", "wsd"):
            bad(f"optim.schedule must be cosine or wsd, got {self.optim.schedule!r}")
        if self.activation_checkpointing not in CHECKPOINTING:
            bad(f"activation_checkpointing must be one of {CHECKPOINTING}, got {self.activation_checkpointing!r}")
        if self.compile not in ("auto", True, False):
            bad(f"compile must be auto, true or false, got {self.compile!r}")
        if self.compile is True and self.zero_stage == 3:
            bad("compile=true with zero_stage=3: ZeRO-3 gathers parameters in module hooks that torch.compile "
                "cannot trace; use zero_stage <= 2 or compile=false")  # fmt: skip
        if self.compile is True and self.sequence_parallel_size > 1:
            bad("compile=true with sequence parallelism: its exchanges are collectives inside the layers; use compile=false")
        if not isinstance(self.cuda_graphs, bool):
            bad(f"cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if self.cuda_graphs and (self.compile is False or self.zero_stage == 3 or self.sequence_parallel_size > 1):
            bad("cuda_graphs=true replays the compiled blocks: it needs compile (not false), zero_stage <= 2 and no "
                "sequence parallelism")  # fmt: skip
        if not isinstance(self.deterministic, bool):
            bad(f"deterministic must be true or false, got {self.deterministic!r}")
        if not isinstance(self.optim.fused, bool):
            bad(f"optim.fused must be true or false, got {self.optim.fused!r}")
        if self.nan_policy not in ("skip", "stop"):
            bad(f"nan_policy must be skip or stop, got {self.nan_policy!r}")
        if isinstance(self.loss_chunk, bool) or not isinstance(self.loss_chunk, int) or self.loss_chunk < 0:
            bad(f"loss_chunk must be an int >= 0 (0: plain logits), got {self.loss_chunk!r}")
        if not isinstance(self.nonfinite_limit, int) or self.nonfinite_limit < 1:
            bad(f"nonfinite_limit must be a positive int, got {self.nonfinite_limit!r}")
        if self.data.task not in task_names():
            bad(f"data.task must be one of {task_names()}, got {self.data.task!r}")
        for problem in task_named(self.data.task).check(self.data, self.model.vocab_size):
            bad(problem)
        if self.deepspeed_config:
            self.deepspeed(bf16=False)  # a missing or malformed file: said now, not after setup
        if not 0 <= self.optim.warmup_steps <= self.steps:
            bad(f"optim.warmup_steps must be within [0, steps={self.steps}], got {self.optim.warmup_steps}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def compiles(self, device_type: str) -> bool:
        """Whether the blocks run through torch.compile on this device (``compile`` resolved)."""
        if self.compile == "auto":
            return device_type == "cuda" and self.zero_stage != 3 and self.sequence_parallel_size == 1
        return bool(self.compile)

    def deepspeed(self, bf16: bool, load_universal: bool = False) -> dict:
        """The DeepSpeed config this run trains with: the one generated from these settings, with
        ``deepspeed_config``'s JSON merged over it (nested sections key by key)."""
        generated = self._generated_deepspeed(bf16, load_universal)
        if not self.deepspeed_config:
            return generated
        path = Path(self.deepspeed_config).expanduser()
        user = read_json(path, "deepspeed_config")
        for key, instead in _DEEPSPEED_KEYS_OF_SETTINGS.items():
            section, _, sub = key.partition(".")
            if section in user and (not sub or (isinstance(user[section], dict) and sub in user[section])):
                raise ValueError(f"deepspeed_config={path}: {key} is set by the trainer from its own settings, which the "
                                 f"checkpoints, schedule and exports follow; use {instead} instead")  # fmt: skip
        return _merged(generated, user)

    def zero(self, bf16: bool) -> int:
        """The ZeRO stage ``zero_stage`` resolves to. auto: 1 in bf16, where DeepSpeed's stage 0
        keeps bf16 gradients and steps an unfused optimizer parameter by parameter (the 350m attn
        model trained at 0.56x a plain loop's tokens/s on an H200, against 0.89x at stage 1 with
        fp32 gradients: benchmarks/reports/2026-11-to-12.md); 0 in fp32. On one device stage 1 partitions nothing."""
        if self.zero_stage == "auto":
            return 1 if bf16 else 0
        return self.zero_stage

    def _generated_deepspeed(self, bf16: bool, load_universal: bool) -> dict:
        o = self.optim
        stage = self.zero(bf16)
        fp32_grads = {"data_types": {"grad_accum_dtype": "fp32"}} if bf16 and stage == 1 else {}
        return {
            "train_micro_batch_size_per_gpu": 1,  # one packed row of micro_batch * seq_len tokens
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": o.grad_clip,
            **fp32_grads,  # bf16 weights, fp32 gradients and master weights: DeepSpeed's BF16_Optimizer
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "weight_decay": o.weight_decay,
                                                       "torch_adam": True, "fused": o.fused}},  # fmt: skip
            "bf16": {"enabled": bf16},
            "checkpoint": {"load_universal": load_universal},
            "steps_per_print": 10**9,
        }

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> "TrainConfig":
        """The config a checkpoint or export saved: its model through ``ModelConfig.from_saved``
        (a missing ``bla.gates`` is spec v1's), the rest as written and not validated again
        (a ``deepspeed_config`` file it names need not exist where the model is evaluated)."""
        d = dict(d)
        model = ModelConfig.from_saved(d.pop("model", None) or {}).to_dict()
        return cls.from_dict({**d, "model": model}, validate=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], validate: bool = True) -> "TrainConfig":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise ValueError(f"train config: unknown keys {sorted(set(d) - known)}")
        model = d.pop("model", {}) or {}
        if isinstance(model, str):
            model = load_preset(model).to_dict()
        elif "preset" in model:
            base = load_preset(model.pop("preset")).to_dict()
            base.update({k: v for k, v in model.items() if k != "bla"})
            base["bla"] = {**base["bla"], **model.get("bla", {})}
            model = base
        sections = {"data": DataConfig, "optim": OptimConfig}
        built = {}
        for name, klass in sections.items():
            raw = d.pop(name, {}) or {}
            unknown = set(raw) - {f.name for f in dataclasses.fields(klass)}
            if unknown:
                raise ValueError(f"train config: unknown keys {name}.{sorted(unknown)}")
            if isinstance(raw.get("betas"), list):  # YAML has no tuples; anything else is refused by validate
                raw["betas"] = tuple(raw["betas"])
            for f in dataclasses.fields(klass):  # nested settings (data.mqar, ...) as their own dataclasses
                if isinstance(raw.get(f.name), dict) and dataclasses.is_dataclass(f.default_factory):
                    raw[f.name] = f.default_factory(**raw[f.name])
            built[name] = klass(**raw)
        if isinstance(d.get("activation_checkpointing"), bool):  # configs saved before the policies existed
            d["activation_checkpointing"] = "block" if d["activation_checkpointing"] else "none"
        cfg = cls(model=ModelConfig.from_dict(model), **built, **d)
        return cfg.validate() if validate else cfg


def settings_help() -> str:
    """Every train setting as ``key=default  comment`` (from the dataclasses' own lines), for
    ``bla train --help``."""
    import inspect
    import re

    lines = []
    for prefix, klass in (("", TrainConfig), ("data.", DataConfig), ("optim.", OptimConfig)):
        defaults = dataclasses.asdict(klass())
        for line in inspect.getsource(klass).splitlines():
            m = re.match(r"\s+(\w+): [^=]+= .*?(?:#\s*(.*))?$", line)
            if not m or m.group(1) not in defaults or isinstance(defaults[m.group(1)], dict):
                continue
            value = defaults[m.group(1)]
            shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            lines.append(f"  {prefix}{m.group(1)}={shown}" + (f"  # {m.group(2)}" if m.group(2) else ""))
    return "\n".join(lines)


# DeepSpeed keys that restate a trainer setting: taken from a user's JSON, the run would train with
# one value while its config, schedule, checkpoints and exports follow the other
_DEEPSPEED_KEYS_OF_SETTINGS = {
    "train_micro_batch_size_per_gpu": "micro_batch", "train_batch_size": "micro_batch and grad_accum",
    "gradient_accumulation_steps": "grad_accum (the schedule counts optimiser steps)",
    "zero_optimization.stage": "zero_stage=N", "optimizer": "optim.* (optim.lr, optim.betas, optim.weight_decay, optim.fused)",
    "scheduler": "optim.schedule, optim.warmup_steps, optim.min_lr_ratio, optim.decay_fraction",
    "gradient_clipping": "optim.grad_clip", "bf16": "precision=bf16|fp32", "fp16": "precision (fp16 is not supported)",
}  # fmt: skip


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def preset_path(name: str) -> Path:
    path = resources.files("bla.train").joinpath("presets", f"{name}.yaml")
    if not path.is_file():
        names = sorted(p.name[:-5] for p in resources.files("bla.train").joinpath("presets").iterdir())
        raise ValueError(f"unknown train preset {name!r}; known: {', '.join(names)}")
    return Path(str(path))


def load_train_config(preset: str = "main", overrides: list[str] | None = None) -> TrainConfig:
    """A preset name or YAML path, then ``key=value`` overrides (dotted keys reach nested sections)."""
    path = Path(preset) if preset.endswith((".yaml", ".yml")) else preset_path(preset)
    if not path.is_file():
        raise ValueError(f"train config file {path} does not exist")
    d = TrainConfig.from_dict(yaml.safe_load(path.read_text()) or {}).to_dict()
    for item in overrides or []:
        key, value = split_override(item)
        if key == "model.preset":  # rebase the model on another preset; later overrides refine it
            d["model"] = load_preset(value).to_dict()
        else:
            set_dotted(d, key, value)
    return TrainConfig.from_dict(d)
