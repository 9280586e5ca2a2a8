"""Pretraining on DeepSpeed: ``run(cfg)`` trains, evaluates, logs and checkpoints.

Launch as one process (``bla train``), with ``torchrun --nproc_per_node N -m bla.train.cli`` or
with the ``deepspeed`` launcher; CPU runs use gloo, GPU runs NCCL. All parallel setup lives
here; the model is the single-device ``BLALM``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from bla import data as lm_data  # loads text-data modules (datasets, tokenizers) on first use only
from bla.data import regbench
from bla.data.synthetic import TaskLoader, mqar_examples
from bla.eval.tasks import label_accuracy
from bla.model import BLALM, ModelConfig, flops_per_token, param_count

from . import checkpoint as ckpt
from . import lock as out_lock
from . import sequence_parallel
from .peak import peak_flops
from .config import TrainConfig
from .schedule import lr_lambda

HELD_OUT_SEED = 1_000_003  # evaluation examples of synthetic tasks come from another seed stream


# ----------------------------------------------------------------------------- setup


def init_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device; a lone process gets a world of one (gloo on CPU)."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def _publish(tmp: Path, final: Path) -> None:
    """Move a cache entry built under a private name into place. Concurrent runs (``bla sweep
    --jobs``) may build the same entry; the first rename wins and the others drop their copy."""
    try:
        tmp.rename(final)
    except OSError:  # ``final`` exists and is not empty
        shutil.rmtree(tmp)


def _cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _architecture(c: ModelConfig) -> dict:
    """A model config flattened (``bla.*`` dotted), without the BLA backend: how BLA is computed,
    not what."""
    d = c.to_dict()
    return {**{k: v for k, v in d.items() if k != "bla"}, **{f"bla.{k}": v for k, v in d["bla"].items() if k != "backend"}}


def architecture_diff(a: ModelConfig, b: ModelConfig) -> list[str]:
    """The model config keys on which two models compute differently."""
    fa, fb = _architecture(a), _architecture(b)
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k))


def initial_weights(cfg: TrainConfig, log):
    """(model, tokenizer or None) of ``cfg.init_from``, refused unless its architecture is this run's."""
    from bla.eval.load import load_model

    model, tok, _ = load_model(cfg.init_from)
    diff = architecture_diff(cfg.model, model.cfg)
    if diff:
        raise ValueError(f"init_from={cfg.init_from}: its model config differs from this run's in {diff}")
    log(f"initial weights from {cfg.init_from}" + (f" (and its tokenizer {tok.path})" if tok is not None else ""))
    return model, tok


def _sources_key(d) -> tuple:
    """What names a training stream in cache keys (the mixture rule only matters for several sources)."""
    return (d.sources, d.mixture) if len(d.sources) > 1 else (d.sources,)


def _source_config(d, sources: list[str]) -> lm_data.DataSourceConfig:
    return lm_data.DataSourceConfig([lm_data.parse_source(s) for s in sources], seed=d.seed, mixture=d.mixture)


def ensure_tokenizer(cfg: TrainConfig, rank: int, log) -> lm_data.Tokenizer:
    """The configured tokenizer, or one trained on the training sources and cached."""
    d = cfg.data
    if d.tokenizer != "auto":
        return lm_data.Tokenizer(d.tokenizer)
    cache = Path(cfg.cache_dir).expanduser() / "tokenizers" / _cache_key(*_sources_key(d), d.tokenizer_kind, cfg.model.vocab_size)
    name = "tokenizer.json" if d.tokenizer_kind == "bpe" else "tokenizer.model"
    if rank == 0 and not (cache / name).exists():
        log(f"training a {d.tokenizer_kind} tokenizer of {cfg.model.vocab_size} tokens on {d.sources} -> {cache}")
        texts = (ex["text"] for ex in lm_data.load_documents(_source_config(d, d.sources)))
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        lm_data.train_tokenizer(texts, tmp, kind=d.tokenizer_kind, vocab_size=cfg.model.vocab_size,
                                progress=cfg.progress)  # fmt: skip
        _publish(tmp, cache)
    dist.barrier()
    return lm_data.Tokenizer(cache / name)


def ensure_shards(cfg: TrainConfig, tok: lm_data.Tokenizer, rank: int, log) -> Path | None:
    d = cfg.data
    if d.shards == "none":
        return None
    if d.shards != "auto":
        return Path(d.shards)
    out = Path(cfg.cache_dir).expanduser() / "shards" / _cache_key(*_sources_key(d), tok.sha256)
    if rank == 0 and not (out / "manifest.json").exists():
        log(f"tokenising {d.sources} once into shards at {out}")
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        source = _source_config(d, d.sources)
        lm_data.prepare(source, tok, tmp, progress=cfg.progress)
        if out.exists() and not (out / "manifest.json").exists():
            shutil.rmtree(out)  # a partial directory left by an interrupted run of an older version
        _publish(tmp, out)
    dist.barrier()
    return out


# ----------------------------------------------------------------------------- the run


class TrainingStopped(RuntimeError):
    """The run ended early on non-finite losses (its checkpoint saved)."""


class _StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint and a clean exit after the current micro-batch (the
    checkpoint holds the state of the last whole step)."""

    def __init__(self):
        self.raised = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.raised = signal.Signals(signum).name


def _all_reduce(value: float, op=dist.ReduceOp.SUM) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return float(t.item())


def _any_rank(*flags: bool) -> list[bool]:
    """Each flag, true if it is true on any rank (one collective for all)."""
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_loss(engine, batch: dict, device, sp_ctx=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, logits). Under sequence parallelism each rank scores its slice and
    returns sp x (its summed NLL) / (the group's label count): DeepSpeed averages gradients over
    all ranks, which then gives the data-parallel mean of every group's token-mean loss. The
    value returned for logging is the group's mean (identical on the group's ranks)."""
    if sp_ctx is None:
        b = _to(batch, device)
        out = engine(b["input_ids"], cu_seqlens=b.get("cu_seqlens"), labels=b["labels"], positions=b.get("positions"))
        return out.loss, out.logits
    b = _to(sequence_parallel.shard(batch, sp_ctx), device)
    out = engine(b["input_ids"], cu_seqlens=b["cu_seqlens"], positions=b["positions"])
    nll = torch.nn.functional.cross_entropy(out.logits[0].float(), b["labels"][0], ignore_index=-100, reduction="sum")
    count = (b["labels"] != -100).sum().to(nll.dtype)
    stats = torch.stack([nll.detach(), count])
    dist.all_reduce(stats, group=sp_ctx.group)
    loss = nll * sp_ctx.size / stats[1].clamp_min(1.0)
    # report the group's mean while back-propagating this rank's share
    report = stats[0] / stats[1].clamp_min(1.0)
    return loss + (report - loss).detach(), out.logits


def train_loader(cfg: TrainConfig, tok: lm_data.Tokenizer | None, shards, rank: int, world: int):
    d = cfg.data
    if d.task == "mqar":
        make = lambda n, seed: mqar_examples(n, d.seq_len, d.mqar, seed)  # noqa: E731
        return TaskLoader(make, cfg.micro_batch, d.seed, rank, world)
    if d.task == "regbench":
        make = lambda n, seed: regbench.training_batch(n, d.seq_len, d.regbench, seed)  # noqa: E731
        return TaskLoader(make, cfg.micro_batch, d.seed, rank, world)
    src = _source_config(d, d.sources)
    return lm_data.build_loader(lm_data.LoaderConfig(d.seq_len, cfg.micro_batch, d.num_workers, rank, world, loop=True), tok, src, shards)


def eval_loader(cfg: TrainConfig, tok: lm_data.Tokenizer | None, rank: int, world: int):
    d = cfg.data
    if d.task == "mqar":  # held-out examples: another seed stream than training's
        make = lambda n, seed: mqar_examples(n, d.seq_len, d.mqar, seed)  # noqa: E731
        return TaskLoader(make, cfg.micro_batch, d.seed + HELD_OUT_SEED, rank, world)
    src = _source_config(d, d.val_sources)
    return lm_data.build_loader(lm_data.LoaderConfig(d.seq_len, cfg.micro_batch, 0, rank, world, loop=True), tok, source=src)


def evaluate_regbench(engine, cfg: TrainConfig, rank: int, world: int, device) -> dict:
    """Accuracy and TV distance on held-out automata (the test pool), split across ranks."""
    d = cfg.data
    test = regbench.cached_pools(d.regbench)[1][rank::world]
    totals = {"accuracy": 0.0, "tvd": 0.0, "positions": 0.0}
    engine.eval()
    with torch.no_grad():
        for b in range(cfg.eval_batches):
            chunk = test[b * cfg.micro_batch : (b + 1) * cfg.micro_batch] or test[: cfg.micro_batch]
            x, _, automata = regbench.encode_examples(chunk, d.seq_len, seed=HELD_OUT_SEED + b)
            m = regbench.regbench_metrics(engine(x.to(device)).logits, x, automata)
            for k in ("accuracy", "tvd"):
                totals[k] += m[k] * m["positions"]
            totals["positions"] += m["positions"]
    engine.train()
    n = max(_all_reduce(totals["positions"]), 1.0)
    return {"val_accuracy": _all_reduce(totals["accuracy"]) / n, "val_tvd": _all_reduce(totals["tvd"]) / n}


def evaluate(engine, cfg: TrainConfig, tok: lm_data.Tokenizer | None, rank: int, world: int, device, sp_ctx=None) -> dict:
    """Validation loss and perplexity (and accuracy for tasks); every rank runs the same number of
    batches (ZeRO-3 gathers parameters collectively) over its own part of the data."""
    if cfg.data.task == "regbench":
        return evaluate_regbench(engine, cfg, rank, world, device)
    total = count = correct = examples = nbytes = 0.0
    engine.eval()
    with torch.no_grad():
        for _, batch in zip(range(cfg.eval_batches), eval_loader(cfg, tok, rank, world)):
            loss, logits = forward_loss(engine, batch, device, sp_ctx)
            labels = batch["labels"]  # the whole row's: SP ranks report their group's mean
            n = float((labels != -100).sum())
            total += float(loss) * n
            count += n
            if cfg.data.task == "lm":  # the predicted text's UTF-8 bytes (special tokens have none)
                nbytes += len(tok.decode(labels[labels != -100].tolist()).encode("utf-8"))
            if cfg.data.task != "lm":
                acc = label_accuracy(logits, labels.to(logits.device))
                correct += float(acc.nansum())
                examples += float((~acc.isnan()).sum())
    engine.train()
    loss = _all_reduce(total) / max(_all_reduce(count), 1.0)
    result = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
    if cfg.data.task == "lm":  # comparable across tokenizers: nats per token -> bits per byte
        result["val_bits_per_byte"] = _all_reduce(total) / math.log(2) / max(_all_reduce(nbytes), 1.0)
    if cfg.data.task != "lm":
        result["val_accuracy"] = _all_reduce(correct) / max(_all_reduce(examples), 1.0)
    return result


def run(cfg: TrainConfig) -> dict:
    """Train to ``cfg.steps``; returns the run's summary (also written to out_dir/summary.json).
    One process group per out_dir: its rank 0 holds the directory's lock for the whole run."""
    cfg.validate()
    rank, world, device = init_distributed()
    lock, refused = None, None
    if rank == 0:
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        try:
            lock = out_lock.acquire(Path(cfg.out_dir), lambda msg: print(f"[bla train] {msg}", flush=True))
        except out_lock.OutDirLocked as exc:
            refused = exc
    if _any_rank(refused is not None)[0]:
        raise refused or out_lock.OutDirLocked(f"{cfg.out_dir} is in use by another training process (see rank 0)")
    try:
        return _train(cfg, rank, world, device)
    finally:
        out_lock.release(lock)


def _previous_losses(out: Path, step: int) -> list[dict]:
    """The loss history of the run's earlier processes up to ``step`` (from its summary.json)."""
    try:
        earlier = json.loads((out / "summary.json").read_text()).get("losses", [])
    except (OSError, ValueError):
        return []
    return [h for h in earlier if isinstance(h, dict) and h.get("step", step + 1) <= step]


def _train(cfg: TrainConfig, rank: int, world: int, device) -> dict:
    import deepspeed

    sp_ctx, data_rank, data_world = None, rank, world
    if cfg.sequence_parallel_size > 1:
        if cfg.data.task != "lm":
            raise ValueError("sequence parallelism splits packed text rows: data.task must be lm")
        sp_ctx, data_rank, data_world = sequence_parallel.new_groups(cfg.sequence_parallel_size)
    log = (lambda msg: print(f"[bla train] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")

    task = cfg.data.task
    tok = shards = None
    # read even when resuming: a run started from init_from keeps that model's tokenizer
    init_model, init_tok = initial_weights(cfg, log) if cfg.init_from else (None, None)
    if task == "lm":
        tok = init_tok if init_tok is not None and cfg.data.tokenizer == "auto" else ensure_tokenizer(cfg, rank, log)
        lm_data.check_vocab(tok, cfg.model.vocab_size)
        shards = ensure_shards(cfg, tok, rank, log)

    resume_from, universal, meta = None, False, {}
    if cfg.resume != "none":
        resume_from = ckpt.latest_complete(ckpt_dir, log) if cfg.resume == "auto" else Path(cfg.resume)
        if resume_from is not None:
            problem = ckpt.check_complete(resume_from)
            if problem:
                raise ValueError(f"cannot resume from {resume_from}: {problem}")
            meta = ckpt.read_meta(resume_from)
            lm_data.check_same_tokenizer(tok, meta.get("tokenizer"), f"checkpoint {resume_from}")
            saved = ModelConfig.from_saved(yaml.safe_load((resume_from / "config.yaml").read_text())["model"])
            diff = architecture_diff(cfg.model, saved)
            if diff:  # e.g. a run trained before bla.gates existed (dirichlet_v1), resumed with the new default
                theirs = _architecture(saved)
                fix = " ".join(f"model.{k}={json.dumps(theirs.get(k))}" for k in diff)
                raise ValueError(
                    f"cannot resume from {resume_from}: its model config differs from this run's in {diff}; "
                    f"resume with the checkpoint's settings: {fix}"
                )
            universal = meta["world_size"] != world
    dist.barrier()

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = BLALM(cfg.model)
    if init_model is not None and resume_from is None:
        model.load_state_dict(init_model.state_dict())
    model.activation_checkpointing = cfg.activation_checkpointing
    if sp_ctx is not None:
        sequence_parallel.enable(model, sp_ctx)
    n_params = param_count(cfg.model)
    ds_config = cfg.deepspeed(bf16, universal)
    if rank == 0:  # what DeepSpeed was given, user overrides (deepspeed_config) merged in
        (out / "deepspeed.json").write_text(json.dumps(ds_config, indent=1))
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
    )  # fmt: skip
    loader = train_loader(cfg, tok, shards, data_rank, data_world)  # an SP group shares its batches

    step, tokens_seen, skipped = 0, 0, 0
    if resume_from is not None:
        load_dir = resume_from
        ckpt.verify_safe(resume_from)  # before DeepSpeed unpickles anything of it
        if universal:
            if rank == 0:
                log(f"resuming a {meta['world_size']}-process checkpoint on {world}: converting to a universal checkpoint")
                ckpt.ensure_universal(resume_from)
            dist.barrier()
            load_dir = resume_from.with_name(resume_from.name + ckpt.UNIVERSAL_SUFFIX)
        _, client = engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name, load_module_strict=True)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {load_dir}")
        step, tokens_seen, skipped = client["step"], client["tokens_seen"], client.get("skipped", 0)
        loader.load_state_dict(ckpt.loader_states_for(resume_from, meta["world_size"], rank, world, cfg.data.num_workers))
        if not universal:
            ckpt.set_rng_state(ckpt.load_rng_state(resume_from / f"rng_rank{rank}.pt"))
        log(f"resumed from {resume_from} at step {step}")
        if step >= cfg.steps and rank == 0 and (out / "summary.json").exists():
            log(f"{resume_from} is already at step {step} of {cfg.steps}: nothing to train; summary.json left as is")
            return json.loads((out / "summary.json").read_text())  # other ranks find no step to run

    if rank == 0:
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        if tok is not None:
            tok.save(out / "tokenizer")
    writer = None
    if rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out / "tb"))
        except ImportError as exc:  # a bare machine: the metrics still go to the log and summary.json
            log(f"TensorBoard is not available ({exc}); logging to stdout and summary.json only")

    if cfg.peak_flops:
        peak = cfg.peak_flops
    else:  # every rank measures alike (no rank waits on another); rank 0 logs where it came from
        peak, origin = peak_flops(device, torch.bfloat16 if bf16 else torch.float32, cfg.cache_dir)
        log(f"MFU against {peak / 1e12:.2f} TFLOP/s per device ({origin})")
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_step = cfg.micro_batch * cfg.data.seq_len * cfg.grad_accum * data_world

    def save(reason: str, boundary: tuple[dict, dict] | None = None) -> Path:
        """A checkpoint of step ``step``; ``boundary``: the loader and RNG states taken when that
        step ended, for a save from inside the next one (its micro-batches are then redone)."""
        tag_dir = ckpt_dir / ckpt.tag_of(step)
        if boundary is not None and ckpt.check_complete(tag_dir, hashes=False) is None:
            log(f"{tag_dir} already holds the state of step {step}")
            return tag_dir
        loader_state, rng = boundary if boundary is not None else (loader.state_dict(), None)
        ckpt.write_rank_files(tag_dir, rank, loader_state, rng)
        client = {"step": step, "tokens_seen": tokens_seen, "skipped": skipped, "config": cfg.to_dict(),
                  "tokenizer": tok.describe() if tok else None, "universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}  # fmt: skip
        engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name, client_state=client, save_latest=False)
        dist.barrier()
        if rank == 0:
            (tag_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            ckpt.write_manifest(tag_dir, {"step": step, "world_size": world, "reason": reason,
                                          "tokenizer": tok.describe() if tok else None})  # fmt: skip
            removed = ckpt.prune(ckpt_dir, cfg.keep_last)
            log(f"saved {tag_dir} ({reason})" + (f"; removed {', '.join(removed)}" if removed else ""))
        dist.barrier()
        return tag_dir

    stop = _StopFlag()
    # a resumed run's summary keeps the losses of its earlier processes
    history, last_eval = (_previous_losses(out, step) if resume_from is not None and rank == 0 else []), {}
    it = iter(loader)
    bar = tqdm(total=cfg.steps, initial=step, desc="train", disable=rank != 0 or not cfg.progress, dynamic_ncols=True)
    t_last, tokens_last = time.perf_counter(), tokens_seen
    status, streak, grad_norm = "finished", 0, float("nan")
    while step < cfg.steps:
        boundary = (loader.state_dict(), ckpt.rng_state())  # what a save from inside this step records
        micro_losses, halt = [], None
        while len(micro_losses) < cfg.grad_accum:
            loss, _ = forward_loss(engine, next(it), device, sp_ctx)
            nonfinite, signalled = _any_rank(not bool(torch.isfinite(loss.detach()).all()), stop.raised is not None)
            if signalled:
                halt = f"interrupted by {stop.raised or 'a signal on another rank'}"
                break
            if nonfinite:
                skipped += 1
                streak += 1
                log(f"non-finite loss at step {step + 1} (micro-batch dropped; {skipped} so far, {streak} in a row)")
                if writer:
                    writer.add_scalar("train/nonfinite_skipped", skipped, step + 1)
                if cfg.nan_policy == "stop":
                    halt = "stopped on a non-finite loss (nan_policy=stop)"
                elif streak >= cfg.nonfinite_limit:
                    halt = f"stopped on {streak} non-finite losses in a row (nonfinite_limit={cfg.nonfinite_limit})"
                if halt:
                    break
                continue
            streak = 0
            engine.backward(loss)
            if writer and cfg.zero_stage == 0 and len(micro_losses) == cfg.grad_accum - 1 and _logs(step + 1, cfg):
                grad_norm = _grad_norm(engine)  # before step() clears the gradients
            engine.step()
            micro_losses.append(float(loss.detach()))
        if halt:  # the weights are still those of step ``step``: its checkpoint, then out
            save("signal" if halt.startswith("interrupted") else "nonfinite", boundary)
            status = f"{halt}; checkpoint of step {step} saved"
            break
        step += 1
        tokens_seen += tokens_per_step
        loss_mean = _all_reduce(sum(micro_losses) / len(micro_losses)) / world  # SP ranks report their group's loss
        history.append({"step": step, "loss": loss_mean})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_mean:.3f}")
        if _logs(step, cfg):
            now = time.perf_counter()
            tps = (tokens_seen - tokens_last) / max(now - t_last, 1e-9)
            t_last, tokens_last = now, tokens_seen
            if writer:
                gn = engine.get_global_grad_norm()  # None at ZeRO-0: then the norm taken before step()
                scalars = {"train/loss": loss_mean, "train/lr": scheduler.get_last_lr()[0], "train/tokens_per_s": tps,
                           "train/grad_norm": float(gn if gn is not None else grad_norm), "train/tokens": tokens_seen}  # fmt: skip
                if peak:  # the model FLOPs of spec section 3 over the device peak
                    scalars["train/mfu"] = fpt * tps / (peak * world)
                if sp_ctx is not None:
                    scalars["train/sp_comm_bytes_per_micro_batch"] = float(sum(sp_ctx.comm_bytes.values()))
                scalars["train/memory_gb"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
                                              _rss_bytes()) / 1e9  # fmt: skip
                for k, v in scalars.items():
                    writer.add_scalar(k, v, step)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_eval = evaluate(engine, cfg, tok, data_rank, data_world, device, sp_ctx)
            log(f"step {step}: train loss {loss_mean:.4f}, " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            if writer:
                for k, v in last_eval.items():
                    writer.add_scalar(f"val/{k.removeprefix('val_')}", v, step)
        signalled = _any_rank(stop.raised is not None)[0]
        boxed = step == cfg.stop_at
        if step % cfg.save_every == 0 or step == cfg.steps or signalled or boxed:
            save("signal" if signalled else "stop_at" if boxed else "periodic" if step < cfg.steps else "final")
        if signalled:
            status = f"interrupted by {stop.raised or 'a signal on another rank'}; checkpoint saved"
            break
        if boxed:
            status = f"stopped at stop_at={step}; checkpoint saved"
            break
    bar.close()
    if writer:
        _write_hparams(writer, cfg, {"val_loss": last_eval.get("val_loss"), "train_loss": history[-1]["loss"] if history else None})
        writer.close()
    summary = {
        "status": status, "step": step, "tokens_seen": tokens_seen, "skipped_micro_batches": skipped,
        "params": n_params, "world_size": world, "precision": "bf16" if bf16 else "fp32", "zero_stage": cfg.zero_stage,
        **last_eval, "losses": history, "out_dir": str(out), "checkpoints": str(ckpt_dir),
        "tensorboard": str(out / "tb"), "tokenizer": str(out / "tokenizer") if tok else None,
    }  # fmt: skip
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        log(f"{status} at step {step}: {tokens_seen:,} tokens; " +
            ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()) +
            f"\n  config      {out / 'config.yaml'}\n  checkpoints {ckpt_dir}\n  tensorboard {out / 'tb'}"
            f"\n  tokenizer   {out / 'tokenizer'}\n  summary     {out / 'summary.json'}")  # fmt: skip
    if status.startswith("stopped on"):
        raise TrainingStopped(f"training {status}; lower optim.lr or check the data, then resume")
    return summary


def _write_hparams(writer, cfg: TrainConfig, metrics: dict) -> None:
    """The run's settings (flattened, scalars only) beside its final metrics, for TensorBoard's
    HParams tab: runs of a sweep compare there."""
    flat, todo = {}, [("", cfg.to_dict())]
    while todo:
        prefix, d = todo.pop()
        for k, v in d.items():
            if isinstance(v, dict):
                todo.append((f"{prefix}{k}.", v))
            elif isinstance(v, (bool, int, float, str)):
                flat[f"{prefix}{k}"] = v
            elif isinstance(v, list):
                flat[f"{prefix}{k}"] = ",".join(map(str, v))
    finite = {f"final/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    writer.add_hparams(flat, finite, run_name=".")


def _logs(step: int, cfg: TrainConfig) -> bool:
    return step % cfg.log_every == 0 or step == cfg.steps


def _grad_norm(engine) -> torch.Tensor:
    """The global L2 norm of the gradients held by the module (ZeRO-0: whole and already averaged
    over ranks at the accumulation boundary); read only when logged, so no sync per step."""
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(float("nan"))


def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

