"""The world layout of a launch: nodes, ranks, data- and sequence-parallel groups, batch sizes.

Resolved from ``bla launch`` arguments and, under SLURM, from SLURM's variables; checked before
anything starts (``bla launch --dry-run`` prints it).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def fresh_process_env(**extra: str) -> dict[str, str]:
    """This process's environment without a launcher's rank variables (plus ``extra``): a child
    started with it is a world of its own, not a rank of ours."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return {**env, **extra}


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host lists: ``gpu[01-03,07],login1`` -> gpu01 gpu02 gpu03 gpu07 login1."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"(.*?)\[([^\]]*)\](.*)", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{width}d}{suffix}")
    return hosts


@dataclass
class Layout:
    nodes: int
    procs_per_node: int  # GPUs per node (processes per node on CPU)
    node_rank: int
    master_addr: str
    master_port: int
    sequence_parallel: int
    micro_batch: int  # rows per micro-batch and rank
    grad_accum: int
    seq_len: int
    hosts: list[str]

    @property
    def world(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def data_parallel(self) -> int:
        return self.world // self.sequence_parallel

    @property
    def global_batch(self) -> int:
        """Rows (sequences of seq_len) per optimiser step."""
        return self.micro_batch * self.grad_accum * self.data_parallel

    def check(self) -> "Layout":
        def bad(msg):
            raise ValueError(f"launch layout: {msg}")

        if self.nodes < 1 or self.procs_per_node < 1:
            bad(f"need at least one node and one process per node, got {self.nodes} x {self.procs_per_node}")
        if not 0 <= self.node_rank < self.nodes:
            bad(f"node rank {self.node_rank} is outside {self.nodes} node(s)")
        if self.sequence_parallel < 1 or self.world % self.sequence_parallel:
            bad(f"sequence_parallel_size={self.sequence_parallel} does not divide the world size {self.world}")
        if self.hosts and len(self.hosts) != self.nodes:
            bad(f"{len(self.hosts)} host(s) listed for {self.nodes} node(s): {self.hosts}")
        return self

    def describe(self) -> str:
        sp, dp = self.sequence_parallel, self.data_parallel
        ranks = lambda g: f"{g * sp}..{g * sp + sp - 1}" if sp > 1 else str(g * sp)  # noqa: E731
        groups = ", ".join(f"[{ranks(g)}]" for g in range(min(dp, 4))) + (" ..." if dp > 4 else "")
        lines = [
            f"nodes                {self.nodes}" + (f" ({', '.join(self.hosts)})" if self.hosts else ""),
            f"processes per node   {self.procs_per_node}",
            f"world size           {self.world}",
            f"this node            rank {self.node_rank}: global ranks {self.node_rank * self.procs_per_node}.."
            f"{(self.node_rank + 1) * self.procs_per_node - 1}",
            f"master               {self.master_addr or self.hosts[0] + ' (its address asked over ssh by DeepSpeed)'}:{self.master_port}",
            f"data-parallel        {dp} group(s) of ranks {groups}",
            f"sequence-parallel    {sp} rank(s) per sequence" + (f" ({self.seq_len // sp} tokens each)" if sp > 1 else ""),
            f"micro-batch          {self.micro_batch} x {self.seq_len} tokens per rank, {self.grad_accum} accumulation step(s)",
            f"global batch         {self.global_batch} sequences = {self.global_batch * self.seq_len:,} tokens per step",
        ]  # fmt: skip
        return "\n".join(lines)


def slurm_environment() -> dict:
    """Nodes, node rank, hosts and GPUs per node from SLURM's variables (empty outside SLURM)."""
    env = os.environ
    if "SLURM_JOB_ID" not in env and "SLURM_JOB_NODELIST" not in env:
        return {}
    hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", len(hosts) or 1)))
    gpus = env.get("SLURM_GPUS_PER_NODE") or env.get("SLURM_GPUS_ON_NODE")
    out = {"nodes": nodes, "node_rank": int(env.get("SLURM_NODEID", 0)), "hosts": hosts}
    if gpus:
        out["procs_per_node"] = int(gpus.split(":")[-1].split("(")[0])
    if hosts:
        out["master_addr"] = hosts[0]
    return out
