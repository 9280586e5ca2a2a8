"""The export format: a trained model in the form inference tools expect, written and read here.

From any checkpoint (ZeRO 0-3, any number of ranks: consolidated through ``bla.train.checkpoint``)
or an earlier export, to a directory holding

- ``model.safetensors`` (float32 or bfloat16), ``config.json``, ``generation_config.json``;
- the tokenizer (``tokenizer.json`` with its Hugging Face config, or ``tokenizer.model``);
- the modeling code: ``configuration_bla.py`` and ``modeling_bla.py`` (the Hugging Face classes
  in ``train/hf/``, importable in place) plus ``bla_*.py``, copies of the model and kernel
  sources with their imports made relative, so ``AutoModelForCausalLM.from_pretrained(dir,
  trust_remote_code=True)`` needs nothing else;
- ``bla_export.json``: the source, the training config (evaluation of the export reads it) and
  every other file's sha256 (checked on load).

The directory is written beside its destination and renamed into place, so an interrupted
export never leaves a partial one. ``load_model`` reads either format: an export or a
checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import torch

from bla import data as lm_data
from bla.data.tokenizer import BOS_ID, EOS_ID, PAD_ID
from bla.model import BLALM, ModelConfig

from . import checkpoint as ckpt
from .checkpoint import load_weights
from .config import TrainConfig
from .files import read_json

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_INFO = "bla_export.json"  # where it came from, and the training config it was trained with
EXPORT_MODEL_TYPE = "bla_lm"
EXPORT_PREFIX = "model."  # the Hugging Face class holds the BLALM as ``.model``


def is_export(path: str | Path) -> bool:
    config = Path(path) / EXPORT_CONFIG
    return config.is_file() and read_json(config).get("model_type") == EXPORT_MODEL_TYPE


def verify_export(path: Path, info: dict) -> None:
    """Every file recorded in bla_export.json is there with its sha256 (exports written before
    checksums, or re-saved by transformers without bla_export.json, have none to check)."""
    for name, digest in (info.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise ValueError(f"export {path}: {name} is missing (listed in {EXPORT_INFO})")
        if ckpt.sha256_of(f) != digest:
            raise ValueError(f"export {path}: {name} has changed since it was exported (sha256 differs from {EXPORT_INFO})")


def load_exported(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32):
    """(BLALM in eval mode, tokenizer or None, the training config or None) from a ``bla export``
    directory; ``dtype`` None keeps the file's dtype. The training config is None for an export
    re-saved without its ``bla_export.json`` (by transformers' ``save_pretrained``)."""
    from safetensors.torch import load_file

    path = Path(path)
    hf_config = read_json(path / EXPORT_CONFIG) if (path / EXPORT_CONFIG).is_file() else {}
    if hf_config.get("model_type") != EXPORT_MODEL_TYPE:
        raise ValueError(f"{path} is not a bla export: expected {EXPORT_CONFIG} with model_type {EXPORT_MODEL_TYPE!r}")
    weights = path / EXPORT_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{path} has no {EXPORT_WEIGHTS}")
    info = read_json(path / EXPORT_INFO) if (path / EXPORT_INFO).exists() else {}
    verify_export(path, info)
    if not isinstance(hf_config.get("bla_model"), dict):
        raise ValueError(f"{path / EXPORT_CONFIG} has no bla_model settings (not written by bla export)")
    model_cfg = ModelConfig.from_saved(hf_config["bla_model"])
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own SafetensorError on a damaged header or size
        raise ValueError(f"{weights} is not a readable safetensors file: {exc}") from exc
    foreign = sorted(k for k in state if not k.startswith(EXPORT_PREFIX))
    if foreign:
        raise ValueError(f"{weights}: weights outside {EXPORT_PREFIX!r}: {foreign[:5]}")
    state = {k[len(EXPORT_PREFIX) :]: v for k, v in state.items()}
    model = BLALM(model_cfg).to(dtype or next(iter(state.values())).dtype)
    load_weights(model, state, f"export {path}")  # copies into the model's dtype
    has_tokenizer = (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists()
    recorded = info.get("train_config")
    train_cfg = TrainConfig.from_saved({**recorded, "model": model_cfg.to_dict()}) if recorded else None  # gates resolved
    return model.to(device).eval(), (lm_data.Tokenizer(path) if has_tokenizer else None), train_cfg


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# (package, module) copied into the export as bla_<module>.py: the model and the kernels it calls
MODEL_SOURCES = [("bla.model", m) for m in ("config", "registry", "layers", "loss", "flex", "mixers", "gsa_mixer", "lm", "decode")]
TRITON_STAGES = ("tuning", "tables", "tiles", "forward", "scan", "backward", "decode", "layout", "plan", "bla", "ops")
KERNEL_SOURCES = [("bla.kernels", m) for m in ("api", "checks", "chunked", "device_cache", "gates", "gsa", "reference",
                                               *(f"triton_{stage}" for stage in TRITON_STAGES))]  # fmt: skip
HF_FILES = ("configuration_bla.py", "modeling_bla.py")
SPECIAL_IDS = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}  # bla-lm's own tokenizers'
_EXPORTED = {m for _, m in MODEL_SOURCES + KERNEL_SOURCES}


def special_ids(tokenizer: lm_data.Tokenizer | None) -> dict:
    """The ids transformers' config and generation read: the tokenizer's, by role."""
    if tokenizer is None:
        return dict(SPECIAL_IDS)
    return {"pad_token_id": tokenizer.pad_id, "bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id}


def flatten_imports(source: str, name: str) -> str:
    """Make one module's imports point at the flat ``bla_<module>`` copies beside it (the Hugging
    Face files import each other by their own names)."""
    hf_modules = {f[: -len(".py")] for f in HF_FILES}

    def relative(match: re.Match) -> str:
        module = match.group(2)
        if module in hf_modules:
            return f"{match.group(1)}from .{module} import"
        if module not in _EXPORTED:
            raise ValueError(f"{name}: imports .{module}, which the export does not carry")
        return f"{match.group(1)}from .bla_{module} import"

    out = re.sub(r"^(\s*)from \.(\w+) import", relative, source, flags=re.M)
    out = re.sub(r"^(\s*)from \. import (\w+)(?: as (\w+))?",
                 lambda m: f"{m.group(1)}from . import bla_{m.group(2)} as {m.group(3) or m.group(2)}", out, flags=re.M)  # fmt: skip
    out = re.sub(r"^(\s*)from bla\.kernels import", r"\1from .bla_api import", out, flags=re.M)
    out = re.sub(r"^(\s*)from bla\.(?:kernels|model)\.(\w+) import", relative, out, flags=re.M)
    leftover = re.findall(r"^\s*(?:from|import) bla\b.*$", out, flags=re.M)
    if leftover:
        raise ValueError(f"{name}: absolute bla imports the export cannot carry: {leftover}")
    return f"# Copied from bla-lm's {name} by `bla export`; imports point at the copies beside it.\n{out}"


def _code_files() -> dict[str, str]:
    files = {}
    for package, module in MODEL_SOURCES + KERNEL_SOURCES:
        text = resources.files(package).joinpath(f"{module}.py").read_text()
        files[f"bla_{module}.py"] = flatten_imports(text, f"{package}.{module}")
    for name in HF_FILES:
        files[name] = flatten_imports(resources.files("bla.train").joinpath("hf", name).read_text(), f"bla.train.hf.{name[:-3]}")
    return files


def hf_config(model: BLALM, dtype: str, tokenizer: lm_data.Tokenizer | None = None) -> dict:
    cfg = model.cfg
    return {
        "architectures": ["BLAForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_bla.BLALMConfig", "AutoModelForCausalLM": "modeling_bla.BLAForCausalLM"},
        "model_type": EXPORT_MODEL_TYPE,
        "bla_model": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "tie_word_embeddings": cfg.tie_embeddings,
        **special_ids(tokenizer),
        "dtype": dtype,
    }


def _write_tokenizer(tokenizer: lm_data.Tokenizer, out: Path) -> None:
    tokenizer.save(out)
    pad, bos, eos = (tokenizer.special_tokens[role] for role in ("pad", "bos", "eos"))
    specials = {"pad_token": pad, "bos_token": bos, "eos_token": eos}
    # transformers' tokenizers put <bos> first, as training did before every document (bla-lm's own
    # encode() adds no specials either way: it asks for none)
    if tokenizer.kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers.processors import TemplateProcessing

        path = out / "tokenizer.json"
        fast = HFTokenizer.from_file(str(path))
        fast.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)])
        fast.save(str(path))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "clean_up_tokenization_spaces": False}
    else:
        # LlamaTokenizer reads the SentencePiece model; it decodes exactly as ours and encodes the
        # same except where a text starts with spaces (Metaspace keeps one fewer "▁" there)
        config = {"tokenizer_class": "LlamaTokenizer", **specials, "unk_token": "<unk>", "add_bos_token": True,
                  "add_eos_token": False, "legacy": True, "add_prefix_space": None}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def write_export(model: BLALM, tokenizer: lm_data.Tokenizer | None, out: str | Path, dtype: str = "float32",
                 info: dict | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """Write ``model`` (and its tokenizer) as an export directory; returns its path."""
    from safetensors.torch import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} exists; pass --overwrite to replace it")
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    state = model.state_dict()
    if model.cfg.tie_embeddings:
        state.pop("head.weight")  # the Hugging Face class ties it back to the embedding
    tensors = {EXPORT_PREFIX + k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp / EXPORT_WEIGHTS), metadata={"format": "pt"})
    (tmp / EXPORT_WEIGHTS).chmod(0o644)  # safetensors writes it private; an export is for sharing
    (tmp / EXPORT_CONFIG).write_text(json.dumps(hf_config(model, dtype, tokenizer), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(special_ids(tokenizer), indent=2) + "\n")
    if tokenizer is not None:
        _write_tokenizer(tokenizer, tmp)
    for name, text in _code_files().items():
        (tmp / name).write_text(text)
    info = {k: (v.to_dict() if isinstance(v, TrainConfig) else v) for k, v in (info or {}).items()}
    # every file's sha256, so a changed byte is found on load (the config and the code included)
    files = {p.name: ckpt.sha256_of(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / EXPORT_INFO).write_text(json.dumps({"dtype": dtype, **info, "files": files}, indent=2, default=str) + "\n")

    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def export(source: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """A run, checkpoint or earlier export at ``source`` to an export directory at ``out``."""
    if Path(out).resolve() == Path(source).resolve():
        raise ValueError("the export directory must differ from the source")
    if is_export(source):
        model, tokenizer, train_cfg = load_exported(source)
        info_file = Path(source) / EXPORT_INFO
        previous = read_json(info_file).get("source", {}) if info_file.exists() else {}
        origin = {"export": str(source), "from": previous}
    else:
        tag_dir = ckpt.resolve_checkpoint(source)
        model, tokenizer, train_cfg = ckpt.load_run(tag_dir)
        origin = {"checkpoint": str(tag_dir)}
    return write_export(model, tokenizer, out, dtype, {"source": origin, "train_config": train_cfg}, overwrite)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """A run, a checkpoint or an exported directory: (model in eval mode, tokenizer or None, the
    resolved train config of the run it came from)."""
    return load_exported(path, device) if is_export(path) else ckpt.load_run(path, device)
