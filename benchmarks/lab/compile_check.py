"""Graph breaks and recompilations of the compiled blocks on a GPU (issue 18's diagnosis):
``python benchmarks/lab/compile_check.py`` prints, per mixer, torch._dynamo.explain's graph and
break counts of one 350m-shaped block in bf16, forward and backward, and its break reasons."""

import torch

from bla.model import BLALM, apply_overrides, load_preset

for mixer in ("bla", "attn"):
    cfg = apply_overrides(load_preset("350m"), [f"layer_pattern=[{mixer}]", "n_layers=2"])
    model = BLALM(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(2, 2048, cfg.d_model, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(2048, device="cuda")[None].expand(2, -1)
    rope = None
    if model.uses_rope:
        from bla.model.layers import rope_table

        rope = rope_table(positions, cfg.head_dim, cfg.rope_theta)
    explained = torch._dynamo.explain(model.blocks[0])(x, positions, None, None, rope)
    print(f"{mixer}: {explained.graph_count} graphs, {explained.graph_break_count} breaks")
    for reason in explained.break_reasons:
        print("   ", str(reason.reason)[:300], reason.user_stack[-1] if reason.user_stack else "")
