"""Load a trained model back from a run directory or one of its checkpoints (any ZeRO stage,
any number of ranks): the resolved config, the tokenizer and fp32 weights."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from bla.data import Tokenizer
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
    found = ckpt.latest_complete(path / "checkpoints", log=lambda m: None)
    if found is None:
        raise ValueError(f"{path} holds no complete checkpoint under {path / 'checkpoints'}")
    return found


def fp32_state_dict(tag_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Consolidated weights: ZeRO-1/2/3 through DeepSpeed's zero_to_fp32, ZeRO-0 from the module file."""
    if zero_stage > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() for k, v in states["module"].items()}



def load_run(path: str | Path, device: str | torch.device = "cpu") -> tuple[BLALM, Tokenizer | None, dict]:
    """(model in eval mode, tokenizer (None for synthetic-task runs), the run's resolved train config)."""
    tag_dir = resolve_checkpoint(path)
    cfg_path = tag_dir / "config.yaml"
    if not cfg_path.exists():
        raise ValueError(f"checkpoint {tag_dir} has no config.yaml")
    train_cfg = yaml.safe_load(cfg_path.read_text())
    model_cfg = ModelConfig.from_dict(train_cfg["model"])
    model = BLALM(model_cfg)
    state = fp32_state_dict(tag_dir, int(train_cfg.get("zero_stage", 0)))
    if model_cfg.tie_embeddings:
        state.pop("head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model_cfg.tie_embeddings and k == "head.weight")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {tag_dir} does not match its config: missing {missing}, unexpected {unexpected}")
    run_dir = tag_dir.parent.parent
    tok_dir = run_dir / "tokenizer"
    if train_cfg.get("data", {}).get("task", "lm") != "lm":
        return model.to(device).eval(), None, train_cfg
    if not tok_dir.exists():
        raise ValueError(f"no tokenizer beside the checkpoint (expected {tok_dir})")
    return model.to(device).eval(), Tokenizer(tok_dir), train_cfg
