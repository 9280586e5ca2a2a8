"""Launch: every launcher path runs a tiny job with 2 CPU processes; dry runs; bad layouts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bla.launch.layout import expand_nodelist, fresh_process_env

REPO = Path(__file__).resolve().parents[1]
BLA = f"{sys.executable} -m bla.launch.cli"
SLURM_4x8 = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_JOB_NUM_NODES": "4",
             "SLURM_NODEID": "1", "SLURM_GPUS_PER_NODE": "8"}  # fmt: skip


def _env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in fresh_process_env().items() if not k.startswith("SLURM_")}
    path = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return {**env, "PATH": path, "OMP_NUM_THREADS": "1", "BLA": BLA, **extra}


def _bla(args: list[str], env: dict, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bla.launch.cli", *args], capture_output=True, text=True, env=env, timeout=timeout)


def _dry_run(args: list[str], slurm: dict, monkeypatch, capsys) -> tuple[int, str, str]:
    """``bla ARGS`` in this process (a dry run starts nothing: no subprocess's seconds of imports),
    with exactly the SLURM variables given."""
    import os

    from bla.launch.cli import main

    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_nodelist_expansion():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("node7") == ["node7"]


def test_dry_run_for_a_4_node_8_gpu_slurm_allocation(monkeypatch, capsys):
    code, out, err = _dry_run(["launch", "--launcher", "slurm", "--dry-run", "--sequence-parallel", "2", "--global-batch", "128",
                               "main", "model.preset=350m", "micro_batch=4"], SLURM_4x8, monkeypatch, capsys)  # fmt: skip
    assert code == 0, err
    for line in [
        "nodes                4 (gpu01, gpu02, gpu03, gpu04)",
        "processes per node   8",
        "world size           32",
        "this node            rank 1: global ranks 8..15",
        "master               gpu01:29500",
        "data-parallel        16 group(s) of ranks [0..1], [2..3], [4..5], [6..7] ...",
        "sequence-parallel    2 rank(s) per sequence (128 tokens each)",
        "micro-batch          4 x 256 tokens per rank, 2 accumulation step(s)",
        "global batch         128 sequences = 32,768 tokens per step",
    ]:
        assert line in out, f"missing: {line}\n{out}"
    assert "--nnodes 4 --nproc_per_node 8 --node_rank 1 --master_addr gpu01" in out
    assert "d_model: 1024" in out  # the 350m preset, resolved


@pytest.mark.parametrize(
    "args,env,match",
    [
        (["--sequence-parallel", "3"], SLURM_4x8, "sequence_parallel_size=3 does not divide the world size 32"),
        (["--global-batch", "100"], SLURM_4x8, "global batch 100 is not a multiple of micro_batch x data-parallel = 8 x 32 = 256"),
        (["--launcher", "torchrun", "--nodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1"], {}, "node rank 2 is outside 2 node"),
        (["--launcher", "slurm"], {}, "needs SLURM's variables"),
    ],
)
def test_bad_layouts_are_refused(monkeypatch, capsys, args, env, match):
    base = ["--launcher", "slurm"] if env and "--launcher" not in args else []
    code, _, err = _dry_run(["launch", "--dry-run", *base, *args, "main"], env, monkeypatch, capsys)
    assert code != 0 and match in err, err[-2000:]


def test_unknown_preset_is_refused(monkeypatch, capsys):
    code, _, err = _dry_run(["launch", "--dry-run", "huge"], {}, monkeypatch, capsys)
    assert code != 0 and "unknown train preset 'huge'" in err


TINY = ["tiny", "steps=4", "save_every=4", "eval_every=4"]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_deepspeed_launcher_runs_a_tiny_job_on_one_node(tmp_path):
    """deepspeed's own local launcher (no hostfile). torchrun's one-node command differs from its
    multi-node one by flags only (test_single_node_torchrun_command); the two-node test runs it."""
    out = tmp_path / "run"
    args = ["launch", "--launcher", "deepspeed", "--gpus-per-node", "2", "--master-port", "29643",
            *TINY, f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    done = _bla(args, _env(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    s = _summary(out)
    assert s["status"] == "finished" and s["world_size"] == 2 and s["step"] == 4


def test_single_node_torchrun_command(capsys):
    from bla.launch.cli import main

    assert main(["launch", "--launcher", "torchrun", "--gpus-per-node", "2", "--master-port", "29641", "--dry-run", *TINY]) == 0
    command = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("command"))
    assert "-m torch.distributed.run --nnodes 1 --nproc_per_node 2" in command and "--master_port 29641" in command
    assert command.endswith("-m bla.train.cli tiny steps=4 save_every=4 eval_every=4")


def test_slurm_script_resolves_the_job_from_slurms_variables(tmp_path):
    """The script's own part: SLURM's variables to `bla launch --launcher slurm` under srun (a
    stand-in here); `--dry-run` through BLA_LAUNCH_FLAGS, so the command is printed, not run
    (what it runs, torchrun with node ranks, is the two-node test's)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\n# stand-in for srun on one node: drop its flags, run the task\n'
                               'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')  # fmt: skip
    (fake / "srun").chmod(0o755)
    out = tmp_path / "run"
    env = _env(tmp_path, SLURM_JOB_ID="5", SLURM_JOB_NODELIST="localhost", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
               SLURM_GPUS_PER_NODE="2", MASTER_PORT="29645", BLA_LAUNCH_FLAGS="--dry-run")  # fmt: skip
    env["PATH"] = f"{fake}:{env['PATH']}"
    cmd = ["bash", str(REPO / "launch" / "slurm.sbatch"), *TINY, f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "master               localhost:29645" in done.stdout and "world size           2" in done.stdout
    assert "--nnodes 1 --nproc_per_node 2 --node_rank 0 --master_addr localhost --master_port 29645" in done.stdout
    assert not out.exists()  # printed, not run


@pytest.mark.parametrize(
    "args, match",
    [
        (["--launcher", "torchrun", "--nodes", "4"], "4 nodes need the address of node rank 0"),
        (["--launcher", "deepspeed", "--nodes", "2"], "the deepspeed launcher starts 2 nodes from a hostfile: pass --hostfile"),
        (["--launcher", "deepspeed", "--nodes", "2", "--hostfile", "HOSTFILE", "--no-ssh"], "pass --master-addr"),
        (["--launcher", "deepspeed", "--nodes", "3", "--hostfile", "HOSTFILE"], "lists 2 host(s) for --nodes 3"),
    ],
)
def test_multi_node_without_a_master_address_is_refused(monkeypatch, capsys, tmp_path, args, match):
    """Before, every such command named --master_addr 127.0.0.1: each node would have met itself."""
    (tmp_path / "hosts").write_text("node-a slots=8\n# a comment\nnode-b slots=8\n")
    args = [str(tmp_path / "hosts") if a == "HOSTFILE" else a for a in args]
    code, _, err = _dry_run(["launch", "--dry-run", "--gpus-per-node", "8", *args, "main"], {}, monkeypatch, capsys)
    assert code == 2 and match in err, err[-2000:]


def test_deepspeed_multi_node_lets_deepspeed_ask_the_first_host(monkeypatch, capsys, tmp_path):
    (tmp_path / "hosts").write_text("node-a slots=8\nnode-b slots=8\n")
    code, out, _ = _dry_run(["launch", "--dry-run", "--launcher", "deepspeed", "--nodes", "2", "--gpus-per-node", "8",
                             "--hostfile", str(tmp_path / "hosts"), "main"], {}, monkeypatch, capsys)  # fmt: skip
    assert code == 0 and "--master_addr" not in out and "master               node-a (its address asked" in out
    assert "nodes                2 (node-a, node-b)" in out


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_and_resume(tmp_path):
    """Two launcher agents as two nodes (node ranks 0 and 1, one process each, loopback rendezvous,
    gloo): torchrun trains to a checkpoint, the deepspeed launcher (--no-ssh, a hostfile of two
    hosts) resumes it to the end."""
    out, hosts = tmp_path / "run", tmp_path / "hosts"
    hosts.write_text("node-a slots=1\nnode-b slots=1\n")
    train = [*TINY, "save_every=2", "eval_every=2", f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}"]

    def both_nodes(launcher: list[str], *extra: str) -> list[subprocess.CompletedProcess]:
        port = str(_free_port())
        agents = [subprocess.Popen([sys.executable, "-m", "bla.launch.cli", "launch", *launcher, "--nodes", "2",
                                    "--node-rank", str(r), "--gpus-per-node", "1", "--master-addr", "127.0.0.1",
                                    "--master-port", port, *train, *extra],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(tmp_path))
                  for r in (0, 1)]  # fmt: skip
        done = [(a, *a.communicate(timeout=600)) for a in agents]
        for agent, stdout, stderr in done:
            assert agent.returncode == 0, stdout[-2000:] + stderr[-3000:]
        return [stdout for _, stdout, _ in done]

    both_nodes(["--launcher", "torchrun"], "stop_at=2")
    assert _summary(out)["step"] == 2 and _summary(out)["world_size"] == 2
    logs = both_nodes(["--launcher", "deepspeed", "--hostfile", str(hosts), "--no-ssh"])
    assert "resumed from" in logs[0] and "step_0000002 at step 2" in logs[0]
    s = _summary(out)
    assert s["status"] == "finished" and s["world_size"] == 2 and [h["step"] for h in s["losses"]] == [1, 2, 3, 4]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_version_is_said_without_importing_the_stack(capsys):
    import importlib.metadata

    from bla.launch.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"bla-lm {importlib.metadata.version('bla-lm')}"
    done = subprocess.run([sys.executable, "-c", "import sys; from bla.launch.cli import main; main(['--version']); "
                           "print('torch' in sys.modules)"], capture_output=True, text=True, env=fresh_process_env())  # fmt: skip
    assert done.stdout.split()[-1] == "False"  # no torch (seconds) to print a version


def test_help_is_said_without_importing_the_compiler():
    """`bla --help` builds every subcommand's parser: no torch._dynamo (1.3 s) or DeepSpeed on the way."""
    code = ("import sys; from bla.launch.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
            "print([m for m in ('torch._dynamo', 'deepspeed', 'transformers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=fresh_process_env())
    assert "usage: bla" in done.stdout and done.stdout.split("\n")[-2] == "[]", done.stdout[-500:] + done.stderr[-2000:]
