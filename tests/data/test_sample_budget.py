"""The per-sample byte budget is a contract of every registered data side (issue 18): each declares a limit,
its header estimate bounds what decoding holds, and a sample over the budget is skipped as
``too_large_<modality>`` by the loader, before decoding whenever the member's size or header tells."""

from __future__ import annotations

from pathlib import Path

import pytest
from shardkit import write_tar

from mmpt.config import load_config
from mmpt.contracts import MiB, SampleTooLarge
from mmpt.data.budget import decode_within_budget
from mmpt.data.loader import eval_loader
from mmpt.registry import ConfigError, modalities


@pytest.fixture(scope="module")
def demo_sample(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The members of one demo sample carrying every registered modality."""
    from mmpt.data.demo_shards import generate_demo
    from mmpt.data.shards import expand_urls, iter_samples

    info = generate_demo(tmp_path_factory.mktemp("budget"), train_samples=0, eval_samples=2, shard_size=2,
                         modalities=modalities.names(), absent_fraction=0.0, progress=False)
    return next(iter(iter_samples(expand_urls(info.eval_pattern)[0])))


def member(demo_sample: dict, name: str) -> tuple[object, str, bytes]:
    """The data side of ``name`` and its member of the demo sample."""
    spec = modalities.get(name)()
    ext = next(e for e in spec.extensions if e in demo_sample)
    return spec, ext, demo_sample[ext]


@pytest.mark.parametrize("name", modalities.names())
def test_every_data_side_declares_a_budget_its_header_estimate_respects(name: str, demo_sample: dict) -> None:
    spec, ext, data = member(demo_sample, name)
    assert isinstance(spec.max_sample_bytes, int) and 0 < spec.max_sample_bytes <= 256 * MiB, \
        f"{name}: max_sample_bytes must be a positive int of at most 256 MiB (one bad sample < 256 MB RSS)"
    held = spec.sample_size(spec.decode(data, ext))
    assert held > 0, f"{name}: sample_size of a decoded demo sample is 0; count what the value holds"
    claimed = spec.decoded_size(data, ext)
    assert claimed is None or claimed >= held, f"{name}: decoded_size {claimed} < {held} held after decoding"


@pytest.mark.parametrize("name", modalities.names())
def test_oversized_sample_is_skipped_and_counted_by_the_loader(name: str, demo_sample: dict, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    spec, ext, data = member(demo_sample, name)
    held = spec.sample_size(spec.decode(data, ext))
    stated = spec.decoded_size(data, ext)
    spec.max_sample_bytes = held - 1  # one byte short of what this very sample holds
    if stated is not None or len(data) > spec.max_sample_bytes:  # refused before decoding: decode never runs
        monkeypatch.setattr(spec, "decode", lambda *a: pytest.fail(f"{name}: decoded a sample over budget"))
    shard = write_tar(tmp_path / "big.tar", [("big", {ext: data})])
    loader = eval_loader([shard], {name: spec}, 2, workers=0)
    loader.spec.required = (name,)
    assert [k for b in loader for k in b.keys] == []
    with pytest.raises(SampleTooLarge, match=f"{name} {ext} member"):
        decode_within_budget(spec, data, ext)
    monkeypatch.undo()
    spec.max_sample_bytes = max(held, stated or 0, len(data))  # exactly enough: kept
    decode_within_budget(spec, data, ext)


def test_loader_counts_too_large_by_modality(demo_sample: dict, tmp_path: Path) -> None:
    spec, ext, data = member(demo_sample, "text")
    spec.max_sample_bytes = 4
    shard = write_tar(tmp_path / "a.tar", [("big", {ext: data}), ("ok", {ext: b"abc"})])
    loader = eval_loader([shard], {"text": spec}, 2, workers=0)
    loader.spec.required = ("text",)
    assert [k for b in loader for k in b.keys] == ["ok"]
    assert loader.state.total_skips() == {"too_large_text": 1}


def test_config_overrides_a_modality_budget_and_names_bad_keys() -> None:
    from mmpt.pretrainer import build_data_specs

    cfg = load_config("clip-tiny", ["data.max_sample_bytes.text=1000"])
    specs = build_data_specs(cfg)
    assert specs["text"].max_sample_bytes == 1000
    assert specs["image"].max_sample_bytes == 3 * 64_000_000  # the image side's own default: 3 x max_image_pixels
    pixels = build_data_specs(load_config("clip-tiny", ["model.encoders.image.max_image_pixels=1000"]))["image"]
    assert pixels.max_pixels == 1000 and pixels.max_sample_bytes == 3000  # a data-side key of the encoder section
    with pytest.raises(ConfigError, match="data.max_sample_bytes.txt: no encoder for 'txt'.*text"):
        load_config("clip-tiny", ["data.max_sample_bytes.txt=1000"])
    with pytest.raises(ConfigError, match="data.max_sample_bytes.text: expected a byte count >= 1"):
        load_config("clip-tiny", ["data.max_sample_bytes.text=0"])
