"""Same seed, same model at every ZeRO stage: a fresh ZeRO-3 engine's consolidated weights equal the
stage-0 engine's bit for bit, for every registered encoder and objective (one rank here; two ranks
in test_multirank's torchrun harness)."""

from __future__ import annotations

import pytest
import torch
from _zero_init_cases import ENCODER_CASES, OBJECTIVE_CASES, cases, initial_weights

from mmpt.registry import encoders, objectives


def test_every_registered_part_has_a_case() -> None:
    missing = sorted(set(encoders.names()) - set(ENCODER_CASES)) + sorted(set(objectives.names()) - set(OBJECTIVE_CASES))
    assert not missing, (f"no tiny config for {missing}: give the class `tiny_configs` (small keyword sets) so the "
                         "same-seed-same-model and contract tests cover it")


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert list(got) == list(want), f"{what}: parameter names differ"
    differ = [n for n in want if got[n].dtype != want[n].dtype or not torch.equal(got[n], want[n])]
    assert not differ, f"{what}: {len(differ)} of {len(want)} tensors differ, e.g. {differ[:5]}"


@pytest.mark.parametrize("case", sorted(cases()))
def test_zero3_starts_from_the_stage0_model(case: str) -> None:
    raw = cases()[case]
    ref = initial_weights(raw, stage=0)
    assert_same_weights(initial_weights(raw, stage=3), ref, f"{case} ZeRO-3 vs ZeRO-0")


def test_zero3_parts_are_partitioned_as_soon_as_built() -> None:
    """No rank holds the whole model: each encoder and objective is sharded once its constructor
    returns, before the next part is built; the rest (heads) follows at the end."""
    from mmpt.config import load_config
    from mmpt.parts.build import build_module
    from mmpt.pretrainer import build_pretrainer
    from mmpt.training.engine import deepspeed_config, init_distributed

    cfg = load_config(cases()["clip#0"])
    cfg.train.zero_stage = 3
    d = init_distributed()
    seen: dict[str, bool] = {}

    def build(on_part):
        module = build_pretrainer(cfg, on_part)
        seen.update({n: hasattr(p, "ds_id") for n, p in module.named_parameters()})
        return module

    module = build_module(build, deepspeed_config(cfg, d.world), d.device)
    parts = {n: s for n, s in seen.items() if n.startswith(("model.encoders.", "objectives."))}
    assert parts and all(parts.values()), [n for n, s in parts.items() if not s]
    assert not any(s for n, s in seen.items() if n.startswith("model.heads."))
    assert all(hasattr(p, "ds_id") for p in module.parameters())
