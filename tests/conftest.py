import os
import sys

# Triton kernels run in Triton's interpreter on machines without a GPU. This must be set
# before triton is first imported.
if not os.path.exists("/dev/nvidia0") and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
# Two xdist workers share the CI machine's 2 cores, so each of them, and every process a test
# starts, computes on one thread: with torch's default (one per core) the in-process training
# tests ran 3-10x slower beside the other worker (the main job 435 s against 120 s alone).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# No test may reach the network: hub-backed code paths are tested on local folders.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported before this file


# The files that take longest on the 2-core CI machine, longest first (measured 2026-12-07,
# `--durations=0`, summed by file: test_train 330 s, test_triton 225, test_main_job 213, ...):
# `./run.sh test` hands whole files to two workers in collection order (`--dist loadfile
# --no-loadscope-reorder`), so starting these first, longest first, keeps one of them from running
# alone at the end (the main job did: ~120 s with the other worker idle; with test_triton listed
# sixth the two workers' sums were 680 and 734 s, in this order 707 and 707).
LONGEST_FIRST = ("test_train.py", "test_triton.py", "test_main_job.py", "test_eval.py", "test_launch.py",
                 "test_sequence_parallel.py", "test_compile.py", "test_sweep.py", "test_resume_trust.py", "test_harness.py",
                 "test_export.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One finished run of the tiny preset (12 steps, its own tokenizer) shared by the tests that
    only read it: ``tiny_run / "run"`` (perplexity, the lm-eval harness)."""
    import subprocess

    from bla.launch.layout import fresh_process_env

    tmp = tmp_path_factory.mktemp("tiny_run")
    subprocess.run([sys.executable, "-m", "bla.train.cli", "tiny", f"out_dir={tmp / 'run'}", f"cache_dir={tmp / 'c'}"],
                   check=True, capture_output=True, env=fresh_process_env(), timeout=600)  # fmt: skip
    return tmp
