"""Audio data side (decode, mono, resample, crop/pad with lengths, bad input through the loader, demo
renderer) and ``audio/ast`` (shapes, masks, padding invariance, SpecAugment, checkpointing, ViT init,
one training run)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from shardkit import tiny_config, write_tar

from mmpt.contracts import DemoConcepts
from mmpt.data.loader import eval_loader
from mmpt.registry import ConfigError, encoders, modalities

RATE = 8000
TINY = {"sample_rate": RATE, "clip_seconds": 0.5, "n_fft": 256, "hop_length": 80, "n_mels": 16, "f_min": 50.0,
        "f_max": 4000.0, "patch_size": 8, "width": 32, "depth": 2, "heads": 2}


def audio_bytes(wave: np.ndarray, rate: int = RATE, fmt: str = "WAV", subtype: str = "FLOAT") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(seconds: float, freq: float = 440.0, rate: int = RATE) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def data(**kw) -> modalities.get:
    return modalities.get("audio").from_encoder_config(**{**TINY, **kw})


def tiny_ast(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return encoders.build("audio/ast", **{**TINY, **kw})


def concepts(n: int, seed: int = 0) -> DemoConcepts:
    rng = np.random.default_rng(seed)
    return DemoConcepts(shape=rng.integers(0, 8, n), color=rng.integers(0, 10, n), size=rng.integers(0, 3, n),
                        position=rng.integers(0, 5, n))


def test_decode_mixes_down_resamples_and_crops_or_pads() -> None:
    d = data()
    stereo = np.stack([tone(1.0, 300, 4000), -tone(1.0, 300, 4000) * 0.5], 1)  # (T, 2) at 4 kHz
    wave = d.decode(audio_bytes(stereo, 4000, "FLAC", "PCM_16"), "flac")
    assert wave.shape == (RATE,) and wave.dtype == torch.float32
    assert 0.12 < wave.abs().max() < 0.13  # mono = mean of the channels (0.5 and -0.25: 0.125)
    train = [d.transform(wave, True) for _ in range(5)]
    assert all(c.wave.shape == (4000,) and c.length == 4000 for c in train)
    assert any(not torch.equal(train[0].wave, c.wave) for c in train[1:])  # random crops differ
    ev = d.transform(wave, False)
    torch.testing.assert_close(ev.wave, wave[2000:6000])  # centred
    short = d.transform(wave[:1000], False)
    assert short.length == 1000 and short.wave[1000:].abs().sum() == 0
    fields = d.collate([short, None, ev])
    assert fields["wave"].shape == (3, 4000) and fields["lengths"].tolist() == [1000, 0, 4000]


def test_bad_audio_is_skipped_and_counted(tmp_path: Path) -> None:
    good = [(f"g{i}", {"wav": audio_bytes(tone(0.3)), "txt": b"a tone"}) for i in range(4)]
    nan = tone(0.3)
    nan[100] = np.nan
    bad = {
        "unreadable": {"flac": b"fLaC but not really"},
        "noframes": {"wav": audio_bytes(np.zeros(0, np.float32))},
        "nan": {"wav": audio_bytes(nan)},
        "toolong": {"wav": audio_bytes(tone(3.0))},
    }
    d = data(max_audio_seconds=2.0)
    why = {"unreadable": "Error opening|Format not recognised|unknown format", "noframes": "zero-length",
           "nan": "NaN", "toolong": "max_audio_seconds=2"}
    for key, members in bad.items():
        ext, payload = next(iter(members.items()))
        with pytest.raises(Exception, match=why[key]):
            d.decode(payload, ext)
    samples = good[:2] + [(k, {**m, "txt": b"a tone"}) for k, m in bad.items()] + \
        [("zerobyte", {"wav": b"", "txt": b"a tone"})] + good[2:]
    shard = write_tar(tmp_path / "bad.tar", samples)
    loader = eval_loader([shard], {"audio": d, "text": modalities.get("text")(context_length=8)}, 4, workers=0)
    loader.spec.required = ("audio", "text")
    keys = [k for b in loader for k in b.keys]
    assert sorted(keys) == ["g0", "g1", "g2", "g3"]
    assert loader.state.total_skips() == {"decode_error_audio": 3, "too_large_audio": 1, "empty_wav": 1}


def _patched_wav(wave: np.ndarray, rate: int, claimed_rate: int) -> bytes:
    """A valid WAV whose header claims another sample rate (bytes 24-27 of the RIFF header)."""
    raw = bytearray(audio_bytes(wave, rate, "WAV", "PCM_16"))
    raw[24:28] = claimed_rate.to_bytes(4, "little")
    return bytes(raw)


def test_near_equal_rates_resample_through_a_small_ratio(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 18: 16001 -> 16000 Hz built a kernel from the exact ratio (16001/16000: ~26 s, ~4 GB for one
    second). The ratio is now reduced to terms <= 1000 first; the tone stays where it was."""
    import torchaudio.functional as AF

    calls = []
    real = AF.resample
    monkeypatch.setattr(AF, "resample", lambda w, o, n, **kw: calls.append((o, n)) or real(w, o, n, **kw))
    d = data(sample_rate=16_000)
    wave = d.decode(audio_bytes(tone(1.0, 440, 16_001), 16_001, "WAV", "FLOAT"), "wav")
    assert calls and all(max(o, n) <= 1000 for o, n in calls)
    assert abs(wave.shape[0] - 16_000) <= 1
    spectrum = np.abs(np.fft.rfft(wave.numpy(), n=160_000))  # 0.1 Hz bins
    assert abs(spectrum.argmax() * 0.1 - 440) <= 0.1  # still the same tone (pitch moved by 6e-5 at most)
    assert 0.49 < float(wave[100:-100].abs().max()) < 0.51
    calls.clear()
    d.decode(audio_bytes(tone(0.2, 440, 44_100), 44_100), "wav")  # a common ratio stays exact: 441/160
    assert calls == [(441, 160)]


def test_absurd_sample_rate_is_its_own_reason(tmp_path: Path) -> None:
    d = data()
    bad = _patched_wav(tone(0.3), RATE, 1_000_000_007)
    with pytest.raises(Exception, match="sample rate 1000000007 Hz"):
        d.decode(bad, "wav")
    shard = write_tar(tmp_path / "rate.tar", [("ok", {"wav": audio_bytes(tone(0.3))}), ("rate", {"wav": bad})])
    loader = eval_loader([shard], {"audio": d}, 4, workers=0)
    loader.spec.required = ("audio",)
    assert [k for b in loader for k in b.keys] == ["ok"]
    assert loader.state.total_skips() == {"bad_sample_rate_audio": 1}


def test_header_claiming_hours_is_refused_before_reading() -> None:
    """A FLAC whose STREAMINFO claims 2^36 frames is refused from its header: nothing is read or allocated."""
    from mmpt.contracts import SampleTooLarge
    from mmpt.data.budget import decode_within_budget

    flac = bytearray(audio_bytes(tone(0.3), RATE, "FLAC", "PCM_16"))
    info = int.from_bytes(flac[18:26], "big") | ((1 << 36) - 1)  # total samples: the low 36 bits
    flac[18:26] = info.to_bytes(8, "big")
    d = data(max_audio_seconds=1e9)
    assert d.decoded_size(bytes(flac), "flac") > 2**36
    with pytest.raises(SampleTooLarge, match="from its header"):
        decode_within_budget(d, bytes(flac), "flac")


def test_raw_inputs_are_checked() -> None:
    d = data()
    fields = d.prepare([tone(0.2), torch.from_numpy(np.stack([tone(0.1)] * 2))])
    assert fields["lengths"].tolist() == [1600, 800]
    for bad, msg in [(np.zeros((2, 2, 10)), "expected"), (np.zeros(0), "zero-length"), (np.full(5, np.inf), "NaN"),
                     ("/no/such.wav", "No such file"), (b"RIFF junk", "encode\\('audio'")]:
        with pytest.raises(ConfigError, match=msg):
            d.prepare([bad])
    with pytest.raises(ConfigError, match="expected float"):
        d.fields_from_tensor(torch.zeros(2, 99_999))


def test_ast_contract() -> None:
    enc = tiny_ast()
    d = data()
    fields = d.collate([d.transform(torch.from_numpy(tone(t)), False) for t in (0.5, 0.2)] + [None])
    out = enc(fields)
    # 0.5 s at hop 80 -> 51 frames -> 7 time patches (padded to 56 frames) x 2 mel patches, + CLS
    assert enc.grid == (2, 7) and out.tokens.shape == (3, 15, 32) and out.pooled.shape == (3, 32)
    column = [True] * 3 + [False] * 4  # 0.2 s -> 20 frames with sound -> 3 time columns
    assert out.mask.tolist() == [[True] * 15, [True] + column * 2, [True] + [False] * 14]
    assert torch.isfinite(out.pooled).all()
    s = enc.stem(fields, with_targets=True)
    assert s.prefix == 1 and s.targets.shape == (3, 14, 64)
    assert s.positions[0].tolist() == list(range(15))
    spec, frames = enc.spectrogram(fields["wave"], fields["lengths"])
    assert frames.sum(1).tolist() == [50, 20, 0]  # centre before the end
    torch.testing.assert_close(s.targets[1, 0].view(8, 8), spec[1, :8, :8])  # mel-major patch layout
    assert (spec[1, :, 20:] == enc.silence).all() and (spec[2] == enc.silence).all()
    names = dict(enc.named_parameters())
    assert enc.no_weight_decay() <= set(names) and enc.no_weight_decay()
    assert not any("melspec" in k for k in enc.state_dict())  # the filterbank is config, not weights


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_padding_does_not_change_the_embedding(pool: str) -> None:
    enc = tiny_ast(pool=pool).eval()
    clip = torch.from_numpy(tone(0.23, 700)) + 0.1 * torch.randn(1840)
    short = clip[None]  # no padding at all: the STFT's edge must not reflect real samples back in
    long = torch.randn(1, 4000)  # junk past the length must not count as sound either
    long[0, :1840] = clip
    lengths = torch.tensor([1840])
    a = enc({"wave": short, "lengths": lengths})
    b = enc({"wave": long, "lengths": lengths})
    torch.testing.assert_close(a.pooled, b.pooled, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at most 4000"):
        enc({"wave": torch.zeros(1, 4001), "lengths": lengths})


def test_spec_augment_is_seeded_and_training_only() -> None:
    enc = tiny_ast(freq_mask=4, time_mask=6)
    fields = {"wave": torch.from_numpy(tone(0.5))[None].repeat(2, 1), "lengths": torch.tensor([4000, 4000])}
    torch.manual_seed(1)
    a = enc(fields).pooled
    torch.manual_seed(1)
    torch.testing.assert_close(enc(fields).pooled, a)
    assert not torch.allclose(a[0], a[1])  # each sample draws its own masks
    enc.eval()
    e = enc(fields).pooled
    torch.testing.assert_close(e[0], e[1])


def test_grad_checkpointing_same_result() -> None:
    enc = tiny_ast(freq_mask=4, time_mask=6)
    fields = data().collate([data().transform(torch.from_numpy(tone(t)), False) for t in (0.5, 0.3)])
    grads = []
    for ckpt in (False, True):
        enc.zero_grad()
        enc.set_grad_checkpointing(ckpt)
        torch.manual_seed(3)
        loss = enc(fields).pooled.square().sum()
        loss.backward()
        grads.append((loss.detach(), enc.pos_embed.grad.clone(), enc.patch_embed.weight.grad.clone()))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y)


def test_init_from_image_vit(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = encoders.build("image/vit", image_size=32, patch_size=8, width=32, depth=2, heads=2, stem="patch")
    bare = {k: v.contiguous() for k, v in vit.state_dict().items()}
    save_file(bare, tmp_path / "vit.safetensors")
    save_file({f"model.encoders.image.{k}": v for k, v in bare.items()} | {"model.heads.image.weight": torch.ones(2)},
              tmp_path / "export.safetensors")
    for name in ("vit.safetensors", "export.safetensors"):
        enc = tiny_ast(init_from=str(tmp_path / name), clip_seconds=0.3)  # 31 frames: 4 time patches
        torch.testing.assert_close(enc.patch_embed.weight, vit.patch_embed.weight.sum(1, keepdim=True))
        torch.testing.assert_close(enc.trunk.blocks[1].mlp[0].weight, vit.trunk.blocks[1].mlp[0].weight)
        torch.testing.assert_close(enc.pos_embed[:, 0], vit.pos_embed[:, 0])
        assert enc.pos_embed.shape == (1, 1 + 2 * 4, 32)
        # the 4x4 image grid resampled to 2 mel x 4 time rows: time columns keep the image's columns
        img = vit.pos_embed[0, 1:].view(4, 4, 32)
        torch.testing.assert_close(enc.pos_embed[0, 1:].view(2, 4, 32)[0], (img[0] + img[1]) / 2)
    conv = encoders.build("image/vit", image_size=32, patch_size=8, width=32, depth=2, heads=2, stem="conv")
    save_file({k: v.contiguous() for k, v in conv.state_dict().items()}, tmp_path / "conv.safetensors")
    with pytest.raises(ConfigError, match="stem 'patch'"):
        tiny_ast(init_from=str(tmp_path / "conv.safetensors"))
    with pytest.raises(ConfigError, match="width/depth/heads"):
        tiny_ast(init_from=str(tmp_path / "vit.safetensors"), depth=3)
    with pytest.raises(ConfigError, match="cannot read"):
        tiny_ast(init_from=str(tmp_path / "missing.safetensors"))


def test_render_demo_follows_the_concepts(tmp_path: Path) -> None:
    from mmpt.data.writer import ShardWriter

    d = modalities.get("audio")(sample_rate=16000, clip_seconds=1.0)
    c = concepts(40)
    members = d.render_demo(c, np.random.default_rng(5))
    assert members == d.render_demo(c, np.random.default_rng(5))  # deterministic by seed
    with ShardWriter(str(tmp_path / "demo-%03d.tar")) as w:
        for i, m in enumerate(members):
            w.write(f"s{i:03d}", {**m, "txt": "a sound"})
    loader = eval_loader(str(tmp_path / "demo-000.tar"), {"audio": d}, 40, workers=0)
    wave = next(iter(loader))["audio"]["wave"].numpy()
    assert wave.shape == (40, 16000)
    spectrum = np.abs(np.fft.rfft(wave, axis=1))
    peak = spectrum.argmax(1)  # 1 Hz bins: the base pitch, 4 semitones per colour step
    np.testing.assert_allclose(peak, 220 * 2 ** (4 * c.color / 12), rtol=0.03)
    envelope = np.abs(wave).reshape(40, 100, 160).max(2) > 0.05
    pulses = (np.diff(envelope.astype(int), axis=1) == 1).sum(1) + envelope[:, 0]
    assert (pulses == c.shape % 4 + 1).mean() > 0.9  # rhythm follows the shape
    sounding = [envelope[c.shape % 4 == k].mean() for k in range(4)]  # and so does the silent share
    assert all(a > b + 0.05 for a, b in zip(sounding, sounding[1:])), sounding
    rich = c.shape >= 4
    near = 2 * peak[:, None] + np.arange(-3, 4)  # the second harmonic, within the 1-Hz bins' rounding
    second = np.take_along_axis(spectrum, near, 1).max(1) / spectrum[np.arange(40), peak]
    assert (second[rich] > 0.3).all() and (second[~rich] < 0.05).all()  # timbre follows the shape


def test_train_steps_on_demo_audio(tmp_path: Path) -> None:
    from mmpt.config import load_config
    from mmpt.training.loop import train

    d = modalities.get("audio")(sample_rate=16000, clip_seconds=1.0)
    c = concepts(32)
    members = d.render_demo(c, np.random.default_rng(0))
    samples = [(f"a{i:03d}", {**m, "txt": f"a {c.color[i]} sound".encode()}) for i, m in enumerate(members)]
    shard = write_tar(tmp_path / "audio.tar", samples)
    raw = tiny_config([shard], tmp_path / "run", steps=3, checkpoint_every=3)
    raw["model"]["encoders"] = {"audio": {"name": "audio/ast", **TINY, "sample_rate": 16000, "clip_seconds": 1.0,
                                          "n_fft": 400, "hop_length": 160, "f_max": 8000.0, "depth": 1,
                                          "freq_mask": 2, "time_mask": 8},
                                "text": raw["model"]["encoders"]["text"]}
    raw["objectives"]["clip"]["pairs"] = [["audio", "text"]]
    raw["data"].update(required=["audio", "text"], workers=1)
    summary = train(load_config(raw))
    assert summary.steps == 3 and np.isfinite(summary.final_loss)


def test_export_loads_without_the_init_from_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mmpt.commands.export import load, write_export
    from mmpt.config import load_config
    from mmpt.pretrainer import build_pretrainer

    vit = encoders.build("image/vit", image_size=32, patch_size=8, width=32, depth=2, heads=2, stem="patch")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, tmp_path / "vit.safetensors")
    raw = tiny_config(["unused.tar"], tmp_path / "run")
    raw["model"]["encoders"] = {"audio": {"name": "audio/ast", **TINY, "init_from": str(tmp_path / "vit.safetensors")},
                                "text": raw["model"]["encoders"]["text"]}
    raw["objectives"]["clip"]["pairs"] = [["audio", "text"]]
    raw["data"]["required"] = ["audio", "text"]
    cfg = load_config(raw)
    path = write_export(build_pretrainer(cfg).state_dict(), cfg, tmp_path / "model.safetensors")
    (tmp_path / "vit.safetensors").unlink()  # the export holds every weight: the ViT file is not needed
    load(path)


def test_half_precision_cast_leaves_the_spectrogram_exact() -> None:
    enc = tiny_ast().eval()
    fields = data().collate([data().transform(torch.from_numpy(tone(0.4)), False)])
    want, _ = enc.spectrogram(fields["wave"], fields["lengths"])
    enc.bfloat16()  # what DeepSpeed's bf16 mode does to the whole module
    got, _ = enc.spectrogram(fields["wave"], fields["lengths"])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert torch.isfinite(enc(fields).pooled).all()
