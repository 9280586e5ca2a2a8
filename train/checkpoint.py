"""Checkpoints: DeepSpeed's files plus our client state, made safe against crashes mid-write.

A checkpoint is the folder ``<out>/checkpoints/step_NNNNNNN``. Every rank writes its own
loader state and RNG states there, DeepSpeed writes model and optimiser states, and only then
rank 0 writes ``complete.json``: the list of every file with its size. A checkpoint counts only
if that manifest exists and every file still has its recorded size, so a crash mid-write (or a
truncated file later) never makes a half checkpoint the one resumed from: the previous one is.

Resuming on another number of processes goes through DeepSpeed's universal checkpoint
(converted once, beside the original); the data loaders then restart every shard at the
earliest document any old rank had not finished (documents may repeat, none is skipped).

Checkpoints are files people exchange: every ``.pt`` file is read with ``safe_load`` (tensors and
plain data only, ``verify_safe``) before DeepSpeed, which unpickles freely, opens any of them.

This module owns the format both ways: the trainer writes and resumes through it, and
``load_run`` gives any checkpoint back as a model (ZeRO 0-3 consolidated to fp32) with its
tokenizer and typed config, for evaluation, export and ``init_from``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml

from bla import data as lm_data  # the tokenizer module loads only for text models
from bla.model import BLALM

from .deepspeed_import import deepspeed
from .files import atomic_write

if TYPE_CHECKING:
    from .config import TrainConfig

MANIFEST = "complete.json"
UNIVERSAL_SUFFIX = "_universal"


def tag_of(step: int) -> str:
    return f"step_{step:07d}"


def rng_state() -> dict:
    """Every generator's state, in types that ``torch.load(weights_only=True)`` reads back
    (tensors, numbers, strings, lists): no pickled objects in a checkpoint."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    npy, py = state["numpy"], state["python"]
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"])
    np.random.set_state(npy)
    if isinstance(py, dict):
        py = (py["version"], tuple(py["internal"]), py["gauss_next"])
    random.setstate(py)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# Files written before rng states were plain data hold numpy's state as an array: reading them
# allows numpy's array reconstruction, and still nothing that can run code.
try:  # numpy 2 moved the array reconstruction function
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy 1
    from numpy.core.multiarray import _reconstruct
_LEGACY_NUMPY = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


_DEEPSPEED_IMPORT_LOCK = threading.Lock()


def _deepspeed_plain_types() -> list:
    """The classes DeepSpeed pickles into ZeRO checkpoints: an enum, the loss scalers and fragment
    addresses, which hold numbers only (restored by setting attributes, never by calling code of the file's choice)."""
    # one thread at a time: two threads importing these at once (a sweep evaluating two finished
    # runs) can meet in DeepSpeed's circular imports and stop on a _DeadlockError
    with _DEEPSPEED_IMPORT_LOCK:
        deepspeed()  # its log on stderr
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


_SAFE_LOAD_LOCK = threading.Lock()


def safe_load(path: Path, legacy_numpy: bool = False, deepspeed_types: bool = False, **kwargs):
    """``torch.load`` that only reads tensors and plain data: a checkpoint file from elsewhere
    cannot run code. Anything else is a ValueError naming the file."""
    allowed = (_LEGACY_NUMPY if legacy_numpy else []) + (_deepspeed_plain_types() if deepspeed_types else [])
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a bare pickle or a damaged file is neither
        raise ValueError(f"refusing to load {path}: not a file written by torch.save (a zip archive was expected); "
                         "the checkpoint is damaged or the file was put there by something else")  # fmt: skip
    try:
        # safe_globals edits one process-wide list and restores it on exit: threads loading at once
        # (a sweep evaluates its runs in threads) would drop each other's allowances mid-load
        with _SAFE_LOAD_LOCK, torch.serialization.safe_globals(allowed):
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        why = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), type(exc).__name__)
        raise ValueError(
            f"refusing to load {path}: it holds objects other than tensors and plain data, which could run "
            f"code ({why}); load only checkpoints from sources you trust"
        ) from None


def load_rng_state(path: Path) -> dict:
    return safe_load(path, legacy_numpy=True)


def verify_safe(tag_dir: Path) -> None:
    """Read every ``.pt`` file of a checkpoint with safe_load before DeepSpeed (which unpickles
    without restrictions) touches it. Tensors are memory-mapped, not read, where the format allows."""
    for f in sorted(Path(tag_dir).rglob("*.pt")):
        safe_load(f, legacy_numpy=f.name.startswith("rng_rank"), deepspeed_types=True, map_location="cpu", mmap=True)


def write_rank_files(tag_dir: Path, rank: int, loader_state: dict, rng: dict | None = None) -> None:
    """This rank's loader state and RNG state (now's, or ``rng`` taken earlier, e.g. at the
    start of a step that a signal interrupted)."""
    tag_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(tag_dir / f"loader_rank{rank}.json", json.dumps(loader_state).encode())
    tmp = tag_dir / f"rng_rank{rank}.pt.tmp"  # rng_state() is plain data: safe_load reads it
    torch.save(rng if rng is not None else rng_state(), tmp)
    os.replace(tmp, tag_dir / f"rng_rank{rank}.pt")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 23), b""):
            h.update(block)
    return h.hexdigest()


def _manifest_digest(manifest: dict) -> str:
    """The sha256 of a manifest's own content (everything but this digest): the metadata that
    decides how a checkpoint is resumed (step, world size, reason) is covered like its files."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(tag_dir: Path, meta: dict) -> None:
    """complete.json: written last, it marks the checkpoint whole and records each file's size and
    sha256 (so a changed byte is found, not only a short file), and its own digest."""
    files = {p.relative_to(tag_dir).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MANIFEST}  # fmt: skip
    manifest = {**meta, "files": files}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    atomic_write(tag_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    _VERIFIED[str(tag_dir.resolve())] = _signature(tag_dir)  # just hashed: the prune after a save reads nothing again


def _manifest_problem(manifest) -> str | None:
    """What is malformed in a parsed complete.json (None: well formed)."""
    if not isinstance(manifest, dict):
        return f"is a JSON {type(manifest).__name__}, not an object"
    if "manifest_sha256" in manifest and manifest["manifest_sha256"] != _manifest_digest(manifest):
        return "has changed since it was written (its own sha256 differs)"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return "has no file list (\"files\": {name: {\"bytes\": ..., \"sha256\": ...}})"
    if not files:
        return "lists no files"
    for name, entry in files.items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts:
            return f"lists a file outside the checkpoint ({name!r})"
        if isinstance(entry, dict):  # {"bytes": n, "sha256": hex}; manifests before checksums hold the size alone
            size, digest = entry.get("bytes"), entry.get("sha256")
            if not isinstance(digest, str) or len(digest) != 64:
                return f"has no sha256 for {name}"
        else:
            size = entry
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return f"has no size for {name}"
    for key in ("step", "world_size"):
        value = manifest.get(key)
        if key in manifest and (isinstance(value, bool) or not isinstance(value, int) or value < (key == "world_size")):
            return f"has a {key} of {value!r}"
    ranks = sum(1 for name in files if name.startswith("rng_rank") and name.endswith(".pt"))
    if "world_size" in manifest and ranks and ranks != manifest["world_size"]:  # each rank wrote its own RNG file
        return f"says world_size {manifest['world_size']} but lists the files of {ranks} ranks"
    return None


# checkpoints this process hashed already, by the (name, size, mtime) of their files: pruning at every
# save re-checks the newest ones without reading gigabytes again
_VERIFIED: dict[str, tuple] = {}


def _signature(tag_dir: Path) -> tuple:
    files = sorted(p for p in tag_dir.rglob("*") if p.is_file())
    return tuple((p.relative_to(tag_dir).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def check_complete(tag_dir: Path, hashes: bool = True) -> str | None:
    """None when the checkpoint is whole, else what is wrong with it. Sizes are always checked,
    contents (sha256) when ``hashes`` (manifests written before checksums have sizes only)."""
    path = tag_dir / MANIFEST
    if not path.exists():
        return "no complete.json (the save did not finish)"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return f"{path} is not readable JSON"
    malformed = _manifest_problem(manifest)
    if malformed:
        return f"{path} {malformed}"
    key = str(tag_dir.resolve())
    signature = _signature(tag_dir) if hashes else None
    if hashes and _VERIFIED.get(key) == signature:
        return None
    for name, entry in manifest["files"].items():
        size, digest = (entry["bytes"], entry.get("sha256")) if isinstance(entry, dict) else (entry, None)
        f = tag_dir / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
        if hashes and digest is not None and sha256_of(f) != digest:
            return f"{name} has changed since it was written (sha256 differs)"
    if hashes:
        _VERIFIED[key] = signature
    return None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.exists():
        return []
    tags = [p for p in ckpt_dir.iterdir() if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    return sorted(tags, key=lambda p: p.name)


def latest_complete(ckpt_dir: Path, log=print) -> Path | None:
    """The newest whole checkpoint; broken newer ones are reported and passed over."""
    for tag_dir in reversed(list_checkpoints(ckpt_dir)):
        problem = check_complete(tag_dir)
        if problem is None:
            return tag_dir
        log(f"checkpoint {tag_dir.name} is not usable: {problem}; trying the previous one")
    return None


def recoverable(tag_dir: Path) -> bool:
    """Whether a whole checkpoint is one to go back to: not saved because training stopped on
    non-finite losses (its weights gave them), and with finite losses when it was saved (its
    manifest's ``healthy``; checkpoints written before it count as healthy)."""
    meta = read_meta(tag_dir)
    return meta.get("reason") != "nonfinite" and meta.get("healthy", True) is not False


def last_recoverable(ckpt_dir: Path, before_step: int | None = None) -> Path | None:
    """The newest verified ``recoverable`` checkpoint (before ``before_step``)."""
    for tag_dir in reversed(list_checkpoints(ckpt_dir)):
        if before_step is not None and int(tag_dir.name.removeprefix("step_")) >= before_step:
            continue
        if check_complete(tag_dir) is None and recoverable(tag_dir):
            return tag_dir
    return None


def prune(ckpt_dir: Path, keep_last: int) -> list[str]:
    """Delete all checkpoints but the newest ``keep_last`` verified ones (hashes checked) and the
    newest ``keep_last`` verified healthy ones: a non-finite stop's checkpoint, or one saved with a
    non-finite loss, does not stand in for the healthy ones before it, which a diverged run goes
    back to. Broken checkpoints newer than every kept one stay for inspection (resume passes over
    them); retention stays bounded (at most 2 x keep_last whole ones) through any streak."""
    tags = list_checkpoints(ckpt_dir)
    verified = [t for t in reversed(tags) if check_complete(t) is None]  # newest first
    keep = set(verified[:keep_last]) | set([t for t in verified if recoverable(t)][:keep_last])
    if not keep:  # nothing verified: nothing is removed
        return []
    newest_kept = max(t.name for t in keep)
    removed = []
    for t in tags:
        if t not in keep and (t in verified or t.name < newest_kept):
            shutil.rmtree(t, ignore_errors=True)
            shutil.rmtree(t.with_name(t.name + UNIVERSAL_SUFFIX), ignore_errors=True)
            _VERIFIED.pop(str(t.resolve()), None)
            removed.append(t.name)
    return removed


def set_aside(ckpt_dir: Path, tags: list[Path]) -> Path:
    """Move checkpoints out of the resume path, into ``checkpoints/set_aside/<time>/``: a run
    resumed from an older checkpoint, or started afresh on purpose, must not later resume from
    another branch's checkpoints. Nothing is deleted."""
    where = ckpt_dir / "set_aside" / time.strftime("%Y%m%d-%H%M%S")
    where.mkdir(parents=True, exist_ok=True)
    for t in tags:
        for path in (t, t.with_name(t.name + UNIVERSAL_SUFFIX)):
            if path.exists():
                os.replace(path, where / path.name)
    return where


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """DeepSpeed's ``latest`` file (the newest tag), which its ``zero_to_fp32.py`` reads."""
    atomic_write(ckpt_dir / "latest", tag.encode())


def read_meta(tag_dir: Path) -> dict:
    return json.loads((tag_dir / MANIFEST).read_text())


def ensure_universal(tag_dir: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format once (rank 0 only). A universal
    folder is reused only if it is whole and was converted from this very checkpoint (its
    manifest names the source's complete.json by sha256); anything else there is replaced.
    The caller still reads every file of it with ``verify_safe`` before DeepSpeed does."""
    out = tag_dir.with_name(tag_dir.name + UNIVERSAL_SUFFIX)
    source = sha256_of(tag_dir / MANIFEST)
    if out.exists():
        if check_complete(out) is None and read_meta(out).get("converted_from") == source:
            return out
        shutil.rmtree(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"converting {tag_dir} to a universal checkpoint failed:\n{done.stderr[-3000:]}")
    for name in os.listdir(tag_dir):  # our client files travel along
        if name.startswith(("loader_rank", "rng_rank")) or name in ("config.yaml",):
            shutil.copyfile(tag_dir / name, tmp / name)
    meta = {k: v for k, v in read_meta(tag_dir).items() if k not in ("files", "manifest_sha256")}
    write_manifest(tmp, {**meta, "converted_from": source})
    os.replace(tmp, out)
    return out


def loader_states_for(tag_dir: Path, old_world: int, rank: int, world: int, num_workers: int) -> dict | None:
    """Loader state for ``rank``: exact on the same layout, else restarted at the earliest
    unfinished document of any old rank (nothing skipped)."""
    first = json.loads((tag_dir / "loader_rank0.json").read_text())
    if "next_batch" in first:  # a synthetic task loader: ranks move in lockstep and re-split the stream
        return first
    path = tag_dir / f"loader_rank{rank}.json"
    if old_world == world and path.exists():
        state = json.loads(path.read_text())
        if len(state["states"]) == max(1, num_workers):
            return state
    old = [json.loads((tag_dir / f"loader_rank{r}.json").read_text()) for r in range(old_world)]
    # each old shard had consumed its documents below next_doc, the last one possibly only in part
    epoch, last_doc = min((s["epoch"], s["next_doc"] - 1) for o in old for s in o["states"])
    restart = {"epoch": epoch, "next_doc": max(0, last_doc), "packer": {"tokens": [], "positions": []}}
    n = max(1, num_workers)
    return {"states": [dict(restart) for _ in range(n)], "next_worker": 0, "world_size": world, "rank": rank,
            "num_workers": num_workers}  # fmt: skip


# ----------------------------------------------------------------------------- reading a model back


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder (``.../checkpoints/step_N``), or a run folder: its newest whole checkpoint."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} does not exist: expected a run directory or a checkpoint directory")
    if (path / MANIFEST).exists() or path.name.startswith("step_"):
        problem = check_complete(path)
        if problem:
            raise ValueError(f"checkpoint {path} is incomplete: {problem}")
        return path
    said = []  # damaged newer checkpoints are passed over, and the user is told which was read
    found = latest_complete(path / "checkpoints", log=said.append)
    if found is None:
        raise ValueError(f"{path} holds no complete checkpoint under {path / 'checkpoints'}" +
                         (f" ({'; '.join(said)})" if said else ""))  # fmt: skip
    for line in said:
        print(f"bla: {line}", file=sys.stderr)
    if said:
        print(f"bla: reading {found} instead", file=sys.stderr)
    return found


def fp32_state_dict(tag_dir: Path, zero_stage: int) -> dict[str, torch.Tensor]:
    """Consolidated weights: bf16 ZeRO-1 (BF16_Optimizer) joined here, other ZeRO-1/2/3 through
    DeepSpeed's zero_to_fp32, ZeRO-0 from the module file.
    Every file is read safely (tensors and plain data only: no pickled code runs), the ZeRO files
    before DeepSpeed unpickles them."""
    if zero_stage > 0:
        if list(tag_dir.glob(_BF16_OPTIMIZER_FILES)):
            return _bf16_optimizer_state_dict(tag_dir)  # reads its files with safe_load itself
        verify_safe(tag_dir)
        deepspeed()  # its log on stderr
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    states = safe_load(tag_dir / "mp_rank_00_model_states.pt", deepspeed_types=True, map_location="cpu")
    return {k: v.float() for k, v in states["module"].items()}


_BF16_OPTIMIZER_FILES = "bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"


def _bf16_optimizer_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a checkpoint written by DeepSpeed's BF16_Optimizer (ZeRO-1 in
    bf16 with fp32 gradients, the GPU default). Its zero_to_fp32 refuses these files (they carry no
    ``zero_stage``), so they are joined here: each rank holds one contiguous partition of every
    parameter group's flat fp32 vector; the ranks' partitions in order, less the padding at the
    end, are the group's parameters in ``param_shapes`` order."""
    model_states = safe_load(tag_dir / "mp_rank_00_model_states.pt", deepspeed_types=True, map_location="cpu")
    files = sorted(tag_dir.glob(_BF16_OPTIMIZER_FILES), key=lambda f: int(f.name.split("_")[4]))  # bf16_zero_pp_rank_R_...
    parts = [safe_load(f, deepspeed_types=True, map_location="cpu")["optimizer_state_dict"]["single_partition_of_fp32_groups"]
             for f in files]  # fmt: skip
    if model_states.get("dp_world_size", len(files)) != len(files):
        raise ValueError(f"checkpoint {tag_dir}: {len(files)} optimizer files for {model_states['dp_world_size']} ranks")
    state = {}
    for group, shapes in enumerate(model_states["param_shapes"]):
        flat = torch.cat([rank_parts[group] for rank_parts in parts])
        offset = 0
        for name, shape in shapes.items():
            n = torch.Size(shape).numel()
            if offset + n > flat.numel():
                raise ValueError(f"checkpoint {tag_dir}: parameter group {group} holds {flat.numel()} values, "
                                 f"fewer than its parameters need (at {name})")  # fmt: skip
            state[name] = flat[offset : offset + n].view(shape).float().clone()
            offset += n
    for name in model_states["buffer_names"]:
        buffer = model_states["module"][name]
        state[name] = buffer.float() if buffer.is_floating_point() else buffer
    for name, source in model_states["shared_params"].items():  # tied weights: one tensor, two names
        state[name] = state[source]
    return state


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


def saved_train_config(tag_dir: Path) -> "TrainConfig":
    """A checkpoint's typed run config (a legacy config's gates resolved); a config.yaml that is
    missing, not YAML, or holds wrong values is a ValueError naming it, never a traceback."""
    from .config import TrainConfig

    path = tag_dir / "config.yaml"
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"checkpoint {tag_dir} has no readable config.yaml ({exc.strerror})") from None
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path} is not YAML ({type(exc).__name__}): the checkpoint is damaged") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ValueError(f"{path} is not a run config (a mapping with a model section): the checkpoint is damaged")
    try:
        return TrainConfig.from_saved(saved)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ValueError(f"{tag_dir / 'config.yaml'} is not a valid run config ({exc}): the checkpoint is damaged") from None


def load_run(path: str | Path, device: str | torch.device = "cpu") -> tuple[BLALM, "lm_data.Tokenizer | None", "TrainConfig"]:
    """(model in eval mode, tokenizer (None for tasks without text), the run's train config) of a
    run's newest whole checkpoint or of one checkpoint."""
    from bla.data.tasks import task_named

    tag_dir = resolve_checkpoint(path)
    train_cfg = saved_train_config(tag_dir)
    model = BLALM(train_cfg.model)
    load_weights(model, fp32_state_dict(tag_dir, train_cfg.zero_stage), f"checkpoint {tag_dir}")
    if not task_named(train_cfg.data.task).needs_text:
        return model.to(device).eval(), None, train_cfg
    tok_dir = tag_dir.parent.parent / "tokenizer"
    if not tok_dir.exists():
        raise ValueError(f"no tokenizer beside the checkpoint (expected {tok_dir})")
    tok = lm_data.Tokenizer(tok_dir)
    lm_data.check_same_tokenizer(tok, read_meta(tag_dir).get("tokenizer"), f"checkpoint {tag_dir}")
    return model.to(device).eval(), tok, train_cfg
