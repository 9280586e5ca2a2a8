"""The trainer's gradient hand-over for DeepSpeed's BF16_Optimizer (bla.train.bf16_grads): the
fp32 gradients it leaves are DeepSpeed's own to the bit, over accumulated micro-batches."""

import torch


def test_foreach_hand_over_equals_deepspeeds():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    from bla.model import BLALM, apply_overrides, load_preset
    from bla.train.bf16_grads import fuse_hp_grad_update
    from bla.train.config import TrainConfig
    from bla.train.deepspeed_import import deepspeed
    from bla.train.trainer import aligned_param_groups, forward_loss, init_distributed, shutdown_distributed

    init_distributed()
    try:
        torch.manual_seed(0)
        # the write gate's 2-element biases take groups of their own (aligned_param_groups): several groups
        model = BLALM(apply_overrides(load_preset("tiny"), ["bla.write_gate=true"]))
        cfg = TrainConfig.from_dict({"grad_accum": 2}, validate=False)
        engine, *_ = deepspeed().initialize(model=model, model_parameters=aligned_param_groups(model.parameters()),
                                            config=cfg.deepspeed(bf16=True))  # fmt: skip
        opt = engine.optimizer
        assert isinstance(opt, BF16_Optimizer) and len(opt.bf16_groups) > 1
        assert fuse_hp_grad_update(opt)
        lps = [p for group in opt.bf16_groups for p in group]
        hps = [g for group in opt.fp32_groups_gradients for g in group]
        ids = torch.randint(0, model.cfg.vocab_size, (2, 2, 33))
        micro_grads = []
        for micro in range(2):  # accumulated: the second hand-over adds onto the first
            loss, _ = forward_loss(engine, {"input_ids": ids[micro, :, :-1], "labels": ids[micro, :, 1:]}, engine.device)
            engine.backward(loss)
            micro_grads.append([p.grad.float().view(-1) for p in lps])
        assert all(torch.equal(h.view(-1), a + b) for h, a, b in zip(hps, *micro_grads))
        assert all(p._hp_grad is h for p, h in zip(lps, hps))
        assert all(all(flags) for flags in opt.fp32_groups_has_gradients)

        # DeepSpeed's own hand-over of the same bf16 gradients (the second micro-batch's): the same bits
        opt.clear_hp_grads()
        BF16_Optimizer.update_hp_grads(opt)
        theirs = [h.clone() for h in hps]
        opt.clear_hp_grads()
        opt.update_hp_grads()
        assert all(torch.equal(a, b) for a, b in zip(hps, theirs)) and any(h.any() for h in theirs)
        opt.update_hp_grads(clear_lp_grads=True)  # and it zeroes the bf16 gradients when asked, as DeepSpeed's does
        assert not any(p.grad.any() for p in lps)
    finally:
        shutdown_distributed()


def test_other_optimisers_keep_their_own():
    from bla.train.bf16_grads import fuse_hp_grad_update

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    assert not fuse_hp_grad_update(opt) and "update_hp_grads" not in vars(opt)
