"""Training: ZeRO-2/3 over gloo with 2 CPU processes, exact resume, universal resume on another
process count, damaged checkpoints, NaN policy, signals, config errors, schedules."""

from __future__ import annotations

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bla.launch.layout import fresh_process_env
from bla.train import checkpoint as ckpt
from bla.train.config import load_train_config
from bla.train.schedule import lr_lambda

pytestmark = pytest.mark.slow
BASE = ["steps=8", "save_every=4", "eval_every=4", "log_every=1", "optim.lr=1e-2", "optim.warmup_steps=1", "keep_last=5"]


_CACHE: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory) -> Path:
    """One cache (tokenizer, shards, the CPU's peak FLOPs) for this file's runs: its entries are keyed
    by what built them and published whole, so runs share them safely; each test that builds one
    anew (a kill while it is built) passes a cache of its own."""
    _CACHE[:] = [tmp_path_factory.mktemp("cache")]
    return _CACHE[0]


def _env(cache: Path) -> dict:
    return fresh_process_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train(tmp: Path, name: str, nproc: int, *overrides: str, check=True) -> dict:
    out = tmp / name
    args = ["tiny", f"out_dir={out}", f"cache_dir={_CACHE[0]}", *BASE, *overrides]
    if nproc == 1:
        cmd = [sys.executable, "-m", "bla.train.cli", *args]
    else:
        # --standalone: torchrun's store binds a free port itself (a port picked beforehand was taken by
        # another test's process before torchrun bound it once in CI: EADDRINUSE)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "bla.train.cli", *args]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=_env(tmp), timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {"proc": done}


def scalars(run: dict, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(run["tensorboard"])
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def assert_finite_grad_norms(run: dict) -> None:
    norms = scalars(run, "train/grad_norm")
    assert len(norms) == run["step"] and all(0 < n < 1e3 for n in norms), norms


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted 2-process ZeRO-2 run, and the same run stopped at step 4 then resumed."""
    tmp = tmp_path_factory.mktemp("train")
    full = train(tmp, "full", 2, "zero_stage=2")
    stopped = train(tmp, "resumed", 2, "zero_stage=2", "stop_at=4")
    resumed = train(tmp, "resumed", 2, "zero_stage=2")
    return tmp, full, stopped, resumed


def test_zero2_two_processes_train(runs):
    _, full, _, _ = runs
    assert full["status"] == "finished" and full["world_size"] == 2 and full["zero_stage"] == 2
    losses = [h["loss"] for h in full["losses"]]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5
    assert_finite_grad_norms(full)  # DeepSpeed's own norm at ZeRO-2


def test_resume_is_bit_exact_in_fp32(runs):
    _, full, stopped, resumed = runs
    assert stopped["status"].startswith("stopped at stop_at=4") and stopped["step"] == 4
    assert [h["loss"] for h in stopped["losses"]] == [h["loss"] for h in full["losses"][:4]]
    assert [h["step"] for h in resumed["losses"]] == list(range(1, 9))  # steps 1-4 from the first process's summary
    assert [h["loss"] for h in resumed["losses"]] == [h["loss"] for h in full["losses"]]  # bit for bit
    assert resumed["val_loss"] == full["val_loss"]


def test_two_process_checkpoint_resumes_in_one_process(runs, tmp_path):
    """Through DeepSpeed's universal checkpoint, converted by us: a universal folder planted beside
    the checkpoint (a payload DeepSpeed would unpickle, a complete.json of its own) is replaced,
    never loaded."""
    import torch

    tmp, full, _, _ = runs
    shutil.copytree(tmp / "resumed", tmp / "uni", ignore=shutil.ignore_patterns("step_0000008*"))
    for tag in ("step_0000008",):
        assert not (tmp / "uni" / "checkpoints" / tag).exists()
    planted = tmp / "uni" / "checkpoints" / "step_0000004_universal"
    planted.mkdir()
    torch.save({"module": _Payload(tmp_path / "payload_ran")}, planted / "mp_rank_00_model_states.pt")
    ckpt.write_manifest(planted, {"step": 4, "world_size": 2})
    one = train(tmp, "uni", 1, "zero_stage=2")
    assert not (tmp_path / "payload_ran").exists()
    new = [h for h in one["losses"] if h["step"] > 4]
    assert one["world_size"] == 1 and new[0]["step"] == 5  # resumed after step 4
    source = ckpt.sha256_of(tmp / "uni" / "checkpoints" / "step_0000004" / "complete.json")
    assert ckpt.read_meta(planted)["converted_from"] == source and ckpt.check_complete(planted) is None
    ckpt.verify_safe(planted)  # DeepSpeed's universal files are tensors and plain data
    # the weights came along: a fresh model starts near ln(512) = 6.2, the trained one far below
    assert new[0]["loss"] < full["losses"][0]["loss"] - 0.5


def test_zero3_two_processes_train_and_resume(tmp_path):
    first = train(tmp_path, "z3", 2, "zero_stage=3", "stop_at=4")
    again = train(tmp_path, "z3", 2, "zero_stage=3")
    full = train(tmp_path, "z3full", 2, "zero_stage=3")
    assert first["step"] == 4 and again["status"] == "finished"
    assert [h["loss"] for h in again["losses"]] == [h["loss"] for h in full["losses"]]  # the first 4 kept from `first`
    assert_finite_grad_norms(full)


def test_bf16_zero1_two_processes_tensorboard_and_weights(tmp_path):
    """The GPU default (bf16, ZeRO-1 through DeepSpeed's BF16_Optimizer) on 2 ranks: its logs, and
    its checkpoint consolidated from both ranks' fp32 partitions (DeepSpeed's zero_to_fp32 refuses
    these files), which round to exactly the bf16 weights the engine trained with."""
    import torch

    from bla.model import flops_per_token
    from bla.train.checkpoint import load_run, safe_load

    run = train(tmp_path, "z1", 2, "precision=bf16", "steps=4", "eval_every=2")
    assert run["zero_stage"] == 1 and run["world_size"] == 2
    tag = tmp_path / "z1" / "checkpoints" / "step_0000004"
    assert len(list(tag.glob("bf16_zero_pp_rank_*_optim_states.pt"))) == 2
    model, _, cfg = load_run(tmp_path / "z1")
    trained = safe_load(tag / "mp_rank_00_model_states.pt", deepspeed_types=True)["module"]
    weights = model.state_dict()
    assert set(weights) == set(trained)
    for name, w in trained.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name].bfloat16(), w), name
    assert_finite_grad_norms(run)
    bpb = scalars(run, "val/bits_per_byte")
    # bits per byte = nats per token / ln 2 / bytes per token, with 1 to 8 bytes per token of code
    assert len(bpb) == 2 and bpb[-1] == pytest.approx(run["val_bits_per_byte"])
    assert run["val_loss"] / 8 / math.log(2) < bpb[-1] < run["val_loss"] / math.log(2)
    # MFU against the CPU's peak, measured once (the best over several matrix sizes) and cached: the
    # logged figure is model FLOPs x logged throughput / (peak x ranks), and below 1
    mfu, tps = scalars(run, "train/mfu"), scalars(run, "train/tokens_per_s")
    peaks = json.loads((_CACHE[0] / "peak_flops.json").read_text())  # by device and dtype: the other runs' fp32 too
    (peak,) = [v for k, v in peaks.items() if k.endswith("|torch.bfloat16")]
    want = [flops_per_token(cfg.model, cfg.data.seq_len) * t / (peak * 2) for t in tps]
    assert len(mfu) == 4 and all(0 < x < 1 for x in mfu) and mfu == pytest.approx(want, rel=1e-5)


def test_safe_load_from_threads_at_once(tmp_path, monkeypatch):
    """A sweep evaluates runs in threads: each thread's allowance of DeepSpeed's plain types holds
    for its whole load, though another thread's ends meanwhile (torch.load slowed to force it)."""
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from deepspeed.utils.tensor_fragment import fragment_address

    path = tmp_path / "fragments.pt"
    torch.save({"mapping": fragment_address(numel=3, start=5)}, path)
    real_load = torch.load

    def slow_load(*args, **kwargs):
        time.sleep(0.05)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", slow_load)
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: ckpt.safe_load(path, deepspeed_types=True), range(4)))
    assert [x["mapping"] for x in loaded] == [fragment_address(numel=3, start=5)] * 4


def test_peak_flops_datasheet_measured_and_cached(tmp_path, monkeypatch):
    import torch

    from bla.train import peak

    assert peak.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12 and peak.datasheet_peak("NVIDIA GH200 480GB") == 989e12
    assert peak.datasheet_peak("Some New Accelerator") is None
    value, origin = peak.peak_flops(torch.device("cpu"), torch.float32, tmp_path)
    assert value > 1e8 and origin == "measured"
    monkeypatch.setattr(peak, "measure_peak", lambda *a, **k: pytest.fail("measured twice"))
    assert peak.peak_flops(torch.device("cpu"), torch.float32, tmp_path) == (value, f"measured earlier ({tmp_path / 'peak_flops.json'})")


def test_truncated_checkpoint_is_detected_and_the_previous_used(runs, capsys):
    tmp, _, _, _ = runs
    ck = tmp / "damaged" / "checkpoints"
    shutil.copytree(tmp / "full" / "checkpoints", ck)
    newest = ckpt.list_checkpoints(ck)[-1]
    victim = next(p for p in sorted(newest.rglob("*.pt")) if p.stat().st_size > 100)
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    chosen = ckpt.latest_complete(ck)
    assert chosen == ckpt.list_checkpoints(ck)[-2]
    assert "is not usable" in capsys.readouterr().out
    (chosen / "complete.json").unlink()  # a save that never finished
    assert ckpt.latest_complete(ck) is None  # nothing usable left: a fresh start


def test_a_flipped_byte_is_detected_and_the_previous_checkpoint_used(runs, capsys):
    """Same size, other content: complete.json's sha256 catches it; eval says what it read."""
    from bla.train.checkpoint import resolve_checkpoint

    tmp, _, _, _ = runs
    run = tmp / "flipped"
    shutil.copytree(tmp / "full", run)
    newest = ckpt.list_checkpoints(run / "checkpoints")[-1]
    victim = max(newest.rglob("*.pt"), key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as f:
        f.seek(victim.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "sha256 differs" in ckpt.check_complete(newest)
    assert ckpt.check_complete(newest, hashes=False) is None  # sizes alone cannot tell
    previous = ckpt.list_checkpoints(run / "checkpoints")[-2]
    assert resolve_checkpoint(run) == previous
    err = capsys.readouterr().err
    assert f"{newest.name} is not usable" in err and f"reading {previous} instead" in err


def test_a_changed_tokenizer_is_refused(runs):
    """The checkpoint records its tokenizer's sha256: another file beside it (ids that would mean
    other text) is refused by eval and by resume."""
    from bla.train.checkpoint import load_run

    tmp, _, _, _ = runs
    run = tmp / "other_tok"
    shutil.copytree(tmp / "full", run)
    tok_file = next((run / "tokenizer").iterdir())
    spec = json.loads(tok_file.read_text())  # still a valid tokenizer: two tokens' ids swapped
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok_file.write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="is not the one checkpoint .* was trained with"):
        load_run(run)
    (run / "summary.json").unlink()
    done = train(tmp, "other_tok", 1, "zero_stage=2", "steps=10", f"data.tokenizer={tok_file}", check=False)["proc"]
    assert done.returncode == 2 and "is not the one checkpoint" in done.stderr.strip().splitlines()[-1]


def test_keep_last_prunes_old_checkpoints(tmp_path):
    run = train(tmp_path, "keep", 1, "keep_last=2", "save_every=2")
    names = [p.name for p in ckpt.list_checkpoints(Path(run["checkpoints"]))]
    assert names == ["step_0000006", "step_0000008"]
    assert json.loads((Path(run["out_dir"]) / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 0
    again = train(tmp_path, "keep", 1, "keep_last=2", "save_every=2")  # resuming a finished run
    assert again == run  # its summary (losses, validation) left as it was
    assert_finite_grad_norms(run)  # ZeRO-0: DeepSpeed reports none; ours
    assert scalars(run, "final/val_loss")[0] == pytest.approx(run["val_loss"])  # written by add_hparams


NAN_SCRIPT = """
import sys, torch
from bla.model import lm
from bla.train import trainer
from bla.train.config import load_train_config
import os
calls = {"n": 0}
original = lm.BLALM.forward
def forward(self, *a, **k):
    out = original(self, *a, **k)
    if self.training:
        calls["n"] += 1
        if calls["n"] == 3 or (os.environ.get("NAN_ALL") and calls["n"] > 3):
            out.loss = out.loss * float("nan")
    return out
lm.BLALM.forward = forward
steps = trainer._Run.micro_batches
def micro_batches(self):  # which steps left the weights (ZeRO-3: this rank's partition) as they were
    if self.step == 0:  # DeepSpeed's flat buffers keep every parameter 16 bytes aligned (compiled GPU kernels assume it)
        print("MISALIGNED", [n for n, p in self.engine.module.named_parameters() if p.storage_offset() * p.element_size() % 16])
    weights = lambda: [getattr(p, "ds_tensor", p).detach().clone() for p in self.engine.module.parameters()]
    before = weights()
    out = steps(self)
    if out[1] is None and all(torch.equal(a, b) for a, b in zip(before, weights())):
        print("UNCHANGED", self.step + 1, "schedule at", self.scheduler.last_epoch)
    return out
trainer._Run.micro_batches = micro_batches
cfg = load_train_config("tiny", sys.argv[1:])
print("SUMMARY", trainer.run(cfg)["skipped_micro_batches"])
"""


@pytest.mark.parametrize("policy", ["skip", "skip-bf16-zero1", "stop", "skip-streak"])
def test_nonfinite_loss_policy(tmp_path, policy):
    """A non-finite micro-batch: skip drops its step's update (the weights stay as they were, the
    schedule moves on; fp32 ZeRO-0, where the engine steps the optimiser, and bf16 ZeRO-1 through
    DeepSpeed's BF16_Optimizer, the GPU default), stop saves and exits. A streak of them (every loss non-finite, as
    with optim.lr=1e6) ends after nonfinite_limit under skip too, with a checkpoint. The bf16 case's model has the
    write and forget gates, whose biases (2 elements) would put later parameters off 16-byte alignment in
    BF16_Optimizer's flat buffer (compiled kernels faulted so on an H100): every parameter stays aligned."""
    out = tmp_path / "nan"
    precision = ["precision=bf16", "zero_stage=1", "model.bla.write_gate=true", "model.bla.forget_gate=true"] \
        if policy.endswith("zero1") else []  # fmt: skip
    args = [f"out_dir={out}", f"cache_dir={_CACHE[0]}", "steps=6", "save_every=100",
            f"nan_policy={policy.split('-')[0]}", "nonfinite_limit=4", *precision]  # fmt: skip
    env = {**_env(tmp_path), **({"NAN_ALL": "1"} if policy == "skip-streak" else {})}
    done = subprocess.run([sys.executable, "-c", NAN_SCRIPT, *args], capture_output=True, text=True, env=env, timeout=300)
    assert "non-finite loss at step 3" in done.stdout, done.stdout + done.stderr[-3000:]
    unchanged = [line for line in done.stdout.splitlines() if line.startswith("UNCHANGED")]
    if policy.startswith("skip") and policy != "skip-streak":
        assert done.returncode == 0 and "SUMMARY 1" in done.stdout
        assert unchanged == ["UNCHANGED 3 schedule at 3"], done.stdout
        assert "MISALIGNED []" in done.stdout.splitlines(), done.stdout
        return
    assert done.returncode != 0
    assert ("nan_policy=stop" if policy == "stop" else "4 non-finite losses in a row") in done.stderr.splitlines()[-1]
    stopped = 2 if policy == "stop" else 5  # the streak: steps 3 to 5 dropped, the 4th in step 6 stops it
    assert unchanged == [f"UNCHANGED {s} schedule at {s}" for s in range(3, stopped + 1)], done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == stopped and f"checkpoint of step {stopped} saved" in summary["status"]
    assert ckpt.latest_complete(out / "checkpoints").name == ckpt.tag_of(stopped)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "sig"
    cmd = [sys.executable, "-m", "bla.train.cli", "tiny", f"out_dir={out}", f"cache_dir={_CACHE[0]}",
           "steps=100000", "save_every=100000", "eval_every=100000"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
    deadline = time.time() + 240
    while not (out / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"].startswith("interrupted by SIGTERM") and summary["step"] > 0
    assert ckpt.latest_complete(out / "checkpoints").name == ckpt.tag_of(summary["step"])


SIGNAL_SCRIPT = """
import os, signal, sys
from bla.model import lm
from bla.train.config import load_train_config
from bla.train.trainer import run
calls = {"n": 0}
original = lm.BLALM.forward
def forward(self, *a, **k):
    if self.training:
        calls["n"] += 1
        if calls["n"] == 5:  # the first micro-batch of step 3 (grad_accum=2)
            os.kill(os.getpid(), signal.SIGTERM)
    return original(self, *a, **k)
lm.BLALM.forward = forward
print(run(load_train_config("tiny", sys.argv[1:]))["status"])
"""


def test_signal_inside_a_step_resumes_bit_exact(tmp_path):
    """SIGTERM during a step's micro-batches: the run saves the state of the last whole step at
    once (not at the next step boundary), and its resumption ends as the uninterrupted run."""
    full = train(tmp_path, "full", 1, "grad_accum=2")
    args = [f"out_dir={tmp_path / 'sig'}", f"cache_dir={_CACHE[0]}", *BASE, "grad_accum=2"]
    done = subprocess.run([sys.executable, "-c", SIGNAL_SCRIPT, *args], capture_output=True, text=True,
                          env=_env(tmp_path), timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "interrupted by SIGTERM; checkpoint of step 2 saved" in done.stdout
    assert ckpt.latest_complete(tmp_path / "sig" / "checkpoints").name == ckpt.tag_of(2)
    resumed = train(tmp_path, "sig", 1, "grad_accum=2")
    assert [h["step"] for h in resumed["losses"]] == list(range(1, 9))  # the earlier process's losses kept
    assert [h["loss"] for h in resumed["losses"]] == [h["loss"] for h in full["losses"]]  # bit for bit
    assert resumed["val_loss"] == full["val_loss"]


def test_one_training_process_per_out_dir(tmp_path):
    from bla.train import lock

    out = tmp_path / "locked"
    out.mkdir()
    held = lock.acquire(out)
    with pytest.raises(lock.OutDirLocked, match="in use by another training process"):
        lock.acquire(out)
    done = subprocess.run([sys.executable, "-m", "bla.train.cli", "tiny", f"out_dir={out}", f"cache_dir={_CACHE[0]}"],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=300)  # fmt: skip
    assert done.returncode != 0 and "in use by another training process" in done.stderr.strip().splitlines()[-1]
    assert not (out / "config.yaml").exists()  # the refused run wrote nothing
    lock.release(held)
    assert not held.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    held.write_text(json.dumps({"pid": int(dead.stdout), "host": __import__("socket").gethostname()}))
    assert lock.acquire(out, log=lambda m: None) == held  # a dead holder's lock is taken over
    held.write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(lock.OutDirLocked, match="on host another-host"):
        lock.acquire(out)


@pytest.mark.parametrize(
    "over,match",
    [
        (["zero_stage=4"], "zero_stage must be auto, 0, 1, 2 or 3"),
        (["precision=fp16"], "fp16 is not supported"),
        (["optim.lrr=1"], "unknown key"),
        (["model.bla.slots=5"], "bla.slots=5 must divide"),
        (["data.seq_len=0"], "data.seq_len must be a positive int"),
        (["stop_at=99"], "stop_at must be within"),
        (["optim.lr=fast"], "optim.lr must be a finite non-negative number"),
        (["optim.lr=inf"], "optim.lr must be a finite non-negative number, got inf"),
        (["optim.lr=nan"], "optim.lr must be a finite non-negative number, got nan"),
        (["optim.betas=[0.9]"], r"optim.betas must be two numbers in \[0, 1\)"),
        (["optim.betas=0.9"], r"optim.betas must be two numbers in \[0, 1\)"),
        (["steps=true"], "steps must be a positive int, got True"),
        ([f"out_dir={__file__}"], "is a file, not a directory"),
        (["optim.lr=0"], "optim.lr is 0"),
        (["eval_every=0"], "eval_every must be a positive int"),
        (["data.seq_len=abc"], "data.seq_len must be a positive int, got abc"),
        (["stop_at=x"], "stop_at must be an int"),
        (["nonfinite_limit=0"], "nonfinite_limit must be a positive int"),
        (["deterministic=maybe"], "deterministic must be true or false, got 'maybe'"),
    ],
)
def test_bad_train_config(over, match):
    with pytest.raises(ValueError, match=match):
        load_train_config("tiny", over)


def test_deterministic_sets_torch_inductor_and_cublas():
    """deterministic=true: torch's deterministic algorithms, Inductor without its timing-picked
    reduction configs, cuBLAS's fixed workspace (in a fresh process: these are process-wide)."""
    check = ("import os, torch, torch._inductor.config as inductor\n"
             "assert not torch.are_deterministic_algorithms_enabled() and not inductor.deterministic\n"
             "from bla.train.trainer import repeatable_numerics\n"
             "repeatable_numerics()\n"
             "assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()\n"
             "assert inductor.deterministic and os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'\n")  # fmt: skip
    env = {k: v for k, v in fresh_process_env().items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_train_config("tiny", ["deterministic=true"]).deterministic is True


def test_a_user_deepspeed_config_is_merged(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 1234}, "wall_clock_breakdown": True}))
    cfg = load_train_config("tiny", ["zero_stage=2", f"deepspeed_config={user}"])
    ds = cfg.deepspeed(bf16=False)
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1234} and ds["wall_clock_breakdown"] is True
    assert ds["gradient_accumulation_steps"] == cfg.grad_accum  # the generated keys stay
    user.write_text('{"zero_optimization": ')
    with pytest.raises(ValueError, match="ds.json: not JSON"):
        load_train_config("tiny", [f"deepspeed_config={user}"])
    for restated, instead in [({"train_micro_batch_size_per_gpu": 4}, "micro_batch"),
                              ({"zero_optimization": {"stage": 3}}, "zero_stage=N"),
                              ({"gradient_accumulation_steps": 4}, "grad_accum"),
                              ({"scheduler": {"type": "WarmupLR"}}, "optim.schedule"),
                              ({"optimizer": {"type": "Adam"}}, "optim.* (optim.lr"), ({"bf16": {"enabled": True}}, "precision")]:  # fmt: skip
        user.write_text(json.dumps(restated))  # before: trained with it while config.yaml and the schedule said otherwise
        with pytest.raises(ValueError, match=f"is set by the trainer from its own settings.*use {re.escape(instead)}"):
            load_train_config("tiny", [f"deepspeed_config={user}"])
    with pytest.raises(ValueError, match="cannot read it"):
        load_train_config("tiny", [f"deepspeed_config={tmp_path / 'missing.json'}"])


def test_train_help_lists_the_settings(capsys):
    from bla.launch.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for line in ("nan_policy=skip  # skip", "data.seq_len=256", "optim.lr=0.001", "deepspeed_config=  #"):
        assert line in out


def test_schedules():
    cos = lr_lambda(load_train_config("main", ["steps=100", "optim.warmup_steps=10"]))
    assert cos(0) == pytest.approx(0.1) and cos(9) == pytest.approx(1.0)
    assert cos(55) == pytest.approx(0.55) and cos(100) == pytest.approx(0.1)
    wsd = lr_lambda(load_train_config("main", ["steps=100", "optim.warmup_steps=10", "optim.schedule=wsd"]))
    assert wsd(50) == 1.0 and wsd(79) == 1.0 and wsd(90) == pytest.approx(0.55) and wsd(100) == pytest.approx(0.1)


def test_cli_overrides_without_a_preset(monkeypatch):
    from bla.train import cli

    seen = {}
    monkeypatch.setattr("bla.train.trainer.run", lambda cfg: seen.setdefault("cfg", cfg) and {"status": "finished"})
    assert cli.main(["steps=70", "optim.lr=1e-3"]) == 0
    assert seen["cfg"].steps == 70 and seen["cfg"].optim.lr == 1e-3 and seen["cfg"].model.d_model == 192  # the main preset


def test_the_train_command_destroys_its_process_group(monkeypatch):
    """gloo's threads alive at interpreter exit abort a finished rank (SIGABRT fails torchrun):
    the command destroys the group however the run ends, and a later world of one starts afresh."""
    import torch.distributed as dist

    from bla.train import cli, trainer

    def stopped(cfg):
        trainer.init_distributed()
        raise trainer.TrainingStopped("non-finite losses")

    monkeypatch.setattr("bla.train.trainer.run", stopped)
    assert cli.main(["tiny", "steps=2", "optim.warmup_steps=1"]) == 1
    assert not dist.is_initialized()
    assert trainer.init_distributed()[:2] == (0, 1)  # on a fresh port: the old store's may still be held
    trainer.shutdown_distributed()
    assert not dist.is_initialized()


def test_example_run_configs_load():
    repo = Path(__file__).resolve().parents[1]
    configs = {path.name: load_train_config(str(path)) for path in sorted((repo / "configs").glob("*.yaml"))}  # validates
    example = configs["350m_fineweb_zero2.yaml"]
    assert example.model.d_model == 1024 and example.zero_stage == 2  # the 350m preset, as the file says


def test_cache_entries_built_concurrently_are_published_once(tmp_path):
    """Concurrent runs (``bla sweep --jobs``) may build the same tokenizer or shard cache entry:
    the first finished copy is published whole and the later ones are dropped."""
    from bla.train.prepare import _publish

    final = tmp_path / "shards"
    for pid, text in ((1, "first"), (2, "second")):
        tmp = tmp_path / f"shards.tmp{pid}"
        tmp.mkdir()
        (tmp / "manifest.json").write_text(text)
        _publish(tmp, final)
        assert not tmp.exists()
    assert (final / "manifest.json").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["shards"]


def _strip_gates(run: Path) -> None:
    """Make a run's checkpoints look like those written before bla.gates existed."""
    import yaml

    for tag in ckpt.list_checkpoints(run / "checkpoints"):
        cfg = yaml.safe_load((tag / "config.yaml").read_text())
        del cfg["model"]["bla"]["gates"]
        (tag / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        meta = {k: v for k, v in ckpt.read_meta(tag).items() if k != "files"}
        ckpt.write_manifest(tag, meta)


def test_a_checkpoint_without_gates_evaluates_and_resumes_as_dirichlet_v1(tmp_path):
    import torch

    from bla.train.checkpoint import load_run

    train(tmp_path, "v1", 1, "model.bla.gates=dirichlet_v1", "stop_at=4")
    ids = torch.arange(3, 67)[None]

    def loss_of(run: Path) -> tuple[float, str]:
        model, _, cfg = load_run(run)
        with torch.no_grad():
            return model(ids[:, :-1], targets=ids[:, 1:]).loss.item(), cfg.model.bla.gates

    before = loss_of(tmp_path / "v1")
    _strip_gates(tmp_path / "v1")
    assert loss_of(tmp_path / "v1") == before == (before[0], "dirichlet_v1")
    (tmp_path / "v1" / "summary.json").unlink()  # so that train() hands back the failed process
    refused = train(tmp_path, "v1", 1, check=False)["proc"]  # the new default would change the operator
    assert refused.returncode != 0 and "differs from this run's in ['bla.gates']" in refused.stderr
    assert 'model.bla.gates="dirichlet_v1"' in refused.stderr  # the override that resumes it
    resumed = train(tmp_path, "v1", 1, "model.bla.gates=dirichlet_v1")
    assert resumed["status"] == "finished" and [h["step"] for h in resumed["losses"]] == [5, 6, 7, 8]


class _Payload:
    """Unpickling this runs a shell command: what a checkpoint from a stranger could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_checkpoint_files_that_would_run_code_are_refused(runs, tmp_path):
    """Resume, eval and export read checkpoints with tensors-and-plain-data loads only: a pickled
    payload in the rng or model file is refused by name and never runs."""
    import torch

    from bla.train.export import load_model

    tmp, *_ = runs
    marker = tmp_path / "payload_ran"
    good = tmp / "full" / "checkpoints" / ckpt.tag_of(8)
    ckpt.verify_safe(good)  # a real ZeRO-2 checkpoint (two ranks, optimiser shards) passes
    rng = ckpt.load_rng_state(good / "rng_rank0.pt")
    assert isinstance(rng["numpy"], dict) and isinstance(rng["python"], dict)  # plain data, no pickled objects

    for victim in ("rng_rank0.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        run = tmp_path / victim / "run"
        shutil.copytree(tmp / "full", run)
        tag = run / "checkpoints" / ckpt.tag_of(8)
        torch.save({"module": _Payload(marker)}, tag / victim)
        manifest = json.loads((tag / ckpt.MANIFEST).read_text())
        ckpt.write_manifest(tag, {k: v for k, v in manifest.items() if k != "files"})  # sizes match again
        (run / "summary.json").unlink()
        with pytest.raises(ValueError, match=f"refusing to load .*{victim}.*GLOBAL posix.system"):
            load_model(run)
        resumed = train(tmp_path / victim, "run", 2, "zero_stage=2", "steps=12", f"resume={tag}", check=False)
        assert resumed["proc"].returncode != 0 and "refusing to load" in resumed["proc"].stderr
        assert not marker.exists()


KILL_SCRIPT = """
import os, signal, sys
from bla import data as lm_data
from bla.model import lm
from bla.train import checkpoint as ckpt
from bla.train.config import load_train_config
from bla.train.trainer import run
where, n = os.environ["KILL_AT"].split(":")
calls = {"n": 0}
def killing(original, point):
    def wrapped(*a, **k):
        if point == where:
            calls["n"] += 1
            if calls["n"] == int(n):
                if point in ("tokenizer", "shards"):  # built under its private name, not yet published
                    original(*a, **k)
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*a, **k)
    return wrapped
lm_data.train_tokenizer = killing(lm_data.train_tokenizer, "tokenizer")
lm_data.prepare = killing(lm_data.prepare, "shards")
ckpt.write_manifest = killing(ckpt.write_manifest, "checkpoint")  # every other file of the checkpoint written
original_forward = lm.BLALM.forward
forward = killing(original_forward, "step")
lm.BLALM.forward = lambda self, *a, **k: forward(self, *a, **k) if self.training else original_forward(self, *a, **k)
run(load_train_config("tiny", sys.argv[1:]))
"""


@pytest.mark.parametrize("kill_at", ["tokenizer:1", "shards:1", "checkpoint:2", "step:7"])
def test_sigkill_at_any_moment_resumes_bit_exact(tmp_path_factory, kill_at):
    """kill -9 while the tokenizer or the shards are built, inside a step (7: with saves every 2
    steps, every odd step is one after a save), or while a checkpoint is written (its files there, complete.json not):
    the next run rebuilds what was cut off, resumes from the last complete checkpoint and ends
    bit-identical to an uninterrupted run."""
    shared = tmp_path_factory.getbasetemp() / "sigkill_reference"
    if not (shared / "full" / "summary.json").exists():
        train(shared, "full", 1, "steps=8", "save_every=2", "eval_every=8")
    full = json.loads((shared / "full" / "summary.json").read_text())
    tmp = tmp_path_factory.mktemp("kill")
    cache = tmp / "cache" if kill_at.split(":")[0] in ("tokenizer", "shards") else _CACHE[0]
    args = [f"out_dir={tmp / 'run'}", f"cache_dir={cache}", *BASE, "steps=8", "save_every=2", "eval_every=8"]
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args], capture_output=True, text=True,
                          env={**_env(tmp), "KILL_AT": kill_at}, timeout=600)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stdout[-2000:] + done.stderr[-3000:]
    resumed = train(tmp, "run", 1, "steps=8", "save_every=2", "eval_every=8", f"cache_dir={cache}")
    assert resumed["status"] == "finished" and resumed["step"] == 8
    # the steps this process trained: all, or those after the last complete checkpoint (2 or 6)
    first = {"tokenizer:1": 1, "shards:1": 1, "checkpoint:2": 3, "step:7": 7}[kill_at]
    assert [h["step"] for h in resumed["losses"]] == list(range(first, 9))
    assert [h["loss"] for h in resumed["losses"]] == [h["loss"] for h in full["losses"] if h["step"] >= first]  # bit for bit
    assert resumed["val_loss"] == full["val_loss"]
