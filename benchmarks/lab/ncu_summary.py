"""One line per kernel from the text report of `ncu --section SpeedOfLight --section Occupancy
--section LaunchStats` (gpu_run.sh's ncu stage): duration, SM and memory throughput (% of peak),
DRAM throughput, registers, grid, theoretical and achieved occupancy.

    python benchmarks/lab/ncu_summary.py ncu_512.txt [--only _fwd _bwd _scan]
"""

import argparse
import re

FIELDS = {"Duration": "us", "Compute (SM) Throughput": "sm%", "Memory Throughput": "mem%", "DRAM Throughput": "dram%",
          "Registers Per Thread": "regs", "Grid Size": "grid", "Theoretical Occupancy": "occ%", "Achieved Occupancy": "ach%"}  # fmt: skip


def parse(text: str) -> list[dict]:
    kernels, current = [], None
    for line in text.splitlines():
        if re.search(r"\)x\([\d, ]+\), Context \d+, Stream", line):  # a kernel's header: its name, grid and block
            current = {"kernel": line.split()[0] if not line.lstrip().startswith("void") else line.split()[1]}
            kernels.append(current)
            continue
        if current is None:
            continue
        for name, key in FIELDS.items():
            m = re.match(rf"\s+{re.escape(name)}\s+\S*\s+([\d,.]+)$", line)
            if m:
                current[key] = float(m.group(1).replace(",", ""))
    return kernels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--only", nargs="*", default=["_fwd", "_bwd", "_scan"], help="kernel name prefixes to show")
    args = ap.parse_args()
    rows = [k for k in parse(open(args.report).read()) if any(k["kernel"].startswith(p) for p in args.only)]
    print("| kernel | us | SM % | memory % | DRAM % | registers | grid | occupancy theoretical / achieved % |")
    print("|---|---|---|---|---|---|---|---|")
    for k in rows:
        g = lambda key, fmt="{:.0f}": fmt.format(k[key]) if key in k else "?"  # noqa: E731
        print(f"| {k['kernel']} | {g('us', '{:.1f}')} | {g('sm%')} | {g('mem%')} | {g('dram%')} | {g('regs')} | {g('grid')} "
              f"| {g('occ%', '{:.1f}')} / {g('ach%', '{:.1f}')} |")  # fmt: skip


if __name__ == "__main__":
    main()
