"""Where compiling FlexAttention over packed documents spends its time (issue 43: the packed 350m
attn row compiled for 150-400 s on an H100 without finishing, the stack in Inductor's wait on its
compile workers). Times, each in a fresh process, the first call (compile included) of:
  mask       create_block_mask of the document mask alone, compiled (pytorch/pytorch#182060 saw
             minutes at some lengths)
  attention  flex_attention forward+backward with a block mask built outside, compiled
  both       the two in one compiled function, as bla.model.flex does inside a compiled block
  model      one 350m attn block of the stack (bla.model.lm.Block) on a packed row, compiled
at the packed benchmark's shape (one row of T = 16,384 tokens, documents of 512, 16 heads of 64,
bf16). A part still compiling after LIMIT seconds prints every thread's stack and is cut.
    python benchmarks/lab/flex_compile.py [--parts mask attention both model] [--seq-len 16384] [--limit 240]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

PART = r"""
import faulthandler, sys, time, torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
faulthandler.dump_traceback_later({limit}, exit=True)
part, T, H, d = "{part}", {T}, 16, 64
dev = "cuda"
document = torch.repeat_interleave(torch.arange(T // 512, device=dev), 512)
def mask_for(document):
    def mask_mod(b, h, i, j):
        return (i >= j) & (document[i] == document[j])
    return mask_mod
q, k, v = (torch.randn(1, H, T, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
t = time.perf_counter()
if part == "mask":
    bm = torch.compile(lambda doc: create_block_mask(mask_for(doc), None, None, T, T, device=dev))(document)
    torch.cuda.synchronize()
elif part == "attention":
    bm = create_block_mask(mask_for(document), None, None, T, T, device=dev)
    torch.compile(flex_attention)(q, k, v, block_mask=bm).sum().backward()
    torch.cuda.synchronize()
elif part == "both":
    def f(q, k, v, doc):
        return flex_attention(q, k, v, block_mask=create_block_mask(mask_for(doc), None, None, T, T, device=dev))
    torch.compile(f)(q, k, v, document).sum().backward()
    torch.cuda.synchronize()
else:
    from bla.model import apply_overrides, load_preset
    from bla.model.lm import Block
    cfg = apply_overrides(load_preset("350m"), ["layer_pattern=[attn]"])
    block = Block(cfg, "attn").to(dev, torch.bfloat16)
    x = torch.randn(1, T, cfg.d_model, device=dev, dtype=torch.bfloat16, requires_grad=True)
    positions = (torch.arange(T, device=dev) % 512)[None]
    cu = torch.arange(0, T + 1, 512, device=dev, dtype=torch.int32)
    y, _ = torch.compile(block)(x, positions, cu)
    y.float().sum().backward()
    torch.cuda.synchronize()
print(f"{{part:>10}} T={{T}}: first call {{time.perf_counter() - t:.1f}} s", flush=True)
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/lab/flex_compile.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--parts", nargs="+", default=["mask", "attention", "both", "model"],
                   choices=["mask", "attention", "both", "model"])  # fmt: skip
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--limit", type=float, default=240, help="seconds a part may take before its stacks are printed")
    args = p.parse_args(argv)
    for part in args.parts:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", PART.format(part=part, T=args.seq_len, limit=args.limit)],
                              capture_output=True, text=True)  # fmt: skip
        out = [line for line in (done.stdout + done.stderr).splitlines() if "Warning" not in line and "warn(" not in line]
        if done.returncode == 0:
            print("\n".join(line for line in out if "first call" in line), flush=True)
        else:
            print(f"{part:>10} T={args.seq_len}: exit {done.returncode} after {time.perf_counter() - start:.0f} s", flush=True)
            print("\n".join(out[-60:]), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
