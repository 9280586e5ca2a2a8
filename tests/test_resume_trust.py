"""Checkpoints a run can trust on resume: damaged manifests and configs are one-line errors,
pruning never removes the checkpoint a run goes back to, a diverged run names it and recovers,
settings changed at resume are applied, and a run never silently starts over."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bla.launch.layout import fresh_process_env
from bla.train import checkpoint as ckpt
from bla.train.schedule import lr_lambda

FAST = ["save_every=2", "eval_every=2", "log_every=1", "keep_last=1", "optim.warmup_steps=1", "progress=false"]


def bla_train(out: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "bla.train.cli", "tiny", f"out_dir={out}", f"cache_dir={cache}", *FAST, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=fresh_process_env(OMP_NUM_THREADS="1"), timeout=600)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def last_line(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


def fake_checkpoint(tag_dir: Path, ranks: int = 1, **meta) -> Path:
    """A checkpoint folder with the files the trainer writes (contents stand-ins) and its manifest."""
    tag_dir.mkdir(parents=True)
    (tag_dir / "config.yaml").write_text("model: {}\n")
    torch.save({"module": {"w": torch.zeros(3)}}, tag_dir / "mp_rank_00_model_states.pt")
    for r in range(ranks):
        torch.save({"torch": torch.zeros(2)}, tag_dir / f"rng_rank{r}.pt")
        (tag_dir / f"loader_rank{r}.json").write_text("{}")
    step = int(tag_dir.name.removeprefix("step_"))
    ckpt.write_manifest(tag_dir, {"step": step, "world_size": ranks, "reason": "periodic", **meta})
    return tag_dir


def flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # as any write would


# ----------------------------------------------------------------------------- manifests (no training)


@pytest.mark.parametrize(
    "content, says",
    [
        (bytes(range(256)), "not readable JSON"),
        (b"[1, 2]", "is a JSON list, not an object"),
        (b'{"files": []}', "has no file list"),
        (b'{"files": {}}', "lists no files"),
        (b'{"files": {"x": {}}}', "has no sha256 for x"),
        (b'{"files": {"../../etc/passwd": 3}}', "lists a file outside the checkpoint"),
        (b'{"files": {"config.yaml": 9}, "world_size": "2"}', "has a world_size of '2'"),
    ],
)
def test_a_malformed_manifest_is_named_not_a_traceback(tmp_path, content, says):
    tag = fake_checkpoint(tmp_path / "step_0000002")
    (tag / ckpt.MANIFEST).write_bytes(content)
    assert says in ckpt.check_complete(tag)


def test_the_manifest_covers_its_own_metadata(tmp_path):
    """world_size decides whether resume converts to a universal checkpoint: an edit to it (or to
    any other field) is found, and a manifest without its own digest (written before it) must
    still agree with the rank files it lists."""
    tag = fake_checkpoint(tmp_path / "step_0000002")
    assert ckpt.check_complete(tag) is None
    manifest = json.loads((tag / ckpt.MANIFEST).read_text())
    (tag / ckpt.MANIFEST).write_text(json.dumps({**manifest, "world_size": 2}))
    assert "its own sha256 differs" in ckpt.check_complete(tag)
    legacy = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    (tag / ckpt.MANIFEST).write_text(json.dumps({**legacy, "world_size": 2}))
    assert "says world_size 2 but lists the files of 1 ranks" in ckpt.check_complete(tag)
    (tag / ckpt.MANIFEST).write_text(json.dumps(legacy))
    assert ckpt.check_complete(tag) is None


def test_pruning_checks_hashes_and_keeps_the_newest_verified(tmp_path):
    """keep_last=1 with the newest checkpoint damaged: the newest verified one stays (before, the
    two good ones were removed and the damaged one kept)."""
    tags = [fake_checkpoint(tmp_path / ckpt.tag_of(s)) for s in (2, 4, 6)]
    flip_a_byte(tags[2] / "mp_rank_00_model_states.pt")
    assert ckpt.prune(tmp_path, keep_last=1) == ["step_0000002"]
    assert [t.name for t in ckpt.list_checkpoints(tmp_path)] == ["step_0000004", "step_0000006"]
    assert ckpt.latest_complete(tmp_path, log=lambda _: None) == tags[1]


def test_pruning_keeps_the_healthy_checkpoint_before_a_divergence(tmp_path):
    """A checkpoint saved with a non-finite validation, or at a non-finite stop, does not stand in
    for the healthy ones: the last healthy one stays beside the newest, and is the one a diverged
    run goes back to; a streak of unhealthy ones is pruned like any (retention stays bounded)."""
    fake_checkpoint(tmp_path / ckpt.tag_of(2))
    healthy = fake_checkpoint(tmp_path / ckpt.tag_of(4), healthy=True)
    fake_checkpoint(tmp_path / ckpt.tag_of(6), healthy=False)
    fake_checkpoint(tmp_path / ckpt.tag_of(7), reason="nonfinite")
    assert ckpt.prune(tmp_path, keep_last=1) == ["step_0000002", "step_0000006"]
    assert ckpt.last_recoverable(tmp_path, before_step=7) == healthy
    assert ckpt.prune(tmp_path, keep_last=1) == []
    for step in (8, 9, 10):  # NaN validation from here on: bounded, the healthy one kept
        fake_checkpoint(tmp_path / ckpt.tag_of(step), healthy=False)
        ckpt.prune(tmp_path, keep_last=1)
    assert [t.name for t in ckpt.list_checkpoints(tmp_path)] == ["step_0000004", "step_0000010"]


def test_a_universal_folder_is_reused_only_when_converted_from_this_checkpoint(tmp_path):
    """ensure_universal reuses a folder only if its manifest names this checkpoint's manifest; and
    whatever it returns is read by verify_safe before DeepSpeed unpickles it."""

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    tag = fake_checkpoint(tmp_path / "step_0000004", ranks=2)
    universal = tmp_path / "step_0000004_universal"
    universal.mkdir()
    torch.save({"module": Payload()}, universal / "mp_rank_00_model_states.pt")
    (universal / "config.yaml").write_text("model: {}\n")
    ckpt.write_manifest(universal, {"step": 4, "converted_from": ckpt.sha256_of(tag / ckpt.MANIFEST)})
    assert ckpt.ensure_universal(tag) == universal  # a forger who knows the scheme gets this far...
    with pytest.raises(ValueError, match="refusing to load .*GLOBAL posix.system"):
        ckpt.verify_safe(universal)  # ...and no further: the trainer reads it like any checkpoint
    assert not (tmp_path / "ran").exists()


def test_a_damaged_saved_config_is_one_line(tmp_path):
    tag = fake_checkpoint(tmp_path / "step_0000002")
    for text, says in [("model: 3\n", "not a run config"), ("model: {dim: [}\n", "not YAML"),
                       ("model: {}\nsteps: {a: 1}\nbogus: 1\n", "not a valid run config")]:  # fmt: skip
        (tag / "config.yaml").write_text(text)
        with pytest.raises(ValueError, match=says):
            ckpt.saved_train_config(tag)


def test_a_file_not_written_by_torch_save_is_refused_by_name(tmp_path):
    import pickle

    for name, content in [("raw.pt", pickle.dumps({"module": {}})), ("noise.pt", os.urandom(256))]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"refusing to load .*{name}: not a file written by torch.save"):
            ckpt.safe_load(tmp_path / name)


# ----------------------------------------------------------------------------- resuming (tiny runs)


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """A tiny run stopped at step 4 of 8 (checkpoints at 2 and 4, keep_last=1: only 4 is left)."""
    tmp = tmp_path_factory.mktemp("four")
    ok(bla_train(tmp / "run", tmp / "cache", "steps=8", "stop_at=4"))
    return tmp


def copy_run(four_steps: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(four_steps / "run", tmp_path / "run")
    return tmp_path / "run"


def test_no_usable_checkpoint_refuses_instead_of_starting_over(four_steps, tmp_path):
    run = copy_run(four_steps, tmp_path)
    summary = (run / "summary.json").read_text()
    for tag in ckpt.list_checkpoints(run / "checkpoints"):
        flip_a_byte(max(tag.rglob("*.pt"), key=lambda p: p.stat().st_size))
    done = bla_train(run, four_steps / "cache", "steps=8")
    assert done.returncode == 2, done.stderr[-2000:]
    line = last_line(done)
    assert "holds 1 checkpoint(s) and none can be resumed" in line and "sha256 differs" in line and "resume=none" in line
    assert (run / "summary.json").read_text() == summary and len(ckpt.list_checkpoints(run / "checkpoints")) == 1
    ok(bla_train(run, four_steps / "cache", "steps=8", "resume=none"))  # afresh on purpose: the old ones set aside
    assert [p.name for p in (run / "checkpoints" / "set_aside").iterdir()][0][:8].isdigit()
    assert json.loads((run / "summary.json").read_text())["losses"][0]["step"] == 1


def test_changed_settings_are_applied_on_resume(four_steps, tmp_path):
    """optim.lr, weight_decay, betas and steps changed at resume: said in one line, and in the
    optimiser and schedule that train (read back from the next checkpoint)."""
    from bla.train.config import load_train_config

    run = copy_run(four_steps, tmp_path)
    new = ["steps=6", "optim.lr=1e-3", "optim.weight_decay=0.5", "optim.betas=[0.8,0.9]"]
    done = ok(bla_train(run, four_steps / "cache", *new))
    assert "shm_comm" not in done.stdout + done.stderr  # one process builds no shared-memory collectives
    said = next(ln for ln in done.stdout.splitlines() if "settings changed since the checkpoint" in ln)
    for part in ("steps 8 -> 6", "optim.lr 0.003 -> 0.001", "optim.weight_decay 0.1 -> 0.5", "optim.betas [0.9, 0.95] -> [0.8, 0.9]"):
        assert part in said, said
    states = ckpt.safe_load(run / "checkpoints" / ckpt.tag_of(6) / "mp_rank_00_model_states.pt", deepspeed_types=True)
    group = states["optimizer"]["param_groups"][0]
    cfg = load_train_config("tiny", new)
    assert group["weight_decay"] == 0.5 and tuple(group["betas"]) == (0.8, 0.9) and group["initial_lr"] == 1e-3
    assert states["lr_scheduler"]["base_lrs"] == [1e-3]
    assert group["lr"] == pytest.approx(1e-3 * lr_lambda(cfg)(6))  # the new schedule, over 6 steps


@pytest.mark.parametrize("override, setting", [("zero_stage=1", "zero_stage"), ("precision=bf16", "precision")])
def test_resuming_with_another_stage_or_precision_is_one_line(four_steps, tmp_path, override, setting):
    run = copy_run(four_steps, tmp_path)
    done = bla_train(run, four_steps / "cache", "steps=8", override)
    assert done.returncode == 2 and "it was saved with " in last_line(done), done.stderr[-2000:]
    has, fix = last_line(done).split("this run has ")[1].split("; resume with ")
    assert override in has.split() and f"{setting}=" in fix.split(",")[0]
    assert "Traceback" not in done.stderr


def test_a_diverged_run_names_the_checkpoint_to_go_back_to_and_recovers(four_steps, tmp_path):
    """optim.lr=1e6 from step 4: step 6 validates to NaN (its checkpoint is kept but not counted by
    keep_last=1), step 7's loss is non-finite. The message names step 4; resuming it with a sane
    rate trains to the end with finite losses, the diverged checkpoint set aside."""
    run = copy_run(four_steps, tmp_path)
    done = bla_train(run, four_steps / "cache", "steps=8", "optim.lr=1e6", "nan_policy=stop")
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    back = run / "checkpoints" / ckpt.tag_of(4)
    line = last_line(done)
    assert f"the last healthy one before them is {back}" in line and f"resume={back} optim.lr=0.003" in line, line
    recovered = ok(bla_train(run, four_steps / "cache", "steps=8", f"resume={back}"))
    assert "moved to" in recovered.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["val_loss"] < 6.0
    assert all(h["loss"] < 6.5 for h in summary["losses"])
    assert [t.name for t in ckpt.list_checkpoints(run / "checkpoints")] == ["step_0000008"]


# ----------------------------------------------------------------------------- the out_dir lock


@pytest.mark.parametrize("content", ["", "{}", '{"pid": "abc", "host": "x"}', "[1, 2]", '{"pid": true}', "\x00\xff"])
def test_a_lock_file_that_names_no_holder_is_taken_over(tmp_path, content):
    from bla.train import lock

    (tmp_path / lock.LOCK_NAME).write_text(content)
    said = []
    held = lock.acquire(tmp_path, said.append)
    assert json.loads(held.read_text())["pid"] == os.getpid() and "taking over the stale lock" in said[0]
    lock.release(held)
    assert not held.exists() and list(tmp_path.iterdir()) == []  # no private file left behind


def test_the_lock_appears_with_its_holder_in_it(tmp_path, monkeypatch):
    """Created by linking a file already written: a racing process never reads an empty lock (before,
    one took another's half-created lock for stale and both "held" it)."""
    from bla.train import lock

    seen = []
    real_link = os.link

    def link(src, dst):
        seen.append(json.loads(Path(src).read_text()))
        real_link(src, dst)

    monkeypatch.setattr(lock.os, "link", link)
    held = lock.acquire(tmp_path, print)
    assert seen == [json.loads(held.read_text())] and seen[0]["pid"] == os.getpid()
    with pytest.raises(lock.OutDirLocked, match="in use by another training process"):
        lock.acquire(tmp_path, print)  # this process is alive: its own second acquire is refused
    lock.release(held)


SIGTERM_IN_VALIDATION = """
import os, signal, sys
from bla.model import lm
from bla.train.config import load_train_config
from bla.train.trainer import run
calls = {"eval": 0}
original = lm.BLALM.forward
def forward(self, *a, **k):
    if not self.training:
        calls["eval"] += 1
        if calls["eval"] == 1:  # the scheduler's preemption arrives in the first validation batch
            os.kill(os.getpid(), signal.SIGTERM)
    return original(self, *a, **k)
lm.BLALM.forward = forward
summary = run(load_train_config("tiny", sys.argv[1:]))
print("EVAL_BATCHES", calls["eval"], "STATUS", summary["status"], "STEP", summary["step"])
"""


def test_sigterm_during_validation_is_honoured_within_a_batch(four_steps, tmp_path):
    """A long validation (50 batches here) does not hold up a preemption: it stops before its next
    batch, the step's checkpoint is saved, the run exits 0 (before, it validated to the end)."""
    run = copy_run(four_steps, tmp_path)
    args = [f"out_dir={run}", f"cache_dir={four_steps / 'cache'}", *FAST, "steps=8", "eval_batches=50"]
    done = subprocess.run([sys.executable, "-c", SIGTERM_IN_VALIDATION, *args], capture_output=True, text=True,
                          env=fresh_process_env(OMP_NUM_THREADS="1"), timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "EVAL_BATCHES 1 STATUS interrupted by SIGTERM; checkpoint saved STEP 6" in done.stdout, done.stdout[-2000:]
    assert "validation interrupted by a signal" in done.stdout
    assert ckpt.latest_complete(run / "checkpoints").name == ckpt.tag_of(6)


def test_a_log_file_gets_one_line_a_log_step(tmp_path):
    """Output to a file (not a terminal): a line per log step with loss, rate, grad norm, tokens/s
    and MFU, and no progress bar redrawn with carriage returns onto one line."""
    cmd = [sys.executable, "-m", "bla.train.cli", "tiny", f"out_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
           "steps=4", "log_every=2"]  # fmt: skip
    with open(tmp_path / "train.log", "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=fresh_process_env(OMP_NUM_THREADS="1"), timeout=600)
    text = (tmp_path / "train.log").read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = [ln for ln in text.splitlines() if ": loss " in ln and "grad norm" in ln]
    assert [ln.split("step ")[1].split(":")[0] for ln in lines] == ["2/4", "4/4"], lines
    assert all("tokens/s" in ln and "MFU" in ln for ln in lines)


def test_a_step_that_cannot_fit_in_memory_is_refused_before_any_work(tmp_path):
    """micro_batch far too large: one line naming it, before the tokenizer and shards are built."""
    done = bla_train(tmp_path / "run", tmp_path / "cache", "micro_batch=10000000")
    assert done.returncode == 2 and "micro_batch=10000000 x data.seq_len=32 tokens a step need at least" in last_line(done)
    assert not (tmp_path / "cache" / "tokenizers").exists()
    from bla.train.config import load_train_config
    from bla.train.trainer import memory_floor

    assert memory_floor(load_train_config("main"), bf16=False) < 2**30  # the main job is far from it
