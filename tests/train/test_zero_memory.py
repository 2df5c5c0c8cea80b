"""ZeRO-3 in fp32 keeps one copy of each parameter partition: the optimizer's fp32 master partitions are the
parameter partitions themselves (DeepSpeed means to alias them but compares a device with a string), and
training is unchanged by it. The memory figures are bench/zero_memory.py's."""

from __future__ import annotations

import pytest
import torch


def test_zero3_fp32_master_is_the_parameter_partition(tiny_cfg: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmpt.config import load_config
    from mmpt.data.loader import train_loader
    from mmpt.pretrainer import build_data_specs, set_seed
    from mmpt.training import engine as engines
    from mmpt.training.loop import plain_step

    tiny_cfg["train"].update(zero_stage=3, stage3_param_persistence_threshold=0)
    tiny_cfg["data"]["workers"] = 0
    cfg = load_config(tiny_cfg)
    d = engines.init_distributed()
    loader, _ = train_loader(cfg, build_data_specs(cfg), d.rank, d.world)
    batches = [b for b, _ in zip(loader, range(3), strict=False)]

    def trained(share: bool) -> tuple[list[float], list[torch.Tensor], object]:
        if not share:
            monkeypatch.setattr(engines, "share_fp32_master", lambda optimizer: 0)
        set_seed(cfg.seed)
        engine, _ = engines.build_engine(cfg, d, len(batches))
        losses = [plain_step(engine, batch)["loss"].item() for batch in batches]
        return losses, [p.ds_tensor.detach().clone() for p in engine.module.parameters()], engine.optimizer

    losses, weights, opt = trained(share=True)
    pairs = list(zip(opt.fp16_partitioned_groups_flat, opt.fp32_partitioned_groups_flat, strict=True))
    assert pairs and all(master.data_ptr() == params.data_ptr() for params, master in pairs)
    ref_losses, ref_weights, ref_opt = trained(share=False)
    assert any(m.data_ptr() != p.data_ptr() for p, m in zip(ref_opt.fp16_partitioned_groups_flat,
                                                             ref_opt.fp32_partitioned_groups_flat, strict=True))
    assert losses == ref_losses
    assert all(torch.equal(a, b) for a, b in zip(weights, ref_weights, strict=True))
