"""Audio modality: the data side (decode FLAC/WAV/OGG/MP3 with soundfile, mono, resample, crop or pad
with a length per clip) and ``audio/ast``, a patch transformer over the log-mel spectrogram (AST / CLAP
style) that computes the spectrogram and SpecAugment on the batch.

Padding never counts as sound: samples past a clip's length are zeroed, spectrogram frames whose centre
lies past it are set to the value of silence, and patches made only of such frames are masked out of
attention and pooling, so a clip padded longer gives the same embedding.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmpt.contracts import DemoConcepts, ModalityData, SampleRejected, SampleTooLarge, StemOutput
from mmpt.nn.layers import Transformer
from mmpt.nn.token_encoder import PrefixTokenEncoder, check_token_drop
from mmpt.registry import ConfigError, encoders, modalities

# LAION-CLAP's front end: 48 kHz, 10-s clips, n_fft 1024, hop 480, 64 mels over 50-14,000 Hz.
CLAP_RATE, CLAP_SECONDS = 48_000, 10.0
LOG_FLOOR = 1e-6  # added to mel power before the log: digital silence maps to log(1e-6)
DEMO_RATE, DEMO_SECONDS = 16_000, 1.0
# Sample rates a file may state: telephone audio (8 kHz) down to 1 kHz, studio rates (768 kHz) up. A header
# claiming 1,000,000,007 Hz is a bad sample with its own skip reason, not something to resample.
RATE_RANGE = (1_000, 768_000)
# Resampling builds a polyphase kernel of size ~ new x orig from the reduced ratio new/orig: 16001 -> 16000
# Hz is ~16000^2 (seconds and gigabytes a clip). Ratios whose reduced terms exceed this are replaced by the
# nearest ratio within it: every common pair (44100/48000 = 147/160, 22050/16000 = 441/320) stays exact,
# and the others move by less than 1e-5 of their length (16001/16000 -> 1/1: 62 us a second).
MAX_RATIO_TERM = 1000


def resample_ratio(orig: int, new: int, most: int = MAX_RATIO_TERM) -> tuple[int, int]:
    """``(orig', new')``: the reduced ratio orig/new, or the closest one with both terms <= ``most``."""
    from fractions import Fraction

    exact = Fraction(orig, new)
    if max(exact.numerator, exact.denominator) <= most:
        return exact.numerator, exact.denominator
    if exact < 1:
        near = exact.limit_denominator(most)
        return max(near.numerator, 1), near.denominator
    near = (1 / exact).limit_denominator(most)
    return near.denominator, max(near.numerator, 1)


def _checked_wave(x: np.ndarray | Tensor, what: str) -> Tensor:
    """A (T,) or (C, T) / (T, C) array -> (T,) float32 mono tensor; raises on rank, emptiness, non-finite."""
    wave = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, Tensor) else x).float()
    if wave.numel() == 0:
        raise ValueError(f"{what}: zero-length audio")
    if wave.ndim == 2:  # channels on the shorter axis (soundfile gives (T, C); torch users pass (C, T))
        wave = wave.mean(1 if wave.shape[1] <= wave.shape[0] else 0)
    elif wave.ndim != 1:
        raise ValueError(f"{what}: audio of shape {tuple(wave.shape)}; expected (T,) or (channels, T)")
    if not torch.isfinite(wave).all():
        raise ValueError(f"{what}: audio with NaN or infinite samples")
    return wave


@dataclass
class Clip:
    """One transformed clip: the fixed-length wave and how many of its samples are real."""

    wave: Tensor
    length: int


@modalities.register("audio")
class AudioData(ModalityData):
    """Decode audio members to mono float waves at ``sample_rate``; crop (random in training, centred in
    eval) or zero-pad to ``clip_seconds``; collate to ``{"wave": (B, T) float, "lengths": (B,) long}``.
    """

    modality = "audio"
    extensions = ("flac", "wav", "ogg", "mp3")
    source_extensions = ("wav", "flac", "mp3", "ogg")  # stored as they are: the loader decodes each

    def __init__(self, sample_rate: int = CLAP_RATE, clip_seconds: float = CLAP_SECONDS,
                 max_audio_seconds: float = 600.0):
        self.sample_rate = int(sample_rate)
        self.clip_samples = int(round(clip_seconds * sample_rate))
        self.max_seconds = float(max_audio_seconds)

    def _checked_header(self, f: Any, ext: str) -> None:
        """Refuse a stated sample rate outside ``RATE_RANGE`` or a length over ``max_audio_seconds``, from the
        header alone: a header can claim anything, and reading what it claims is the cost."""
        if not RATE_RANGE[0] <= f.samplerate <= RATE_RANGE[1]:
            raise SampleRejected(f"{ext} audio: sample rate {f.samplerate} Hz outside {RATE_RANGE[0]}-{RATE_RANGE[1]} Hz",
                                 reason="bad_sample_rate")
        if f.frames > self.max_seconds * f.samplerate:
            raise SampleTooLarge(f"{ext} audio of {f.frames / f.samplerate:.0f} s exceeds "
                                 f"max_audio_seconds={self.max_seconds:g}")

    def decoded_size(self, data: bytes, ext: str) -> int | None:
        """float32 bytes of the stated frames x channels (what soundfile allocates) plus the mono wave at
        ``sample_rate``; the rate is checked here too, before any budget arithmetic trusts it."""
        import soundfile as sf

        try:
            f = sf.SoundFile(io.BytesIO(data))
        except Exception:  # unreadable: decode raises the error that says why
            return None
        with f:
            self._checked_header(f, ext)
            return 4 * f.frames * (f.channels + self.sample_rate / f.samplerate)

    def decode(self, data: bytes, ext: str) -> Tensor:
        """Bytes -> (T,) float32 mono at ``sample_rate``; refuses unreadable, empty, over-long or NaN audio
        and sample rates outside ``RATE_RANGE``."""
        import soundfile as sf

        with sf.SoundFile(io.BytesIO(data)) as f:
            self._checked_header(f, ext)
            rate, samples = f.samplerate, f.read(dtype="float32", always_2d=True)
        return self.resampled(_checked_wave(samples.mean(1), f"{ext} member"), rate)  # soundfile: (T, C)

    def resampled(self, wave: Tensor, rate: int) -> Tensor:
        """``wave`` at ``rate`` Hz -> at ``sample_rate``, through a ratio with small terms
        (:func:`resample_ratio`), so the cost never explodes on near-equal rates."""
        if rate == self.sample_rate:
            return wave
        import torchaudio.functional as AF

        return AF.resample(wave, *resample_ratio(rate, self.sample_rate))

    def transform(self, wave: Tensor, train: bool) -> Clip:
        """Crop to the clip length (random start in training, centred in eval) or keep and pad later."""
        n = self.clip_samples
        if wave.shape[0] <= n:
            return Clip(F.pad(wave, (0, n - wave.shape[0])), wave.shape[0])
        extra = wave.shape[0] - n
        start = random.randint(0, extra) if train else extra // 2  # the loader seeds `random` per sample
        return Clip(wave[start:start + n].clone(), n)

    def coerce(self, value: Any) -> Tensor:
        """A path, file bytes, or an array/tensor already at ``sample_rate`` -> (T,) mono wave."""
        try:
            if isinstance(value, str):
                with open(value, "rb") as f:
                    value = f.read()
            if isinstance(value, bytes):
                return self.decode(value, "audio")
            return _checked_wave(value, "input")
        except (OSError, TypeError, ValueError, RuntimeError) as exc:  # soundfile's errors are RuntimeErrors
            raise ConfigError(f"encode('audio', ...): {exc}") from None

    def collate(self, values: list[Clip | None]) -> dict[str, Tensor]:
        wave = torch.zeros(len(values), self.clip_samples)
        lengths = torch.zeros(len(values), dtype=torch.long)
        for i, clip in enumerate(values):
            if clip is not None:  # an absent sample stays silent with length 0: all its patches are masked
                wave[i], lengths[i] = clip.wave, clip.length
        return {"wave": wave, "lengths": lengths}

    def fields_from_tensor(self, x: Tensor) -> dict[str, Tensor]:
        """A (B, T) float batch of waves at ``sample_rate``, every sample real -> wave and lengths."""
        if x.ndim != 2 or not x.is_floating_point() or x.shape[1] > self.clip_samples:
            raise ConfigError(f"encode('audio', ...): audio tensor of shape {tuple(x.shape)} and dtype {x.dtype}; "
                              f"expected float (B, T) with T <= {self.clip_samples} samples at {self.sample_rate} Hz")
        return {"wave": x.float(), "lengths": torch.full((x.shape[0],), x.shape[1], dtype=torch.long)}

    def render_demo(self, concepts: DemoConcepts, rng: Any) -> list[dict[str, bytes]]:
        """FLAC clips (16 kHz, 1 s) whose sound follows the concept: colour -> base pitch (10 notes four
        semitones apart), shape -> rhythm (1-4 pulses, shorter as they multiply) and timbre (pure or with
        harmonics), size -> loudness; pitch jitter, onset shift and a noise floor vary per sample.
        Position is not heard."""
        import soundfile as sf

        waves = np.concatenate([_demo_waves(concepts, rng, lo, min(lo + 256, len(concepts)))
                                for lo in range(0, len(concepts), 256)])
        out = []
        for wave in waves:
            buf = io.BytesIO()
            sf.write(buf, wave, DEMO_RATE, format="FLAC", subtype="PCM_16")
            out.append({"flac": buf.getvalue()})
        return out


def _demo_waves(c: DemoConcepts, rng: Any, lo: int, hi: int) -> np.ndarray:
    """(hi - lo, T) float32 waves of concepts lo..hi (a chunk bounds the (N, harmonics, T) temporary)."""
    n, length = hi - lo, int(DEMO_RATE * DEMO_SECONDS)
    color, shape, size = (np.asarray(a)[lo:hi] for a in (c.color, c.shape, c.size))
    t = np.arange(length) / DEMO_RATE
    f0 = 220.0 * 2 ** (4 * color / 12) * rng.uniform(0.985, 1.015, n)  # within +-1/4 semitone of the note
    harmonics = np.arange(1, 5)
    rich = (shape // 4).astype(bool)
    weights = np.where(rich[:, None], 1.0 / harmonics, harmonics == 1)  # (n, H): pure sine or 1/h series
    phase = 2 * np.pi * (f0[:, None] * t + rng.uniform(0, 1, (n, 1)))
    tone = np.einsum("nh,nht->nt", weights, np.sin(harmonics[None, :, None] * phase[:, None, :]))
    tone /= weights.sum(1, keepdims=True)
    pulses = shape % 4 + 1
    # more pulses, shorter notes: the silent share of the clip then tells the rhythm even to mean pooling
    # (a tiny AST classifies shape at 0.92 vs 0.73 with one duty cycle for all, same 100 steps)
    duty = np.array([0.9, 0.65, 0.45, 0.3])[pulses - 1][:, None]
    onset = rng.uniform(0, 0.05, (n, 1))
    frac = ((t - onset) * pulses[:, None] / DEMO_SECONDS) % 1.0  # position inside the current pulse
    envelope = np.where((t >= onset) & (frac < duty), np.sin(np.pi * frac / duty) ** 2, 0.0)
    loudness = np.array([0.2, 0.45, 0.9])[np.asarray(size)] * rng.uniform(0.9, 1.1, n)
    noise = rng.normal(0, 0.005, (n, length))
    return (loudness[:, None] * envelope * tone + noise).clip(-1, 1).astype(np.float32)


def hf_audio_inputs(extractor: Any, wave: Tensor, lengths: Tensor, sample_rate: int) -> dict[str, Tensor]:
    """Keyword arguments of a Hugging Face audio model (audio/hf) from a collated batch: the folder's feature
    extractor (normalisation, or AST's filterbank) run on each clip's real samples, padding left to it."""
    clips = [w[: int(n)].detach().float().cpu().numpy() for w, n in zip(wave, lengths)]
    out = extractor(clips, sampling_rate=sample_rate, padding=True, return_tensors="pt")
    return {k: v.to(wave.device) for k, v in out.items()}


def _pair(x: int | list | tuple) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


@encoders.register("audio/ast")
class AudioSpectrogramTransformer(PrefixTokenEncoder):
    """AST / CLAP-style patch transformer over the log-mel spectrogram, computed on the batch.

    Args:
        sample_rate: audio rate in Hz (the data side resamples to it). clip_seconds: clip length (data side
        crops or pads to it). n_fft: STFT size. hop_length: STFT hop in samples. win_length: STFT window
        (None: n_fft). n_mels: mel bins. f_min: lowest mel frequency in Hz. f_max: highest mel frequency in Hz.
        spec_mean: subtracted from ``log(mel + 1e-6)``. spec_std: the log-mel is then divided by it.
        patch_size: (mel bins, frames) of a patch, or one int for square patches. width: token width.
        depth: transformer blocks. heads: attention heads. mlp_ratio: MLP hidden size over width.
        pool: 'mean' (over patches with sound) or 'cls'. freq_mask: SpecAugment's widest frequency mask in
        mel bins (0: none). time_mask: SpecAugment's widest time mask in frames (0: none). n_masks: masks
        of each kind per clip in training. init_from: a safetensors file of an ``image/vit`` (patch stem)
        state dict or an mmpt export holding one: trunk copied, patch embedding summed over colour
        channels, position embedding interpolated to the spectrogram grid (AST's ImageNet
        initialisation). max_audio_seconds: longest decoded file the data side accepts.
        train_token_drop: share of patch tokens dropped at random in training forwards (FLIP; 0: none).

    Masked modelling (``masked_tokens``, Audio-MAE): targets are the normalised log-mel patches (before
    SpecAugment), compared by mean squared error; patches made only of padding count in no loss.
    """

    modality = "audio"
    tiny_configs = ({"sample_rate": 8000, "clip_seconds": 0.5, "n_fft": 256, "hop_length": 80, "n_mels": 16,
                     "f_max": 4000.0, "patch_size": 8, "width": 32, "depth": 2, "heads": 2},)
    weight_sources = {"init_from": ""}

    def __init__(self, sample_rate: int = CLAP_RATE, clip_seconds: float = CLAP_SECONDS, n_fft: int = 1024,
                 hop_length: int = 480, win_length: int | None = None, n_mels: int = 64, f_min: float = 50.0,
                 f_max: float = 14_000.0, spec_mean: float = -4.0, spec_std: float = 4.0,
                 patch_size: int | list = 16, width: int = 768, depth: int = 12, heads: int = 12,
                 mlp_ratio: float = 4.0, pool: str = "mean", freq_mask: int = 0, time_mask: int = 0,
                 n_masks: int = 2, init_from: str = "", max_audio_seconds: float = 600.0,
                 train_token_drop: float = 0.0):
        super().__init__()
        import torchaudio

        self.patch = _pair(patch_size)
        if n_mels % self.patch[0]:
            raise ValueError(f"n_mels {n_mels} is not a multiple of the patch's mel size {self.patch[0]}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        self.width, self.pool, self.n_fft, self.hop = width, pool, n_fft, hop_length
        self.train_token_drop = check_token_drop(train_token_drop)
        self.clip_samples = int(round(clip_seconds * sample_rate))
        self.spec_mean, self.spec_std = float(spec_mean), float(spec_std)
        self.silence = (math.log(LOG_FLOOR) - self.spec_mean) / self.spec_std
        self.augment = (int(freq_mask), int(time_mask), int(n_masks))
        # Outside the module tree (no state dict entry, no cast): the window and filterbank follow from the
        # config, and a module-wide bf16 cast (DeepSpeed's bf16 mode) rounding them moved log-mels by up to 1.6.
        self.__dict__["melspec"] = torchaudio.transforms.MelSpectrogram(
            sample_rate, n_fft=n_fft, win_length=win_length, hop_length=hop_length, f_min=f_min, f_max=f_max,
            n_mels=n_mels, power=2.0)
        self.grid = (n_mels // self.patch[0], math.ceil((self.clip_samples // hop_length + 1) / self.patch[1]))
        self.patch_embed = nn.Conv2d(1, width, self.patch, self.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.grid[0] * self.grid[1], width) * 0.02)
        self.norm_pre = nn.LayerNorm(width)
        self.trunk = Transformer(width, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        if init_from:
            self.load_image_vit(init_from)

    def spectrogram(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Waves (B, T) and real lengths (B,) -> normalised log-mel (B, M, F) in fp32 and frame mask (B, F)."""
        b, n = wave.shape
        if n > self.clip_samples:
            raise ValueError(f"audio/ast: {n} samples per clip; this encoder takes at most {self.clip_samples}")
        real = torch.arange(n, device=wave.device) < lengths[:, None]
        # zeros past the end instead of the STFT's reflection, so a frame near the end sees the same
        # samples however long the padding is
        wave = F.pad(wave.float() * real, (0, self.n_fft // 2))
        frames = n // self.hop + 1
        with torch.autocast(wave.device.type, enabled=False):
            mel = self.melspec.to(wave.device)(wave)[..., :frames]
        spec = (torch.log(mel + LOG_FLOOR) - self.spec_mean) / self.spec_std
        frame_mask = torch.arange(frames, device=wave.device) * self.hop < lengths[:, None]
        return spec.masked_fill(~frame_mask[:, None, :], self.silence), frame_mask

    def spec_augment(self, spec: Tensor) -> Tensor:
        """SpecAugment: per-sample frequency and time masks (set to the mean, 0), drawn from torch's RNG."""
        import torchaudio.functional as AF

        fmask, tmask, count = self.augment
        x = spec[:, None]
        for _ in range(count):
            if fmask:
                x = AF.mask_along_axis_iid(x, fmask, 0.0, 2)
            if tmask:
                x = AF.mask_along_axis_iid(x, tmask, 0.0, 3)
        return x[:, 0]

    def patchify(self, spec: Tensor) -> Tensor:
        """(B, M, F) with F a multiple of the patch's frames -> (B, nf * nt, pf * pt), mel-major order."""
        b, m, f = spec.shape
        (pf, pt), nf, nt = self.patch, m // self.patch[0], f // self.patch[1]
        return spec.reshape(b, nf, pf, nt, pt).permute(0, 1, 3, 2, 4).reshape(b, nf * nt, pf * pt)

    def stem(self, inputs: dict[str, Tensor], with_targets: bool = False) -> StemOutput:
        """Waves -> CLS + patch tokens, their positions in the full (mel, time) grid and the token mask."""
        spec, frame_mask = self.spectrogram(inputs["wave"], inputs["lengths"])
        nt = math.ceil(spec.shape[-1] / self.patch[1])
        pad = nt * self.patch[1] - spec.shape[-1]
        spec = F.pad(spec, (0, pad), value=self.silence)
        frame_mask = F.pad(frame_mask, (0, pad), value=False)
        targets = self.patchify(spec) if with_targets else None
        if self.training and any(self.augment[:2]):
            spec = self.spec_augment(spec)
        b, nf = spec.shape[0], self.grid[0]
        x = self.patch_embed(spec[:, None].to(self.pos_embed.dtype)).permute(0, 2, 3, 1)  # (B, nf, nt, D)
        grid_pos = self.pos_embed[:, 1:].view(1, nf, self.grid[1], -1)[:, :, :nt]
        tokens = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1),
                            (x + grid_pos).flatten(1, 2)], 1)
        cells = torch.arange(nf, device=x.device)[:, None] * self.grid[1] + torch.arange(nt, device=x.device)
        positions = torch.cat([torch.zeros(1, dtype=torch.long, device=x.device), 1 + cells.flatten()]).expand(b, -1)
        sound = frame_mask.view(b, nt, self.patch[1]).any(-1)  # (B, nt): a time column with any real frame
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=x.device),
                          sound[:, None, :].expand(b, nf, nt).flatten(1)], 1)
        coords = torch.stack(torch.meshgrid((torch.arange(nf, device=x.device) + 0.5) / nf,
                                            (torch.arange(nt, device=x.device) + 0.5) / self.grid[1],
                                            indexing="ij"), -1).flatten(0, 1).expand(b, -1, -1)
        return StemOutput(tokens=tokens, positions=positions, targets=targets, prefix=1, coords=coords, mask=mask)

    def num_patches(self, inputs: dict[str, Tensor]) -> int:
        frames = inputs["wave"].shape[1] // self.hop + 1
        return self.grid[0] * math.ceil(frames / self.patch[1])

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}

    def load_image_vit(self, path: str) -> None:
        """Initialise from an ``image/vit`` state dict (or an mmpt export's image tower) the way AST does."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (OSError, SafetensorError) as exc:
            raise ConfigError(f"audio/ast init_from={path!r}: cannot read it as safetensors ({exc})") from None
        prefix = "model.encoders.image."
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        w = state.get("patch_embed.weight")
        if w is None or w.ndim != 4 or tuple(w.shape[2:]) != self.patch or "pos_embed" not in state:
            got = "no patch_embed.weight/pos_embed" if w is None or "pos_embed" not in state else tuple(w.shape)
            raise ConfigError(f"audio/ast init_from={path!r}: expected an image/vit with stem 'patch' and "
                              f"patch size {self.patch}, got {got}")
        state["patch_embed.weight"] = w.sum(1, keepdim=True)  # one input channel: the spectrogram
        state["pos_embed"] = self._interpolated_pos(state["pos_embed"])
        state = {k: v for k, v in state.items() if not k.startswith("norm_in.")}
        own = self.state_dict()
        bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
               if k in own and v.shape != own[k].shape]
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if bad or missing or extra:
            raise ConfigError(f"audio/ast init_from={path!r}: does not fit this encoder (width/depth/heads): "
                              f"shapes {bad[:3]}, missing {missing[:3]}, unexpected {extra[:3]}")
        with torch.no_grad():
            self.load_state_dict(state)

    def _interpolated_pos(self, pos: Tensor) -> Tensor:
        """(1, 1 + g*g, D) image position embedding -> (1, 1 + nf*nt, D) over the spectrogram grid."""
        g = math.isqrt(pos.shape[1] - 1)
        if g * g != pos.shape[1] - 1:
            raise ConfigError(f"audio/ast init_from: pos_embed of {pos.shape[1]} tokens is not CLS + a square grid")
        grid = pos[:, 1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=self.grid, mode="bilinear", align_corners=False)
        return torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)], 1)
