"""One contract every registered encoder keeps, checked on its own demo data through its own data side.

Per encoder (tiny config from tests/train/_zero_init_cases.py): outputs and masks for batches of 1 and
3 (padding a shorter sample changes none of its outputs), gradient checkpointing gives the same
outputs and gradients, ``no_weight_decay`` names real parameters, the state dict round-trips, and
export -> load gives the same embeddings. (The 2-rank ZeRO-3 step is the zero-init harness's.)
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).parents[1] / "train"))

from _zero_init_cases import ENCODER_CASES, cases  # noqa: E402

from mmpt.config import load_config  # noqa: E402
from mmpt.contracts import EncoderOutput
from mmpt.data.loader import eval_loader  # noqa: E402
from mmpt.pretrainer import build_pretrainer, set_seed  # noqa: E402
from mmpt.registry import encoders, modalities  # noqa: E402

ATOL = 1e-5


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Eight demo samples carrying every registered modality (none absent)."""
    from mmpt.data.demo_shards import generate_demo

    info = generate_demo(tmp_path_factory.mktemp("contract"), train_samples=0, eval_samples=8, shard_size=8,
                         modalities=modalities.names(), absent_fraction=0.0, progress=False)
    return info.eval_pattern


def case_config(name: str) -> dict:
    if name not in ENCODER_CASES:
        pytest.fail(f"encoder '{name}' has no tiny config: add one to tests/train/_zero_init_cases.py")
    return cases()[f"{name}#0"]


def batches(pattern: str, modality: str, spec: object, size: int, count: int) -> list[dict[str, Tensor]]:
    loader = iter(eval_loader(pattern, {modality: spec}, size, workers=0))
    out = []
    for _ in range(count):
        batch = next(loader)
        assert batch.present[modality].all(), f"a demo sample lacks '{modality}'"
        out.append(batch.fields[modality])
    return out


def real_tokens(out: EncoderOutput, row: int) -> Tensor:
    return out.tokens[row] if out.mask is None else out.tokens[row][out.mask[row]]


def check_output(out: EncoderOutput, batch: int, width: int) -> None:
    assert out.tokens.dim() == 3 and out.tokens.shape[0] == batch and out.tokens.shape[2] == width
    assert out.pooled.shape == (batch, width)
    if out.mask is not None:
        assert out.mask.dtype == torch.bool and out.mask.shape == out.tokens.shape[:2]
        assert out.mask.any(1).all(), "every sample has at least one real token"
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


def grads_of(tower: nn.Module, fields: dict[str, Tensor], seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    tower.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # train-mode randomness (masking, augmentation) the same in both runs
    out = tower(fields)
    weights = torch.linspace(-1, 1, out.pooled.numel()).view_as(out.pooled)
    (out.pooled * weights).sum().backward()
    return out.pooled.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", encoders.names())
def test_encoder_contract(name: str, demo_shards: str, tmp_path: Path) -> None:
    from mmpt.commands.export import load, write_export

    raw = case_config(name)
    modality = encoders.get(name).modality
    cfg = load_config(raw)
    set_seed(0)
    pretrainer = build_pretrainer(cfg)  # every backend (timm included) is a required dependency
    tower = pretrainer.model.encoders[modality].eval()
    spec = pretrainer.model.data[modality]

    # batch of 3 and the same samples one at a time: shapes, masks, and padding that changes nothing
    (three,) = batches(demo_shards, modality, spec, 3, 1)
    ones = batches(demo_shards, modality, spec, 1, 3)
    with torch.no_grad():
        out3 = tower(three)
        check_output(out3, 3, tower.width)
        for row, fields in enumerate(ones):
            out1 = tower(fields)
            check_output(out1, 1, tower.width)
            torch.testing.assert_close(out1.pooled[0], out3.pooled[row], atol=ATOL, rtol=1e-4)
            torch.testing.assert_close(real_tokens(out1, 0), real_tokens(out3, row), atol=ATOL, rtol=1e-4)

    # gradient checkpointing: same outputs and gradients (train mode, same seed)
    tower.train()
    plain, plain_grads = grads_of(tower, three, seed=1)
    tower.set_grad_checkpointing(True)
    ckpt, ckpt_grads = grads_of(tower, three, seed=1)
    tower.set_grad_checkpointing(False)
    torch.testing.assert_close(ckpt, plain, atol=ATOL, rtol=1e-4)
    assert ckpt_grads.keys() == plain_grads.keys() and plain_grads
    for n, g in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[n], g, atol=ATOL, rtol=1e-4, msg=f"{name}: gradient of {n}")
    tower.eval()

    params = dict(tower.named_parameters())
    assert tower.no_weight_decay() <= params.keys(), f"no_weight_decay names no parameter: {tower.no_weight_decay() - params.keys()}"

    # the state dict round-trips into a tower built from another seed
    set_seed(1)
    other = build_pretrainer(cfg).model.encoders[modality].eval()
    assert any(not torch.equal(p, params[n]) for n, p in other.named_parameters()), "another seed, other weights"
    other.load_state_dict(copy.deepcopy(tower.state_dict()), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(other(three).pooled, out3.pooled, atol=0, rtol=0)

    # export -> load: the same embeddings
    pretrainer.eval()
    path = write_export(pretrainer.state_dict(), cfg, tmp_path / "model.safetensors")
    loaded, transforms, _ = load(path)
    with torch.no_grad():
        want = pretrainer.model.encode_fields(modality, three).embedding
        got = loaded.model.encode_fields(modality, batches(demo_shards, modality, transforms[modality], 3, 1)[0]).embedding
    torch.testing.assert_close(got, want, atol=0, rtol=0)
