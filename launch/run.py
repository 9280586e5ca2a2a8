"""``bla launch``: start ``bla train`` on one or many nodes through torchrun, the deepspeed
launcher or SLURM, after checking the layout; ``--dry-run`` prints the layout and config only."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from bla.train.config import load_train_config

from .layout import Layout, slurm_environment

# What multi-node runs commonly need; kept when already set (see the scripts' headers).
NCCL_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def _split_train_args(args: list[str]) -> tuple[str, list[str]]:
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return "main", list(args)


def resolve(args) -> tuple[Layout, object, list[str]]:
    preset, overrides = _split_train_args(args.train_args)
    slurm = slurm_environment() if args.launcher == "slurm" else {}
    if args.launcher == "slurm" and not slurm:
        raise ValueError("--launcher slurm needs SLURM's variables (SLURM_JOB_NODELIST, SLURM_NNODES, ...): run inside sbatch/srun")
    sp = args.sequence_parallel
    procs = args.gpus_per_node or slurm.get("procs_per_node") or _local_devices()
    nodes = slurm.get("nodes", args.nodes)
    hosts = slurm.get("hosts") or (read_hostfile(args.hostfile, nodes) if args.launcher == "deepspeed" and nodes > 1 else [])
    master_addr = _master_addr(args, nodes, slurm)
    world = nodes * procs
    if sp < 1 or world % sp:  # the layout's own error before the config's
        raise ValueError(f"launch layout: sequence_parallel_size={sp} does not divide the world size {world}")
    if sp > 1:
        overrides = [*overrides, f"sequence_parallel_size={sp}"]
    cfg = load_train_config(preset, overrides)
    layout = Layout(
        nodes=nodes,
        procs_per_node=procs,
        node_rank=slurm.get("node_rank", args.node_rank),
        master_addr=master_addr,
        master_port=args.master_port,
        sequence_parallel=cfg.sequence_parallel_size,
        micro_batch=cfg.micro_batch,
        grad_accum=cfg.grad_accum,
        seq_len=cfg.data.seq_len,
        hosts=hosts,
    ).check()
    if args.global_batch:
        per_step = cfg.micro_batch * layout.data_parallel
        if args.global_batch % per_step:
            raise ValueError(
                f"launch layout: global batch {args.global_batch} is not a multiple of micro_batch x data-parallel "
                f"= {cfg.micro_batch} x {layout.data_parallel} = {per_step}"
            )
        overrides = [*overrides, f"grad_accum={args.global_batch // per_step}"]
        cfg = load_train_config(preset, overrides)
        layout.grad_accum = cfg.grad_accum
    return layout, cfg, [preset, *overrides]


def _master_addr(args, nodes: int, slurm: dict) -> str:
    """Node rank 0's address, as every node must reach it. One node: loopback. Several: the user's
    --master-addr, SLURM's first host, or (deepspeed launcher with a hostfile, over ssh) none, so
    that DeepSpeed asks the hostfile's first host for its address. Never a guess: a multi-node
    command that names 127.0.0.1 would have every node rendezvous with itself."""
    if args.master_addr:
        return args.master_addr
    if slurm.get("master_addr"):
        return slurm["master_addr"]
    if nodes == 1:
        return "127.0.0.1"
    if args.launcher == "deepspeed" and not args.no_ssh:
        return ""  # read_hostfile has checked there is a hostfile
    how = "--master-addr and --node-rank on each node" if args.launcher == "torchrun" else "--master-addr"
    raise ValueError(f"launch layout: {nodes} nodes need the address of node rank 0, reachable from every node: pass {how}")


def read_hostfile(path: str, nodes: int) -> list[str]:
    """The first ``nodes`` hosts of a DeepSpeed hostfile (``host slots=N`` lines); the deepspeed
    launcher starts the other nodes from it, so a multi-node launch without one is refused."""
    if not path:
        raise ValueError(f"launch layout: the deepspeed launcher starts {nodes} nodes from a hostfile: pass --hostfile "
                         f"(lines 'host slots=N'), or use --launcher torchrun / slurm")  # fmt: skip
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"--hostfile {path}: cannot read it ({exc.strerror})") from None
    hosts = []
    for n, line in enumerate(lines, 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        if not re.fullmatch(r"\S+\s+slots=\d+", line):
            raise ValueError(f"--hostfile {path}, line {n}: expected 'host slots=N', got {line!r}")
        hosts.append(line.split()[0])
    if len(hosts) < nodes:
        raise ValueError(f"--hostfile {path} lists {len(hosts)} host(s) for --nodes {nodes}")
    return hosts[:nodes]


def _local_devices() -> int:
    import torch

    return torch.cuda.device_count() or 1


def command(args, layout: Layout, train_args: list[str]) -> list[str]:
    if args.launcher == "deepspeed":
        cmd = ["deepspeed", "--num_nodes", str(layout.nodes), "--num_gpus", str(layout.procs_per_node)]
        if layout.master_addr:  # else DeepSpeed asks the hostfile's first host (over ssh)
            cmd += ["--master_addr", layout.master_addr]
        cmd += ["--master_port", str(layout.master_port)]
        if args.hostfile:
            cmd += ["--hostfile", args.hostfile]
        if args.no_ssh:  # this node only; each node is started by hand with its --node-rank
            cmd += ["--no_ssh", "--node_rank", str(layout.node_rank)]
        return cmd + ["--module", "bla.train.cli", *train_args]
    # torchrun, and SLURM (one torchrun per node, started by srun)
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(layout.nodes),
            "--nproc_per_node", str(layout.procs_per_node), "--node_rank", str(layout.node_rank),
            "--master_addr", layout.master_addr, "--master_port", str(layout.master_port),
            "-m", "bla.train.cli", *train_args]  # fmt: skip


def launch(args) -> int:
    layout, cfg, train_args = resolve(args)
    cmd = command(args, layout, train_args)
    print(f"[bla launch] {args.launcher}\n{layout.describe()}", flush=True)
    if args.dry_run:
        print("command              " + shlex.join(cmd))
        print("config:\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return 0
    env = {**NCCL_DEFAULTS, **os.environ}
    return subprocess.call(cmd, env=env)


def add_launch_commands(sub) -> None:
    p = sub.add_parser("launch", help="start training on one or many nodes (torchrun, deepspeed, SLURM)")
    p.add_argument("--launcher", choices=["torchrun", "deepspeed", "slurm"], default="torchrun")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="processes per node (default: visible GPUs, or 1)")
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="", help="node rank 0's address (needed for several nodes, except under "
                   "SLURM or with the deepspeed launcher's hostfile)")  # fmt: skip
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--hostfile", default="", help="deepspeed launcher: hostfile of 'host slots=N' lines (needed for several nodes)")
    p.add_argument("--no-ssh", action="store_true", help="deepspeed launcher: start this node only (run on every node with "
                   "its --node-rank and --master-addr) instead of starting the others over ssh")  # fmt: skip
    p.add_argument("--sequence-parallel", type=int, default=1, help="ranks sharing each sequence")
    p.add_argument("--global-batch", type=int, default=0, help="sequences per step; sets grad_accum")
    p.add_argument("--dry-run", action="store_true", help="print the resolved layout, command and config, start nothing")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="train preset or YAML, then key=value overrides")
    p.set_defaults(func=launch)
