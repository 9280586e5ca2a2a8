"""Sequence parallelism (gloo, 2 and 4 CPU ranks): outputs and every parameter gradient of a
hybrid model (BLA with short conv and RoPE, full attention, SWA) split along the sequence equal
the whole sequence on one rank, in float64."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bla.kernels import GATES
from bla.launch.layout import fresh_process_env

WORKER = Path(__file__).parent / "workers" / "sp_equivalence.py"


# W <= slice (Gamma = 0) and W > slice; packed or one document; Gamma of every gate rule; Gamma from
# data (spec section 6's gates, staggered heads)
CASES = ["16:packed:dirichlet", "64:packed:dirichlet", "64:one:dirichlet", "64:one:fejer", "64:one:dirichlet_v1",
         "16:packed:fejer:steered", "64:one:dirichlet:steered"]


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [2, 4])
def test_sequence_parallel_equals_one_rank(ranks):
    assert {case.split(":")[2] for case in CASES} == set(GATES)
    env = fresh_process_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(29800 + ranks),
           str(WORKER), *CASES]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("logits err") == ranks * len(CASES)


def _train(tmp_path, name: str, nproc: int, port: int, *overrides: str) -> list[float]:
    import json

    env = fresh_process_env()
    out = tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
           "-m", "bla.train.cli", "tiny", f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}", "steps=6", "save_every=3",
           "eval_every=6", "zero_stage=2", "optim.lr=1e-2", "optim.warmup_steps=1", *overrides]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return {h["step"]: h["loss"] for h in json.loads((out / "summary.json").read_text())["losses"]}


@pytest.mark.slow
def test_sequence_parallel_training_with_zero2_matches_and_resumes(tmp_path):
    plain = _train(tmp_path, "dp2", 2, 29861)  # 2 data-parallel ranks
    sp = _train(tmp_path, "dp2sp2", 4, 29863, "sequence_parallel_size=2")  # the same 2 groups, each split in 2
    assert list(sp) == list(plain) == [1, 2, 3, 4, 5, 6]
    assert list(sp.values()) == pytest.approx(list(plain.values()), rel=1e-4)  # fp32, another summation order
    # exact resume: the SP run's step-3 checkpoint, resumed into another run, trains steps 4-6 as it did
    rest = _train(tmp_path, "resumed", 4, 29865, "sequence_parallel_size=2",
                  f"resume={tmp_path / 'dp2sp2' / 'checkpoints' / 'step_0000003'}")  # fmt: skip
    assert list(rest) == [4, 5, 6] and all(rest[step] == sp[step] for step in rest)
