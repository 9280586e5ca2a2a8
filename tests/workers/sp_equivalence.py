"""torchrun worker: a sequence-parallel forward/backward equals the whole sequence on one rank.

argv: cases, each "WINDOW:LAYOUT:GATES[:EXTRA...]" (the BLA and SWA window, "packed" or "one" long
document across all slices, the BLA gates, and spec section 6's options: "write", "forget",
"stagger", or "steered" for all three), all checked in one process group (a torchrun start costs seconds).
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bla.data.packing import Packer, collate
from bla.model import BLALM, apply_overrides, load_preset
from bla.train import sequence_parallel as sp

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


EXTRAS = {"write": ["bla.write_gate=true"], "forget": ["bla.forget_gate=true"], "stagger": ["bla.phase_shift=staggered"]}
EXTRAS["steered"] = EXTRAS["write"] + EXTRAS["forget"] + EXTRAS["stagger"]


def check(window: int, layout: str, gates: str, extras: list[str]) -> None:
    torch.manual_seed(0)
    cfg = apply_overrides(load_preset("tiny"), ["n_layers=4", "layer_pattern=[bla, attn, swa, bla]", "bla.rope=true",
                                                f"bla.window={window}", f"swa_window={window}", f"bla.gates={gates}",
                                                *(o for e in extras for o in EXTRAS[e])])  # fmt: skip
    model = BLALM(cfg).double()
    packer = Packer(seq_len=48, bos_id=1, eos_id=2)
    gen = torch.Generator().manual_seed(1)
    for n in ((7, 50, 3, 19, 70) if layout == "packed" else (200,)):
        packer.add(torch.randint(3, 256, (n,), generator=gen).tolist())
    batch = collate([packer.pop_row(), packer.pop_row()])  # 2 rows of 48: T = 96
    count = (batch["labels"] != -100).sum()

    out = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], positions=batch["positions"])
    (F.cross_entropy(out.logits[0], batch["labels"][0], reduction="sum") / count).backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    ctx = sp.enable(model, sp.SPContext(None, rank, world))
    local = sp.shard(batch, ctx)
    out_local = model(local["input_ids"], cu_seqlens=local["cu_seqlens"], positions=local["positions"])
    (F.cross_entropy(out_local.logits[0], local["labels"][0], reduction="sum") / count).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
    a, n = ctx.slice_start, local["input_ids"].shape[1]
    err = float((out_local.logits - out.logits[:, a : a + n]).abs().max())
    worst = max(((p.grad - reference[name]).abs().max().item(), name) for name, p in model.named_parameters())
    print(f"rank {rank} {window}:{layout}:{gates}:{extras}: logits err {err:.2e}, worst grad err {worst[0]:.2e} ({worst[1]}), comm {sum(ctx.comm_bytes.values())} B")
    assert err < 1e-10 and worst[0] < 1e-10, (err, worst)


for case in sys.argv[1:]:
    window, layout, gates, *extras = case.split(":")
    check(int(window), layout, gates, extras)
dist.destroy_process_group()  # gloo's threads left running at exit can abort the process
