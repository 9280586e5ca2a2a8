"""How fast BLA and attention memorise one packed batch of random tokens (the CPU, fp32, torch
backend): the benchmark's packed rows repeat one batch, so their "loss after" falls by
memorisation; a low one is not by itself a leak across documents (tests/test_isolation.py is).
    OMP_NUM_THREADS=1 python benchmarks/lab/memorise.py
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training import packed_batch  # noqa: E402

from bla.model import BLALM, apply_overrides, load_preset  # noqa: E402

batch = packed_batch(32000, rows=4, seq_len=512, mean_doc=128)
for mixer in ("bla", "attn"):
    torch.manual_seed(0)
    model = BLALM(apply_overrides(load_preset("350m"), [f"layer_pattern=[{mixer}]", "d_model=256", "n_layers=4", "n_heads=4",
                                                        "bla.window=512", "bla.slots=64"]))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], positions=batch["positions"], targets=batch["labels"],
                     loss_chunk=2048).loss  # fmt: skip
        losses.append(round(loss.item(), 3))
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(mixer, losses)
