"""The README's main job, exactly as a user runs it, offline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bla.launch.layout import fresh_process_env


@pytest.mark.slow
def test_main_job_finishes_offline(tmp_path):
    env = fresh_process_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "bla.launch.cli", "train", f"cache_dir={tmp_path / 'cache'}", "progress=false"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "runs" / "main" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 200
    assert summary["val_loss"] < 6.5  # a 4096-token vocabulary starts at ln(4096) = 8.3
    assert "checkpoints" in done.stdout and "tensorboard" in done.stdout
