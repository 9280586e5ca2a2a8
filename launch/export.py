"""``bla export``: a trained model in the form inference tools expect.

From any checkpoint (ZeRO 0-3, any number of ranks: consolidated through ``bla.eval.load``) or an
earlier export, to a directory holding

- ``model.safetensors`` (float32 or bfloat16), ``config.json``, ``generation_config.json``;
- the tokenizer (``tokenizer.json`` with its Hugging Face config, or ``tokenizer.model``);
- the modeling code: ``configuration_bla.py`` and ``modeling_bla.py`` (the Hugging Face classes)
  plus ``bla_*.py``, copies of the model and kernel sources with their imports made relative,
  so ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` needs nothing else;
- ``bla_export.json``: the source, and the training config (evaluation of the export reads it).

The directory is written beside its destination and renamed into place, so an interrupted
export never leaves a partial one.
"""

from __future__ import annotations

import json
import re
import shutil
from importlib import resources
from pathlib import Path

import torch

from bla.data import Tokenizer
from bla.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, SPECIALS
from bla.eval import load as loading
from bla.model import BLALM
from bla.train import checkpoint as ckpt

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# (package, module) copied into the export as bla_<module>.py: the model and the kernels it calls
MODEL_SOURCES = [("bla.model", m) for m in ("config", "registry", "layers", "mixers", "gsa", "lm")]
KERNEL_SOURCES = [("bla.kernels", m) for m in ("api", "checks", "chunked", "gates", "gsa", "reference", "triton_bla")]
HF_FILES = ("configuration_bla.py", "modeling_bla.py")
SPECIAL_IDS = {"pad_token_id": PAD_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}
_EXPORTED = {m for _, m in MODEL_SOURCES + KERNEL_SOURCES}


def flatten_imports(source: str, name: str) -> str:
    """Make one module's imports point at the flat ``bla_<module>`` copies beside it."""

    def relative(match: re.Match) -> str:
        module = match.group(2)
        if module not in _EXPORTED:
            raise ValueError(f"{name}: imports .{module}, which the export does not carry")
        return f"{match.group(1)}from .bla_{module} import"

    out = re.sub(r"^(\s*)from \.(\w+) import", relative, source, flags=re.M)
    out = re.sub(r"^(\s*)from \. import (\w+)", lambda m: f"{m.group(1)}from . import bla_{m.group(2)} as {m.group(2)}", out, flags=re.M)
    out = re.sub(r"^(\s*)from bla\.kernels import", r"\1from .bla_api import", out, flags=re.M)
    out = re.sub(r"^(\s*)from bla\.kernels\.(\w+) import", relative, out, flags=re.M)
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
        files[name] = resources.files("bla.launch").joinpath("hf", name).read_text()
    return files


def hf_config(model: BLALM, dtype: str) -> dict:
    cfg = model.cfg
    return {
        "architectures": ["BLAForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_bla.BLALMConfig", "AutoModelForCausalLM": "modeling_bla.BLAForCausalLM"},
        "model_type": loading.EXPORT_MODEL_TYPE,
        "bla_model": cfg.to_dict(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "tie_word_embeddings": cfg.tie_embeddings,
        **SPECIAL_IDS,
        "dtype": dtype,
    }


def _write_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    tokenizer.save(out)
    pad, bos, eos = SPECIALS
    specials = {"pad_token": pad, "bos_token": bos, "eos_token": eos}
    if tokenizer.kind == "bpe":
        # no post-processor in tokenizer.json: encode() adds no specials, as in training
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **specials, "clean_up_tokenization_spaces": False}
    else:
        # LlamaTokenizer reads the SentencePiece model; it decodes exactly as ours and encodes the
        # same except where a text starts with spaces (Metaspace keeps one fewer "▁" there)
        config = {"tokenizer_class": "LlamaTokenizer", **specials, "unk_token": "<unk>", "add_bos_token": False,
                  "add_eos_token": False, "legacy": True, "add_prefix_space": None}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def write_export(model: BLALM, tokenizer: Tokenizer | None, out: str | Path, dtype: str = "float32",
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
    tensors = {loading.EXPORT_PREFIX + k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp / loading.EXPORT_WEIGHTS), metadata={"format": "pt"})
    (tmp / loading.EXPORT_WEIGHTS).chmod(0o644)  # safetensors writes it private; an export is for sharing
    (tmp / loading.EXPORT_CONFIG).write_text(json.dumps(hf_config(model, dtype), indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(SPECIAL_IDS, indent=2) + "\n")
    if tokenizer is not None:
        _write_tokenizer(tokenizer, tmp)
    for name, text in _code_files().items():
        (tmp / name).write_text(text)
    # every file's sha256, so a changed byte is found on load (the config and the code included)
    files = {p.name: ckpt.sha256_of(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / loading.EXPORT_INFO).write_text(json.dumps({"dtype": dtype, **(info or {}), "files": files}, indent=2, default=str) + "\n")

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
    if loading.is_export(source):
        model, tokenizer, train_cfg = loading.load_exported(source)
        info_file = Path(source) / loading.EXPORT_INFO
        previous = loading.read_json(info_file).get("source", {}) if info_file.exists() else {}
        origin = {"export": str(source), "from": previous}
    else:
        tag_dir = loading.resolve_checkpoint(source)
        model, tokenizer, train_cfg = loading.load_run(tag_dir)
        origin = {"checkpoint": str(tag_dir)}
    return write_export(model, tokenizer, out, dtype, {"source": origin, "train_config": train_cfg}, overwrite)


def add_export_command(sub) -> None:
    p = sub.add_parser("export", help="a checkpoint to safetensors + a Hugging Face model directory")
    p.add_argument("source", help="run directory, checkpoint directory (any ZeRO stage), or an earlier export")
    p.add_argument("out", help="directory to write")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--overwrite", action="store_true", help="replace an existing directory at OUT")

    def run(args) -> int:
        path = export(args.source, args.out, args.dtype, args.overwrite)
        print(f"exported {args.source} -> {path}")
        return 0

    p.set_defaults(func=run)
