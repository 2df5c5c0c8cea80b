"""The shard loader: splitting, determinism, resume position, and bad input counted by reason."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shardkit import color_sample, jpeg, write_color_shards, write_tar

from mmpt.data.loader import Loader, StreamSpec, eval_loader
from mmpt.data.shards import DataError, assign, expand_urls
from mmpt.registry import modalities


def specs(max_image_pixels: int = 64_000_000) -> dict:
    return {"image": modalities.get("image")(image_size=32, max_image_pixels=max_image_pixels),
            "text": modalities.get("text")(context_length=16)}


def stream(urls: list[str], **kw) -> StreamSpec:
    base = dict(sources=[(urls, 1.0)], modalities=specs(), batch_size=8, train=True, seed=1, workers=2,
                shuffle_buffer=20, required=("image", "text"))
    base.update(kw)
    return StreamSpec(**base)


def take_keys(loader: Loader, n: int) -> list[list[str]]:
    return [b.keys for b in itertools.islice(iter(loader), n)]


def test_expand_patterns(color_shards: list[str], tmp_path: Path) -> None:
    root = str(Path(color_shards[0]).parent)
    assert expand_urls(f"{root}/s-{{000..002}}.tar") == color_shards
    assert expand_urls(f"{root}/s-*.tar") == color_shards
    assert expand_urls(root) == color_shards
    assert expand_urls("::".join(color_shards)) == color_shards
    with pytest.raises(DataError, match="no shards match"):
        expand_urls(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(DataError, match="missing.tar"):
        expand_urls(str(tmp_path / "missing.tar"))


def test_pipe_url_reads_like_a_file(color_shards: list[str]) -> None:
    loader = eval_loader(f"pipe:cat {color_shards[0]}", specs(), 16, workers=0)
    assert sum(len(b) for b in loader) == 40


def test_assign_covers_every_shard_once() -> None:
    urls = [f"u{i}" for i in range(7)]
    got = sorted(u for w in range(3) for u in assign(urls, w, 3)[0])
    assert got == urls
    few, stride, offset = assign(urls[:2], 2, 4)
    assert few == urls[:2] and stride == 4 and offset == 2


def test_eval_loader_reads_every_sample_once(color_shards: list[str]) -> None:
    keys = [k for b in eval_loader(color_shards, specs(), 16, workers=2) for k in b.keys]
    assert len(keys) == 150 and len(set(keys)) == 150
    b = next(iter(eval_loader(color_shards, specs(), 16, workers=0, keep=("json",))))
    assert b["image"]["pixels"].dtype.is_floating_point is False and b["image"]["pixels"].shape == (16, 3, 32, 32)
    assert b["text"]["ids"].shape == (16, 16) and b.present["text"].all()
    assert b.meta["json"][0]["color"] in b.meta["json"][0]["captions"][0]


def test_ranks_get_equal_steps_and_disjoint_first_pass(color_shards: list[str]) -> None:
    # 3 uneven shards over 2 ranks x 2 workers: streams repeat, so both ranks can take as many
    # batches as asked; within the first pass no sample is read by two logical workers.
    per_rank = [take_keys(Loader(stream(color_shards, rank=r, world=2, shuffle_buffer=0)), 6) for r in range(2)]
    assert all(len(k) == 6 and all(len(b) == 8 for b in k) for k in per_rank)
    first = [k for batches in per_rank for b in batches[:2] for k in b]
    assert len(first) == len(set(first))


def test_stream_is_deterministic_and_seeded(color_shards: list[str]) -> None:
    a = take_keys(Loader(stream(color_shards)), 5)
    assert a == take_keys(Loader(stream(color_shards)), 5)
    assert a != take_keys(Loader(stream(color_shards, seed=2)), 5)


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_continues_the_same_sequence(color_shards: list[str], workers: int) -> None:
    full = Loader(stream(color_shards, workers=workers))
    it = iter(full)
    batches = [next(it) for _ in range(12)]
    probe = Loader(stream(color_shards, workers=workers))
    pit = iter(probe)
    for _ in range(5):
        next(pit)
    state = Loader.state_from_dict(probe.state_dict())
    resumed = Loader(stream(color_shards, workers=workers), state)
    rest = [b for b in itertools.islice(iter(resumed), 7)]
    assert [b.keys for b in rest] == [b.keys for b in batches[5:]]
    # augmentations are reseeded per sample, so pixels match too
    assert all((x["image"]["pixels"] == y["image"]["pixels"]).all() for x, y in zip(rest, batches[5:], strict=True))


def _png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (9, 9, 9)).save(buf, "PNG")
    return buf.getvalue()


def test_bad_input_is_skipped_and_counted(tmp_path: Path) -> None:
    good = [color_sample(f"g{i:03d}", "red") for i in range(10)]
    bad = [
        ("corrupt", {"jpg": b"\xff\xd8 not a jpeg", "txt": b"a red square"}),
        ("notext", {"jpg": jpeg((200, 0, 0))}),
        ("zerobyte", {"jpg": b"", "txt": b"a red square"}),
        ("bomb", {"png": _png(1200), "txt": b"a huge image"}),
        ("emptycap", {"jpg": jpeg((200, 0, 0)), "txt": b"   "}),
    ]
    shard = write_tar(tmp_path / "bad.tar", good[:5] + bad + good[5:])
    full = Path(write_tar(tmp_path / "full.tar", [color_sample(f"t{i:03d}", "blue") for i in range(20)]))
    cut = tmp_path / "truncated.tar"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2 + 100])  # mid-member, like most cuts
    sp = specs(max_image_pixels=1_000_000)
    loader = eval_loader([shard, str(cut)], sp, 4, workers=0)
    loader.spec.required = ("image", "text")
    keys = [k for b in loader for k in b.keys]
    skips = loader.state.total_skips()
    assert skips == {"decode_error_image": 1, "missing_text": 1, "empty_jpg": 1, "decompression_bomb": 1,
                     "decode_error_text": 1, "truncated_shard": 1}
    assert sorted(k for k in keys if k.startswith("g")) == [f"g{i:03d}" for i in range(10)]
    assert 0 < sum(k.startswith("t") for k in keys) < 20  # samples before the cut survive


def test_optional_modality_is_masked_not_dropped(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "mixed.tar", [color_sample("a", "red"), ("b", {"jpg": jpeg((0, 0, 200))})])
    loader = eval_loader([shard], specs(), 4, workers=0)
    b = next(iter(loader))
    assert b.keys == ["a", "b"] and b.present["text"].tolist() == [True, False]
    assert b.present["image"].all()


def test_weighted_sources_mix(tmp_path: Path) -> None:
    a = write_color_shards(tmp_path, counts=(50,), prefix="a")
    b = write_color_shards(tmp_path, counts=(50,), prefix="b")
    spec = stream(a, sources=[(a, 3.0), (b, 1.0)], workers=0, shuffle_buffer=0)
    keys = [k for ks in take_keys(Loader(spec), 25) for k in ks]
    share = np.mean([k.startswith("a") for k in keys])
    assert 0.65 < share < 0.85


def test_resampled_mode_draws_with_replacement(color_shards: list[str]) -> None:
    keys = [k for ks in take_keys(Loader(stream(color_shards, resampled=True, workers=0)), 40) for k in ks]
    assert len(keys) == 320 and len(set(keys)) < 320


def test_by_shard_batches_never_span_shards(color_shards: list[str]) -> None:
    done, urls = [], set()
    for b in eval_loader(color_shards, specs(), 16, workers=2, by_shard=True):
        assert len(set(b.meta["url"])) <= 1
        urls.update(b.meta["url"])
        done += b.meta["_loader"]["shards_done"]
    assert sorted(done) == sorted(color_shards) == sorted(urls)
