"""Masked-token reconstruction for continuous modalities (MAE, Audio-MAE, Point-MAE): one objective, no
modality branches.

The objective draws which patch tokens stay visible (one ``argsort`` of uniform noise for the batch),
runs the tower's own ``forward`` with a ``keep`` field (a module call, so ZeRO-3 gathers the tower's
parameters), and gets back the visible tokens after the trunk plus, in ``extras``, every patch's target,
coordinates and padding mask. A light transformer decoder puts a mask token at each dropped patch, adds
positions made from the coordinates the encoder gives (grid cell centres, point-group centres), and
predicts every patch's target; the encoder supplies the distance (``reconstruction_loss``: normalised-pixel
MSE, spectrogram-patch MSE, L2 Chamfer). The loss is the mean over dropped real patches of the batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmpt.data.batch import Batch
from mmpt.encoders.base import EncoderOutput, PrefixTokenEncoder, keep_count, random_keep
from mmpt.layers import Transformer, init_weights
from mmpt.objectives.base import Objective, ObjectiveOutput
from mmpt.registry import ConfigError, objectives


def fourier_positions(coords: Tensor, dim: int, max_freq: float = 64.0) -> Tensor:
    """(B, N, C) coordinates in [0, 1] -> (B, N, dim) sin/cos features at frequencies pi .. pi * max_freq
    (geometric), zero-padded to ``dim``: one parameter-free embedding for any grid or point layout."""
    c = coords.shape[-1]
    per = max(1, dim // (2 * c))
    freqs = math.pi * max_freq ** (torch.arange(per, device=coords.device, dtype=torch.float32) / max(1, per - 1))
    angles = (coords.float().unsqueeze(-1) * freqs).flatten(-2)  # (B, N, C * per)
    feats = torch.cat([angles.sin(), angles.cos()], -1)[..., :dim]
    return nn.functional.pad(feats, (0, dim - feats.shape[-1]))


def masked_mean_loss(per_token: Tensor, weight: Tensor) -> Tensor:
    """Mean of (B, N) ``per_token`` over the entries where ``weight`` (B, N) is 1, over the whole batch."""
    return (per_token * weight).sum() / weight.sum().clamp_min(1)


class MaskedDecoder(nn.Module):
    """MAE's light decoder: project visible tokens, scatter them among mask tokens, add positions, a few
    transformer blocks, and a linear prediction of each patch's target."""

    def __init__(self, encoder_width: int, target_dim: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        self.width = width
        self.embed = nn.Linear(encoder_width, width)
        self.mask_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.pos = nn.Linear(width, width)
        self.blocks = Transformer(width, depth, heads, mlp_ratio)
        self.norm = nn.LayerNorm(width)
        self.pred = nn.Linear(width, target_dim)
        for m in (self.embed, self.pos, self.norm, self.pred):
            m.apply(init_weights)

    def forward(self, visible: Tensor, keep: Tensor, coords: Tensor, prefix: int,
                patch_mask: Tensor | None = None) -> Tensor:
        """Visible tokens (B, prefix + K, D), their patch indices (B, K), every patch's coordinates (B, N, C)
        -> predictions (B, N, target_dim)."""
        b, n = coords.shape[:2]
        x = self.embed(visible)
        slots = self.mask_token.to(x.dtype).expand(b, n, -1)
        slots = slots.scatter(1, keep.unsqueeze(-1).expand(-1, -1, self.width), x[:, prefix:])
        slots = slots + self.pos(fourier_positions(coords, self.width).to(x.dtype))
        mask = None
        if patch_mask is not None:
            mask = torch.cat([torch.ones(b, prefix, dtype=torch.bool, device=x.device), patch_mask], 1)
        out = self.norm(self.blocks(torch.cat([x[:, :prefix], slots], 1), mask))
        return self.pred(out[:, prefix:])


@objectives.register("masked_tokens")
class MaskedTokens(Objective):
    """Masked-token reconstruction (MAE, Audio-MAE, Point-MAE) for a tower with a stem/trunk split.

    Args:
        modality: the modality whose tower reconstructs its dropped patch tokens. encoder_width: that
        tower's token width (its ``width``). target_dim: size of one patch's target: patch*patch*channels
        for image/vit, mel*frames of a patch for audio/ast, group_size*3 for point_cloud/point_transformer
        (a mismatch is reported in one line naming the right value). mask_ratio: share of patch tokens
        dropped per sample (0: the encoder's default, 0.75 for image and audio, 0.6 for point groups).
        decoder_width: the decoder's token width. decoder_depth: decoder transformer blocks. decoder_heads:
        decoder attention heads. decoder_mlp_ratio: decoder MLP hidden size over its width.
    """

    uses_model = True
    tiny_configs = ({"modality": "image", "encoder_width": 32, "target_dim": 192, "decoder_width": 16,
                     "decoder_depth": 1, "decoder_heads": 2},)

    def __init__(self, modality: str = "image", encoder_width: int = 768, target_dim: int = 768,
                 mask_ratio: float = 0.0, decoder_width: int = 256, decoder_depth: int = 2, decoder_heads: int = 8,
                 decoder_mlp_ratio: float = 4.0):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ConfigError(f"masked_tokens.mask_ratio: expected a ratio in [0, 1) (0: the encoder's default), "
                              f"got {mask_ratio}")
        # it encodes its own (masked) inputs and reads none of the pretrainer's outputs
        self.modalities = ()
        self.modality, self.mask_ratio = modality, float(mask_ratio)
        self.encoder_width, self.target_dim = encoder_width, target_dim
        self.decoder = MaskedDecoder(encoder_width, target_dim, decoder_width, decoder_depth, decoder_heads,
                                     decoder_mlp_ratio)

    def no_weight_decay(self) -> set[str]:
        """The mask token, as MAE."""
        return {"decoder.mask_token"}

    def forward(self, outputs: dict[str, EncoderOutput], batch: Batch, model: nn.Module) -> ObjectiveOutput:
        tower = self._tower(model)
        fields = batch.fields[self.modality]
        n = tower.num_patches(fields)
        b = batch.present[self.modality].shape[0]
        ratio = self.mask_ratio or tower.mask_ratio_default
        keep = random_keep(b, n, keep_count(n, ratio), batch.present[self.modality].device)
        out = tower({**fields, "keep": keep})  # a module call: ZeRO-3 gathers the tower's parameters
        extras = out.extras
        target = tower.reconstruction_target(extras["targets"])
        self._check_sizes(out.tokens.shape[-1], target.shape[-1])
        pred = self.decoder(out.tokens, keep, extras["coords"], out.tokens.shape[1] - keep.shape[1],
                            extras["patch_mask"])
        dropped = torch.ones(b, n, device=keep.device).scatter(1, keep, 0.0)
        weight = dropped * batch.present[self.modality].float().unsqueeze(1)
        if extras["patch_mask"] is not None:
            weight = weight * extras["patch_mask"].float()
        loss = masked_mean_loss(tower.reconstruction_loss(pred, target), weight)
        with torch.no_grad():
            # the trivial predictor: the mean target of the batch's dropped patches, for every patch
            mean = (target.float() * weight.unsqueeze(-1)).sum((0, 1)) / weight.sum().clamp_min(1)
            baseline = masked_mean_loss(tower.reconstruction_loss(mean.expand_as(target), target), weight)
        realised = torch.tensor(1.0 - keep.shape[1] / n)
        return ObjectiveOutput(loss=loss, metrics={"mean_baseline": baseline, "mask_ratio": realised})

    def _tower(self, model: nn.Module) -> PrefixTokenEncoder:
        tower = model.encoders[self.modality] if self.modality in model.encoders else None
        if not isinstance(tower, PrefixTokenEncoder):
            have = type(tower).__name__ if tower is not None else "no encoder"
            raise ConfigError(f"objectives.masked_tokens.modality: {self.modality!r} has {have}; masked_tokens needs "
                              "a tower with a stem/trunk split (image/vit, audio/ast, point_cloud/point_transformer)")
        return tower

    def _check_sizes(self, width: int, target_dim: int) -> None:
        for key, want, got in (("encoder_width", self.encoder_width, width), ("target_dim", self.target_dim, target_dim)):
            if want != got:
                raise ConfigError(f"objectives.masked_tokens.{key}: {want}, but the {self.modality} tower gives {got}; "
                                  f"set {key}: {got}")
