"""Load a trained model back: from a run directory or one of its checkpoints (any ZeRO stage,
any number of ranks), or from a directory written by ``bla export`` (safetensors and a Hugging
Face config). Either way: the model config, the tokenizer and the weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from bla import data as lm_data  # the tokenizer module loads only for text models
from bla.model import BLALM, ModelConfig
from bla.train import checkpoint as ckpt


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (``.../checkpoints/step_N``), or a run folder: its newest whole checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist: expected a run directory or a checkpoint directory")
    if (path / ckpt.MANIFEST).exists() or path.name.startswith("step_"):
        problem = ckpt.check_complete(path)
        if problem:
            raise ValueError(f"checkpoint {path} is incomplete: {problem}")
        return path
    said = []  # damaged newer checkpoints are passed over, and the user is told which was read
    found = ckpt.latest_complete(path / "checkpoints", log=said.append)
    if found is None:
        raise ValueError(f"{path} holds no complete checkpoint under {path / 'checkpoints'}" +
                         (f" ({'; '.join(said)})" if said else ""))  # fmt: skip
    for line in said:
        print(f"bla: {line}", file=sys.stderr)
    if said:
        print(f"bla: reading {found} instead", file=sys.stderr)
    return found


def fp32_state_dict(tag_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Consolidated weights: ZeRO-1/2/3 through DeepSpeed's zero_to_fp32, ZeRO-0 from the module file.
    Every file is read safely (tensors and plain data only: no pickled code runs), the ZeRO files
    before DeepSpeed unpickles them."""
    if zero_stage > 0:
        ckpt.verify_safe(tag_dir)
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    states = ckpt.safe_load(tag_dir / "mp_rank_00_model_states.pt", deepspeed_types=True, map_location="cpu")
    return {k: v.float() for k, v in states["module"].items()}



def load_weights(model: BLALM, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``state`` into ``model``, refusing any missing, unexpected or misshapen weight."""
    tied = model.cfg.tie_embeddings
    state = {k: v for k, v in state.items() if not (tied and k == "head.weight")}
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not (tied and k == "head.weight"))
    unexpected = sorted(k for k in state if k not in own)
    misshapen = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
                 if k in own and v.shape != own[k].shape]  # fmt: skip
    if missing or unexpected or misshapen:
        raise ValueError(
            f"{where} does not match its model config: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {misshapen}"
        )
    model.load_state_dict(state, strict=False)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[BLALM, lm_data.Tokenizer | None, dict]:
    """A run, a checkpoint or an exported directory: (model in eval mode, tokenizer or None, the
    resolved train config of the run it came from)."""
    return load_exported(path, device) if is_export(path) else load_run(path, device)


# ---- the export format (written by bla.launch.export) ----
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
EXPORT_INFO = "bla_export.json"  # where it came from, and the training config it was trained with
EXPORT_MODEL_TYPE = "bla_lm"
EXPORT_PREFIX = "model."  # the Hugging Face class holds the BLALM as ``.model``


def read_json(path: Path) -> dict:
    """A JSON object from a file a user may have received: errors name the file."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, expected an object")
    return value


def is_export(path: str | Path) -> bool:
    config = Path(path) / EXPORT_CONFIG
    return config.is_file() and read_json(config).get("model_type") == EXPORT_MODEL_TYPE


def verify_export(path: Path, info: dict) -> None:
    """Every file recorded in bla_export.json is there with its sha256 (exports written before
    checksums, or re-saved by transformers without bla_export.json, have none to check)."""
    for name, digest in (info.get("files") or {}).items():
        f = path / name
        if name == EXPORT_INFO:
            continue
        if not f.is_file():
            raise ValueError(f"export {path}: {name} is missing (listed in {EXPORT_INFO})")
        if ckpt.sha256_of(f) != digest:
            raise ValueError(f"export {path}: {name} has changed since it was exported (sha256 differs from {EXPORT_INFO})")


def load_exported(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32):
    """(BLALM in eval mode, tokenizer or None, the training config) from a ``bla export``
    directory; ``dtype`` None keeps the file's dtype."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_export(path):
        raise ValueError(f"{path} is not a bla export: expected {EXPORT_CONFIG} with model_type {EXPORT_MODEL_TYPE!r}")
    weights = path / EXPORT_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{path} has no {EXPORT_WEIGHTS}")
    info = read_json(path / EXPORT_INFO) if (path / EXPORT_INFO).exists() else {}
    verify_export(path, info)
    hf_config = read_json(path / EXPORT_CONFIG)
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
    train_cfg = {**(info.get("train_config") or {}), "model": model_cfg.to_dict()}  # gates resolved
    return model.to(device).eval(), (lm_data.Tokenizer(path) if has_tokenizer else None), train_cfg


def load_run(path: str | Path, device: str | torch.device = "cpu") -> tuple[BLALM, lm_data.Tokenizer | None, dict]:
    """(model in eval mode, tokenizer (None for synthetic-task runs), the run's resolved train config)."""
    tag_dir = resolve_checkpoint(path)
    cfg_path = tag_dir / "config.yaml"
    if not cfg_path.exists():
        raise ValueError(f"checkpoint {tag_dir} has no config.yaml")
    train_cfg = yaml.safe_load(cfg_path.read_text())
    model_cfg = ModelConfig.from_saved(train_cfg["model"])
    train_cfg["model"] = model_cfg.to_dict()  # what the model computes: a legacy config's gates resolved
    model = BLALM(model_cfg)
    load_weights(model, fp32_state_dict(tag_dir, int(train_cfg.get("zero_stage", 0))), f"checkpoint {tag_dir}")
    run_dir = tag_dir.parent.parent
    tok_dir = run_dir / "tokenizer"
    if train_cfg.get("data", {}).get("task", "lm") != "lm":
        return model.to(device).eval(), None, train_cfg
    if not tok_dir.exists():
        raise ValueError(f"no tokenizer beside the checkpoint (expected {tok_dir})")
    tok = lm_data.Tokenizer(tok_dir)
    lm_data.check_same_tokenizer(tok, ckpt.read_meta(tag_dir).get("tokenizer"), f"checkpoint {tag_dir}")
    return model.to(device).eval(), tok, train_cfg
