"""Pretraining on DeepSpeed: ``run(cfg)`` trains, evaluates, logs and checkpoints.

Launch as one process (``bla train``), with ``torchrun --nproc_per_node N -m bla.train.cli`` or
with the ``deepspeed`` launcher; CPU runs use gloo, GPU runs NCCL. All parallel setup lives
here; the model is the single-device ``BLALM``. A run is a short sequence of named steps
(``_Run``): parallel groups, data, the resume point, the engine, restore, logs, the step loop,
the summary. What the task trains on and how it is scored comes from its module
(``bla.data.task``); tokenizer, shards and ``init_from`` from ``bla.train.prepare``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from tqdm import tqdm

from bla import data as lm_data  # loads text-data modules (datasets, tokenizers) on first use only
from bla.data.packing import pad_cu_seqlens
from bla.data.task import IGNORE
from bla.data.tasks import task_named
from bla.model import BLALM, flops_per_token, param_count

from . import checkpoint as ckpt
from . import lock as out_lock
from . import sequence_parallel
from .bf16_grads import fuse_hp_grad_update
from .config import TrainConfig
from .deepspeed_import import deepspeed as import_deepspeed
from .files import atomic_write
from .peak import peak_flops
from .prepare import architecture, architecture_diff, ensure_shards, ensure_tokenizer, initial_weights
from .schedule import lr_lambda


# ----------------------------------------------------------------------------- setup


_made_lone_world = False  # init_distributed set RANK etc. itself (a module flag: children do not inherit it)


def init_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device; a lone process gets a world of one (gloo on CPU)."""
    deepspeed = import_deepspeed()
    global _made_lone_world
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if "RANK" not in os.environ or _made_lone_world:
            # a world of one: port 0 lets its store bind a free port itself (a port found free
            # beforehand can be taken by another process before the store binds it: EADDRINUSE)
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
            _made_lone_world = True
        if os.environ.get("WORLD_SIZE") == "1" or not cuda:
            # skip DeepSpeed's CPU shared-memory collectives, which it otherwise compiles when its
            # backend starts (about 75 s whenever its JIT cache is cold or stale): they serve only
            # its inference all-reduce (tensor-parallel inference), which training never calls, and
            # one process has no one to share memory with
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def shutdown_distributed() -> None:
    """Destroy the process group before the interpreter exits: gloo's worker threads, left
    running at exit, abort the process ("terminate called without an active exception",
    pytorch/pytorch#190489) after a run that finished, failing its launcher."""
    if dist.is_initialized():
        dist.destroy_process_group()


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


_FLAG_GROUP = {}  # backend -> a gloo group for host-side flags (a NCCL collective would wait for the GPU)


def _flag_group():
    if dist.get_backend() != "nccl":
        return None
    if "gloo" not in _FLAG_GROUP:
        _FLAG_GROUP["gloo"] = dist.new_group(backend="gloo")
    return _FLAG_GROUP["gloo"]


def _any_rank(*flags: bool) -> list[bool]:
    """Each flag, true if it is true on any rank (one collective for all, on the host: the GPU's
    queue is not waited for)."""
    if dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_flag_group())
    return [bool(x) for x in t.tolist()]


def finite_later(loss: torch.Tensor) -> Callable[[], bool]:
    """Whether ``loss`` is finite, as a call that reads it later: on a GPU the answer is copied to
    pinned host memory behind the forward, and the call waits for that copy alone, not for the
    work queued after it."""
    flag = torch.isfinite(loss.detach()).all()
    if flag.device.type != "cuda":
        return lambda: bool(flag)
    host = torch.empty((), dtype=torch.bool, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def read() -> bool:
        copied.synchronize()
        return bool(host)

    return read


def _to(batch: dict, device) -> dict:
    # pageable, not pinned: pinning each batch first bought nothing measurable (an H100, 2026-12-07,
    # docs/performance.md) and costs a host copy every micro-batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward_loss(engine, batch: dict, device, sp_ctx=None, loss_chunk: int = 0, static_shapes: bool = False,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(loss to back-propagate, logits). ``loss_chunk`` > 0: the loss through the head in chunks,
    and no logits (training steps). ``static_shapes``: packed documents' offsets padded with empty
    documents to a power of two (``pad_cu_seqlens``: the same loss), so that CUDA graphs see a few
    shapes, not one per number of documents. Under sequence parallelism each rank scores its slice and
    returns sp x (its summed NLL) / (the group's label count): DeepSpeed averages gradients over
    all ranks, which then gives the data-parallel mean of every group's token-mean loss. The
    value returned for logging is the group's mean (identical on the group's ranks)."""
    if sp_ctx is None:
        if static_shapes and batch.get("cu_seqlens") is not None:
            batch = {**batch, "cu_seqlens": pad_cu_seqlens(batch["cu_seqlens"])}
        b = _to(batch, device)
        out = engine(b["input_ids"], cu_seqlens=b.get("cu_seqlens"), targets=b["labels"], positions=b.get("positions"),
                     loss_chunk=loss_chunk)  # fmt: skip
        return out.loss, out.logits
    b = _to(sequence_parallel.shard(batch, sp_ctx), device)
    out = engine(b["input_ids"], cu_seqlens=b["cu_seqlens"], positions=b["positions"])
    nll = torch.nn.functional.cross_entropy(out.logits[0].float(), b["labels"][0], ignore_index=IGNORE, reduction="sum")
    count = (b["labels"] != IGNORE).sum().to(nll.dtype)
    stats = torch.stack([nll.detach(), count])
    dist.all_reduce(stats, group=sp_ctx.group)
    loss = nll * sp_ctx.size / stats[1].clamp_min(1.0)
    # report the group's mean while back-propagating this rank's share
    report = stats[0] / stats[1].clamp_min(1.0)
    return loss + (report - loss).detach(), out.logits


class _ValidationInterrupted(Exception):
    pass


def evaluate(engine, cfg: TrainConfig, tok: lm_data.Tokenizer | None, rank: int, world: int, device, sp_ctx=None,
             stop: _StopFlag | None = None) -> dict | None:  # fmt: skip
    """The task's validation metrics; every rank scores the same number of batches (ZeRO-3
    gathers parameters collectively) over its own part of the held-out data. With ``stop``, a
    signal ends validation before the next batch (on every rank at once) and None is returned:
    a long validation does not hold up a scheduler's preemption."""
    task = task_named(cfg.data.task)

    def score(batch):
        if stop is not None and _any_rank(stop.raised is not None)[0]:
            raise _ValidationInterrupted
        if cfg.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        return forward_loss(engine, batch, device, sp_ctx, static_shapes=cfg.cuda_graphs)

    engine.eval()
    try:
        with torch.no_grad():
            sums = task.eval_sums(score, cfg.data, cfg.micro_batch, cfg.eval_batches, rank, world, tok)
    except _ValidationInterrupted:
        return None
    finally:
        engine.train()
    return task.eval_metrics({k: _all_reduce(v) for k, v in sums.items()})


def run(cfg: TrainConfig) -> dict:
    """Train to ``cfg.steps``; returns the run's summary (also written to out_dir/summary.json).
    One process group per out_dir: its rank 0 holds the directory's lock for the whole run."""
    cfg.validate()
    if cfg.deterministic:
        repeatable_numerics()
    rank, world, device = init_distributed()
    check_memory(cfg, device)  # before minutes of tokenising and compiling
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
        return _Run(cfg, rank, world, device).run()
    finally:
        out_lock.release(lock)


def memory_floor(cfg: TrainConfig, bf16: bool) -> int:
    """Bytes a training step needs at the least on one rank, counted low so that only a step that
    cannot fit is refused: the weights (gradients and optimiser states may be partitioned by ZeRO
    or offloaded, so they are not counted), and the activations every layer keeps for the
    backward, about 8 widths a token a layer (the block's input, its mixer's and MLP's inputs and
    outputs), one layer's worth under activation checkpointing, this rank's share of a sequence
    under sequence parallelism."""
    m, width = cfg.model, 2 if bf16 else 4
    tokens = cfg.micro_batch * cfg.data.seq_len // cfg.sequence_parallel_size
    layers = 1 if cfg.activation_checkpointing != "none" else m.n_layers
    return param_count(m) * width + tokens * 8 * m.d_model * layers * width


def _total_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(cfg: TrainConfig, device: torch.device) -> None:
    """Refuse, in one line, a step that cannot fit this device's memory whatever else happens
    (micro_batch or data.seq_len far too large), instead of failing after the data is prepared."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    need, have = memory_floor(cfg, bf16), _total_memory(device)
    if need > have:
        raise ValueError(
            f"micro_batch={cfg.micro_batch} x data.seq_len={cfg.data.seq_len} tokens a step need at least "
            f"{need / 2**30:,.1f} GiB on one {device.type} device (weights and activations alone), more than "
            f"its {have / 2**30:,.1f} GiB: lower micro_batch (raise grad_accum to keep the batch) or data.seq_len, or "
            f"set activation_checkpointing=block"
        )  # fmt: skip


ALIGN_ELEMENTS = 8  # 16 bytes of bf16 (Inductor's GPU alignment, GPU_ALIGN_BYTES)


def aligned_param_groups(params) -> list[dict]:
    """The parameters as optimiser groups in which each one starts 16 bytes aligned once DeepSpeed
    lays the group out as one flat buffer (its bf16 and ZeRO optimisers make the parameters views
    into that buffer, back to back). The compiled blocks of one kind share their code, which
    Inductor specialises on the first block's parameters being aligned and does not check again
    (parameters are fixed inputs), so a parameter of a size not a multiple of 8 (a write gate's
    bias, one per kv head) put later ones off it and the kernels failed with "misaligned address"
    (an H100, 2026-12-07). Such parameters get a group, and so a buffer, each."""
    params = list(params)
    aligned = [p for p in params if p.numel() % ALIGN_ELEMENTS == 0]
    groups = [{"params": [p]} for p in params if p.numel() % ALIGN_ELEMENTS]
    return ([{"params": aligned}] if aligned else []) + groups


def _previous_losses(out: Path, step: int) -> list[dict]:
    """The loss history of the run's earlier processes up to ``step`` (from its summary.json)."""
    try:
        earlier = json.loads((out / "summary.json").read_text()).get("losses", [])
    except (OSError, ValueError):
        return []
    return [h for h in earlier if isinstance(h, dict) and h.get("step", step + 1) <= step]


def repeatable_numerics() -> None:
    """``deterministic=true``: a run's numbers do not depend on the process or on the load on the
    GPU. On an H200 the same BLA run (seed, config, commit) differed from one process to another
    from its first step's loss (experiments/reports/2026-11-to-12-sweeps.md, issue 19). The compiled blocks' reductions are the
    usual source: Inductor times candidate configurations on the device at their first launch,
    and the winner's summation order sets the low bits. This turns that off (Inductor's
    deterministic mode, torch >= 2.10), selects torch's deterministic algorithms (a warning where
    an op has none) and gives cuBLAS the fixed workspace they need. Before the first CUDA work."""
    import torch._inductor.config as inductor_config

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    inductor_config.deterministic = True


class _Run:
    """One process's part of a training run. ``run`` reads as the run itself: each step is a
    method, and the state they share (engine, loader, counters, logs) lives here."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.task = task_named(cfg.data.task)
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.log = (lambda msg: print(f"[bla train] {msg}", flush=True)) if rank == 0 else (lambda msg: None)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
        if cfg.zero_stage == "auto":  # resolved once: the saved config names the stage the checkpoints have
            self.cfg = cfg = dataclasses.replace(cfg, zero_stage=cfg.zero(self.bf16))
        self.step, self.tokens_seen, self.skipped = 0, 0, 0
        self.writer, self.history, self.last_eval, self.last_eval_step = None, [], {}, None

    def run(self) -> dict:
        self.parallel_groups()
        self.prepare_data()
        self.find_resume_point()
        self.build_engine()
        if self.restore():
            return json.loads((self.out / "summary.json").read_text())  # already finished: nothing to train
        self.open_logs()
        status = self.train()
        return self.finish(status)

    # ---- setup
    def parallel_groups(self) -> None:
        """Sequence-parallel groups, and this rank's index among the data-parallel ones."""
        self.sp_ctx, self.data_rank, self.data_world = None, self.rank, self.world
        if self.cfg.sequence_parallel_size > 1:
            if not self.task.needs_text:
                raise ValueError(f"sequence parallelism splits packed text rows: data.task must be lm, not {self.task.name}")
            self.sp_ctx, self.data_rank, self.data_world = sequence_parallel.new_groups(self.cfg.sequence_parallel_size)

    def prepare_data(self) -> None:
        """``init_from``'s weights, and for text tasks the tokenizer and the shards (built once, cached)."""
        cfg = self.cfg
        self.tok = self.shards = None
        # read even when resuming: a run started from init_from keeps that model's tokenizer
        self.init_model, init_tok = initial_weights(cfg, self.log) if cfg.init_from else (None, None)
        if self.task.needs_text:
            use_init = init_tok is not None and cfg.data.tokenizer == "auto"
            self.tok = init_tok if use_init else ensure_tokenizer(cfg, self.rank, self.log)
            lm_data.check_vocab(self.tok, cfg.model.vocab_size)
            self.shards = ensure_shards(cfg, self.tok, self.rank, self.log)

    def find_resume_point(self) -> None:
        """The checkpoint to resume from (if any), checked against this run's tokenizer, model and
        numerics. Checkpoints exist but none is usable: refused, never a silent fresh start.
        Newer checkpoints than the one resumed (another branch of the run) are set aside."""
        cfg = self.cfg
        self.resume_from, self.universal, self.meta, self.changed = None, False, {}, []
        existing = ckpt.list_checkpoints(self.ckpt_dir)
        found = None
        if cfg.resume == "auto":
            problems = []
            found = ckpt.latest_complete(self.ckpt_dir, problems.append)
            for line in problems:
                self.log(line)
            finished = [t.name for t in existing if (t / ckpt.MANIFEST).exists()]  # saves that completed once
            if found is None and finished:
                raise ValueError(
                    f"{self.ckpt_dir} holds {len(finished)} checkpoint(s) and none can be resumed ({'; '.join(problems)}); "
                    f"nothing was trained. To start afresh on purpose pass resume=none (they are moved to "
                    f"{self.ckpt_dir / 'set_aside'}), or use another out_dir"
                )  # fmt: skip
        elif cfg.resume != "none":
            found = Path(cfg.resume)
            problem = ckpt.check_complete(found) if found.is_dir() else "not a checkpoint directory"
            if problem:
                raise ValueError(f"cannot resume from {found}: {problem}")
        if found is not None:
            self.check_resumable(found)
        # a fresh start, or a resume from an older checkpoint: the others leave the resume path
        aside = existing if found is None else [t for t in existing if t.name > found.name]
        if found is not None and found.parent.resolve() != self.ckpt_dir.resolve():
            aside = existing  # resumed from another run's checkpoint: this out_dir's own are another branch
        dist.barrier()  # every rank has read the checkpoints before any is moved
        if aside and self.rank == 0:
            where = ckpt.set_aside(self.ckpt_dir, aside)
            why = "resume=none" if found is None else f"resuming {found}"
            self.log(f"{why}: {', '.join(t.name for t in aside)} moved to {where}")
        dist.barrier()

    def check_resumable(self, found: Path) -> None:
        """``found`` matches this run (tokenizer, model, ZeRO stage, precision); the settings that
        may change on resume (rate, schedule, steps) are listed in ``changed`` and applied."""
        cfg = self.cfg
        self.meta = ckpt.read_meta(found)
        lm_data.check_same_tokenizer(self.tok, self.meta.get("tokenizer"), f"checkpoint {found}")
        saved = ckpt.saved_train_config(found)
        diff = architecture_diff(cfg.model, saved.model)
        if diff:  # e.g. a run trained before bla.gates existed (dirichlet_v1), resumed with the new default
            theirs = architecture(saved.model)
            fix = " ".join(f"model.{k}={json.dumps(theirs.get(k))}" for k in diff)
            raise ValueError(
                f"cannot resume from {found}: its model config differs from this run's in {diff}; "
                f"resume with the checkpoint's settings: {fix}"
            )
        precision = self.meta.get("precision") or (saved.precision if saved.precision != "auto" else None)
        numerics = (("zero_stage", saved.zero_stage, cfg.zero_stage), ("precision", precision, "bf16" if self.bf16 else "fp32"))
        differ = [(name, theirs, mine) for name, theirs, mine in numerics if theirs not in (None, "auto") and theirs != mine]
        if differ:  # DeepSpeed's optimiser states differ in layout and dtype: no exact resume across them
            theirs, mine = (" ".join(f"{name}={d[i]}" for name, *d in differ) for i in (0, 1))
            raise ValueError(
                f"cannot resume from {found}: it was saved with {theirs} and this run has {mine}; resume with {theirs}, "
                f"or start a new run from its weights with init_from={found}"
            )  # fmt: skip
        self.changed = changed_settings(saved, cfg)
        self.resume_from, self.universal = found, self.meta["world_size"] != self.world

    def build_engine(self) -> None:
        """The model (same initial weights on every rank) in a DeepSpeed engine, and the loader."""
        deepspeed = import_deepspeed()
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        model = BLALM(cfg.model)
        if self.init_model is not None and self.resume_from is None:
            model.load_state_dict(self.init_model.state_dict())
        model.set_checkpointing(cfg.activation_checkpointing)
        if cfg.cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=true needs a CUDA device; this run is on {self.device.type}: use cuda_graphs=false")
        if cfg.compiles(self.device.type):  # traced at the first step (its time is logged)
            model.compile_blocks(**({"mode": "reduce-overhead"} if cfg.cuda_graphs else {}))
        if self.sp_ctx is not None:
            sequence_parallel.enable(model, self.sp_ctx)
        ds_config = cfg.deepspeed(self.bf16, self.universal)
        if self.rank == 0:  # what DeepSpeed was given, user overrides (deepspeed_config) merged in
            (self.out / "deepspeed.json").write_text(json.dumps(ds_config, indent=1))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=aligned_param_groups(model.parameters()), config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        )  # fmt: skip
        fuse_hp_grad_update(self.engine.optimizer)  # bf16 ZeRO-1 (the GPU default): one foreach add, not a cast and an add a parameter
        self.guard_updates()
        # an SP group shares its batches
        self.loader = self.task.train_loader(cfg.data, cfg.micro_batch, self.data_rank, self.data_world, self.tok, self.shards)

    def restore(self) -> bool:
        """The resume point's weights, optimiser, loader and RNG states; True when that checkpoint
        already ends the run (its summary is left as it was)."""
        if self.resume_from is None:
            return False
        found, rank, world = self.resume_from, self.rank, self.world
        load_dir = found
        ckpt.verify_safe(found)  # before DeepSpeed unpickles anything of it
        if self.universal:
            if rank == 0:
                self.log(f"resuming a {self.meta['world_size']}-process checkpoint on {world}: converting to a universal checkpoint")
                ckpt.ensure_universal(found)
            dist.barrier()
            load_dir = found.with_name(found.name + ckpt.UNIVERSAL_SUFFIX)
            ckpt.verify_safe(load_dir)  # DeepSpeed unpickles the universal files too
        _, client = self.engine.load_checkpoint(str(load_dir.parent), tag=load_dir.name, load_module_strict=True)
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load {load_dir}")
        self.step, self.tokens_seen, self.skipped = client["step"], client["tokens_seen"], client.get("skipped", 0)
        self.loader.load_state_dict(ckpt.loader_states_for(found, self.meta["world_size"], rank, world, self.cfg.data.num_workers))
        if not self.universal:
            ckpt.set_rng_state(ckpt.load_rng_state(found / f"rng_rank{rank}.pt"))
        self.log(f"resumed from {found} at step {self.step}")
        if self.changed:
            self.apply_changed_settings()
        if self.step >= self.cfg.steps and rank == 0 and (self.out / "summary.json").exists():
            self.log(f"{found} is already at step {self.step} of {self.cfg.steps}: nothing to train; summary.json left as is")
            return True  # other ranks find no step to run
        return False

    def apply_changed_settings(self) -> None:
        """Settings changed since the checkpoint (a lower rate after a spike, more steps) take
        effect now: DeepSpeed restored the optimiser's and the scheduler's saved values over them."""
        o, scheduler = self.cfg.optim, self.scheduler
        scheduler.base_lrs = [o.lr for _ in scheduler.base_lrs]
        factor = lr_lambda(self.cfg)(scheduler.last_epoch)  # the schedule of this run's steps and warmup
        for group in scheduler.optimizer.param_groups:
            group.update(lr=o.lr * factor, initial_lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas))
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
        self.log(f"settings changed since the checkpoint, applied from step {self.step + 1}: {', '.join(self.changed)}")

    def open_logs(self) -> None:
        """The run's config and tokenizer beside its checkpoints, TensorBoard, and the MFU peak."""
        cfg = self.cfg
        if self.rank == 0:
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            if self.tok is not None:
                self.tok.save(self.out / "tokenizer")
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tb"))
            except ImportError as exc:  # a bare machine: the metrics still go to the log and summary.json
                self.log(f"TensorBoard is not available ({exc}); logging to stdout and summary.json only")
        self.peak = cfg.peak_flops
        if not self.peak and self.writer:  # MFU goes to rank 0's TensorBoard only: only it needs the peak
            self.peak, origin = peak_flops(self.device, torch.bfloat16 if self.bf16 else torch.float32, cfg.cache_dir)
            self.log(f"MFU against {self.peak / 1e12:.2f} TFLOP/s per device ({origin})")
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.tokens_per_step = cfg.micro_batch * cfg.data.seq_len * cfg.grad_accum * self.data_world
        # a resumed run's summary keeps the losses of its earlier processes
        if self.resume_from is not None and self.rank == 0:
            self.history = _previous_losses(self.out, self.step)

    # ---- checkpoints
    def save(self, reason: str, boundary: tuple[dict, dict] | None = None) -> Path:
        """A checkpoint of step ``step``; ``boundary``: the loader and RNG states taken when that
        step ended, for a save from inside the next one (its micro-batches are then redone)."""
        cfg, step, tok = self.cfg, self.step, self.tok
        tag_dir = self.ckpt_dir / ckpt.tag_of(step)
        if boundary is not None and ckpt.check_complete(tag_dir) is None:
            if reason == "nonfinite" and self.rank == 0:  # its weights gave the loss: not one to go back to
                meta = ckpt.read_meta(tag_dir)
                ckpt.write_manifest(tag_dir, {k: v for k, v in meta.items() if k not in ("files", "manifest_sha256")}
                                    | {"reason": reason})  # fmt: skip
            self.log(f"{tag_dir} already holds the state of step {step}")
            dist.barrier()
            return tag_dir
        if self.rank == 0:  # a save over an older one of the same step: never whole until its new manifest
            (tag_dir / ckpt.MANIFEST).unlink(missing_ok=True)
        dist.barrier()
        loader_state, rng = boundary if boundary is not None else (self.loader.state_dict(), None)
        ckpt.write_rank_files(tag_dir, self.rank, loader_state, rng)
        client = {"step": step, "tokens_seen": self.tokens_seen, "skipped": self.skipped, "config": cfg.to_dict(),
                  "tokenizer": tok.describe() if tok else None, "universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}  # fmt: skip
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag_dir.name, client_state=client, save_latest=False)
        dist.barrier()
        if self.rank == 0:
            (tag_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            ckpt.write_manifest(tag_dir, {"step": step, "world_size": self.world, "reason": reason,
                                          "precision": "bf16" if self.bf16 else "fp32", **self.health(),
                                          "tokenizer": tok.describe() if tok else None})  # fmt: skip
            ckpt.write_latest(self.ckpt_dir, tag_dir.name)
            removed = ckpt.prune(self.ckpt_dir, cfg.keep_last)
            self.log(f"saved {tag_dir} ({reason})" + (f"; removed {', '.join(removed)}" if removed else ""))
        dist.barrier()
        return tag_dir

    def health(self) -> dict:
        """This step's train loss and (if validated now) validation metrics, and whether all are
        finite: pruning keeps the newest ``keep_last`` healthy checkpoints, the ones a diverged run
        goes back to (a run diverging at a high rate often validates to NaN steps before a
        training loss is non-finite)."""
        last = self.history[-1] if self.history and self.history[-1]["step"] == self.step else {}
        metrics = {"train_loss": last.get("loss")}
        if self.last_eval_step == self.step:
            metrics.update(self.last_eval)
        healthy = all(v is None or math.isfinite(v) for v in metrics.values())
        return {"metrics": {k: (v if v is None or math.isfinite(v) else None) for k, v in metrics.items()}, "healthy": healthy}

    # ---- the step loop
    def train(self) -> str:
        """Steps to ``cfg.steps``: returns how the loop ended."""
        cfg = self.cfg
        self.stop = _StopFlag()
        self.batches = iter(self.loader)
        self.streak, self.grad_norm = 0, float("nan")
        self.t_last, self.tokens_last = time.perf_counter(), self.tokens_seen
        self.pending = []  # (step, loss on the device) not yet read back: losses are read only when logged
        # a bar on terminals; in a file its redraws would pile up on one line (the log lines say the same)
        shown = self.rank == 0 and cfg.progress and sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", disable=not shown, dynamic_ncols=True)
        first_step = self.step + 1
        try:
            while self.step < cfg.steps:
                boundary = (self.loader.state_dict(), ckpt.rng_state())  # what a save from inside this step records
                t_step = time.perf_counter()
                micro_losses, halt = self.micro_batches()
                if halt:  # the weights are still those of step ``step``: its checkpoint, then out
                    self.read_losses()
                    self.save("signal" if halt.startswith("interrupted") else "nonfinite", boundary)
                    return f"{halt}; checkpoint of step {self.step} saved"
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                # on the device with the others (read together); NaN when every micro-batch was non-finite
                step_loss = torch.stack(micro_losses).mean() if micro_losses else torch.full((), math.nan, device=self.device)
                self.pending.append((self.step, step_loss))
                bar.update(1)
                evaluating = self.step % cfg.eval_every == 0 or self.step == cfg.steps
                if self.step == first_step:
                    loss = self.read_losses()  # waits for the step: its time includes compilation
                    self.log(f"first step: {time.perf_counter() - t_step:.1f} s (compilation included), loss {loss:.4f}")
                if _logs(self.step, cfg) or evaluating or self.saves_now():
                    loss = self.read_losses()
                    bar.set_postfix(loss=f"{loss:.3f}")
                    if _logs(self.step, cfg):
                        self.log_step(loss)
                    if evaluating:
                        self.validate(loss)
                ended = self.checkpoint_if_due()
                if ended:
                    return ended
            return "finished"
        finally:
            bar.close()

    def read_losses(self) -> float:
        """The losses of the steps since the last read, into the history (one device read and one
        collective for all of them; SP ranks report their group's loss); returns the latest."""
        if self.pending:
            steps, losses = zip(*self.pending)
            values = torch.stack(losses).double()
            if dist.get_backend() == "nccl":
                values = values.cuda()
            dist.all_reduce(values)
            self.history += [{"step": s, "loss": v / self.world} for s, v in zip(steps, values.tolist())]
            self.pending = []
        return self.history[-1]["loss"] if self.history else float("nan")

    def saves_now(self) -> bool:
        """Whether this step ends with a scheduled checkpoint (the same answer on every rank, as
        reading the losses is a collective; a signal's checkpoint reads them in checkpoint_if_due)."""
        cfg, step = self.cfg, self.step
        return step % cfg.save_every == 0 or step == cfg.steps or step == cfg.stop_at

    def micro_batches(self) -> tuple[list[torch.Tensor], str | None]:
        """One optimiser step's micro-batches: their finite losses (on the device), or why the step stopped
        short (a signal, or non-finite losses under the run's policy). A non-finite loss drops the step's
        update (``drop_update``; the schedule still advances) and counts towards ``nonfinite_limit``.

        Each loss's finiteness is read only once its backward is queued: the read waits for the forward
        alone, so the GPU works through the backward while the host waits (read before the backward,
        it drained the queue and a host-bound step lost 12%: benchmarks/reports/2026-12-07-throughput.md)."""
        cfg, micro_losses, self.drop_update = self.cfg, [], False
        for micro in range(cfg.grad_accum):
            if cfg.cuda_graphs:  # a new step: the graphs' outputs of the last one may be overwritten now
                torch.compiler.cudagraph_mark_step_begin()
            loss, _ = forward_loss(self.engine, next(self.batches), self.device, self.sp_ctx, cfg.loss_chunk, cfg.cuda_graphs)
            finite = finite_later(loss)
            self.engine.backward(loss)
            nonfinite, signalled = _any_rank(not finite(), self.stop.raised is not None)
            if signalled:
                return micro_losses, f"interrupted by {self.stop.raised or 'a signal on another rank'}"
            if nonfinite:  # its gradients are in the step's sum: the step's update is dropped
                self.skipped += 1
                self.streak += 1
                self.drop_update = True
                self.log(f"non-finite loss at step {self.step + 1} (the step's update dropped; {self.skipped} so far, "
                         f"{self.streak} in a row)")  # fmt: skip
                if self.writer:
                    self.writer.add_scalar("train/nonfinite_skipped", self.skipped, self.step + 1)
                if cfg.nan_policy == "stop":
                    return micro_losses, "stopped on a non-finite loss (nan_policy=stop)"
                if self.streak >= cfg.nonfinite_limit:
                    return micro_losses, f"stopped on {self.streak} non-finite losses in a row (nonfinite_limit={cfg.nonfinite_limit})"
            else:
                self.streak = 0
                micro_losses.append(loss.detach().float())
            last = micro == cfg.grad_accum - 1
            if last and self.rank == 0 and cfg.zero_stage == 0 and _logs(self.step + 1, cfg):
                self.grad_norm = _grad_norm(self.engine)  # before step() clears the gradients
            self.engine.step()
        if self.scheduler.last_epoch == self.step:  # DeepSpeed leaves the schedule where it was when it skips
            self.scheduler.step()  # an update (non-finite gradients): it follows the steps taken
        return micro_losses, None

    def guard_updates(self) -> None:
        """The optimiser's update is skipped while ``drop_update`` is set: DeepSpeed's wrappers (bf16,
        ZeRO) call the basic optimizer's step, and at fp32 ZeRO-0 the engine calls it directly."""
        optimizer, self.drop_update = self.engine.basic_optimizer, False
        update = optimizer.step

        def step(*args, **kwargs):
            return None if self.drop_update else update(*args, **kwargs)

        optimizer.step = step

    def log_step(self, loss: float) -> None:
        now = time.perf_counter()
        tps = (self.tokens_seen - self.tokens_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.tokens_last = now, self.tokens_seen
        if self.rank != 0:
            return
        gn = self.engine.get_global_grad_norm()  # None at ZeRO-0: then the norm taken before step()
        scalars = {"train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0], "train/tokens_per_s": tps,
                   "train/grad_norm": float(gn if gn is not None else self.grad_norm), "train/tokens": self.tokens_seen}  # fmt: skip
        if self.peak:  # the model FLOPs of spec section 3 over the device peak
            scalars["train/mfu"] = self.flops_per_token * tps / (self.peak * self.world)
        if self.sp_ctx is not None:
            scalars["train/sp_comm_bytes_per_micro_batch"] = float(sum(self.sp_ctx.comm_bytes.values()))
        device = self.device
        scalars["train/memory_gb"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_bytes()) / 1e9
        # one line a log step, the same on a terminal and in a file (the bar is shown on terminals only)
        mfu = f", MFU {scalars['train/mfu']:.1%}" if "train/mfu" in scalars else ""
        self.log(f"step {self.step}/{self.cfg.steps}: loss {loss:.4f}, lr {scalars['train/lr']:.3g}, grad norm "
                 f"{scalars['train/grad_norm']:.3g}, {tps:,.0f} tokens/s{mfu}, {scalars['train/memory_gb']:.1f} GB")  # fmt: skip
        if self.writer:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, self.step)

    def validate(self, loss: float) -> None:
        metrics = evaluate(self.engine, self.cfg, self.tok, self.data_rank, self.data_world, self.device, self.sp_ctx, self.stop)
        if metrics is None:
            self.log(f"step {self.step}: validation interrupted by a signal")
            return
        self.last_eval, self.last_eval_step = metrics, self.step
        self.log(f"step {self.step}: train loss {loss:.4f}, " + ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items()))
        if self.writer:
            for k, v in self.last_eval.items():
                self.writer.add_scalar(f"val/{k.removeprefix('val_')}", v, self.step)

    def checkpoint_if_due(self) -> str | None:
        """A checkpoint every save_every steps, at the end, on a signal and at stop_at; the status
        when the loop ends here."""
        cfg, step = self.cfg, self.step
        signalled = _any_rank(self.stop.raised is not None)[0]
        boxed = step == cfg.stop_at
        if step % cfg.save_every == 0 or step == cfg.steps or signalled or boxed:
            self.read_losses()  # a signal raised on another rank: this rank's losses are read now
            self.save("signal" if signalled else "stop_at" if boxed else "periodic" if step < cfg.steps else "final")
        if signalled:
            return f"interrupted by {self.stop.raised or 'a signal on another rank'}; checkpoint saved"
        if boxed:
            return f"stopped at stop_at={step}; checkpoint saved"
        return None

    # ---- the end
    def finish(self, status: str) -> dict:
        cfg, out, history = self.cfg, self.out, self.history
        if self.writer:
            _write_hparams(self.writer, cfg, {"val_loss": self.last_eval.get("val_loss"),
                                              "train_loss": history[-1]["loss"] if history else None})  # fmt: skip
            self.writer.close()
        summary = {
            "status": status, "step": self.step, "tokens_seen": self.tokens_seen, "skipped_micro_batches": self.skipped,
            "params": param_count(cfg.model), "world_size": self.world, "precision": "bf16" if self.bf16 else "fp32",
            "zero_stage": cfg.zero_stage, **self.last_eval, "losses": history, "out_dir": str(out),
            "checkpoints": str(self.ckpt_dir), "tensorboard": str(out / "tb"),
            "tokenizer": str(out / "tokenizer") if self.tok else None,
        }  # fmt: skip
        if self.rank == 0:
            atomic_write(out / "summary.json", json.dumps(summary, indent=1).encode())  # never half a file
            self.log(f"{status} at step {self.step}: {self.tokens_seen:,} tokens; " +
                     ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items()) +
                     f"\n  config      {out / 'config.yaml'}\n  checkpoints {self.ckpt_dir}\n  tensorboard {out / 'tb'}"
                     f"\n  tokenizer   {out / 'tokenizer'}\n  summary     {out / 'summary.json'}")  # fmt: skip
        if status.startswith("stopped on"):
            raise TrainingStopped(f"training {status}. {self.recovery_hint()}")
        return summary

    def recovery_hint(self) -> str:
        """Where a run that stopped on non-finite losses can go back to (one line)."""
        back = ckpt.last_recoverable(self.ckpt_dir, before_step=self.step)
        rate = self.cfg.optim.lr / 10  # or the rate the healthy checkpoint trained with, if lower
        if back is not None:
            rate = min(rate, ckpt.saved_train_config(back).optim.lr)
        lower = f"optim.lr={rate:g}"
        if back is None:
            return (f"Checkpoint {ckpt.tag_of(self.step)} holds the weights that gave it, and no earlier checkpoint "
                    f"is kept: check the data, or start afresh with a lower rate (resume=none {lower})")  # fmt: skip
        loss = ckpt.read_meta(back).get("metrics", {}).get("train_loss")
        return (f"Checkpoint {ckpt.tag_of(self.step)} holds the weights that gave it; the last healthy one before them is "
                f"{back}" + (f" (train loss {loss:.4f})" if isinstance(loss, float) else "") +
                f": go back there with a lower rate, resume={back} {lower}, or check the data and resume as is")  # fmt: skip


# Settings a resumed run may change; each is applied (the rest must match or is refused above)
RESUMABLE_SETTINGS = ("steps", "optim.lr", "optim.weight_decay", "optim.betas", "optim.warmup_steps", "optim.schedule",
                      "optim.min_lr_ratio", "optim.decay_fraction", "optim.grad_clip")  # fmt: skip


def changed_settings(saved: TrainConfig, now: TrainConfig) -> list[str]:
    """``name old -> new`` for each resumable setting that differs between a checkpoint's config and this run's."""
    changed = []
    for name in RESUMABLE_SETTINGS:
        section, _, key = name.rpartition(".")
        old, new = (getattr(getattr(c, section) if section else c, key) for c in (saved, now))
        if isinstance(old, (list, tuple)):
            old, new = list(old), list(new)
        if old != new:
            changed.append(f"{name} {old} -> {new}")
    return changed


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

