"""Helpers of the interop tests: tiny OpenCLIP architectures registered through OpenCLIP's own config
mechanism, random-init models saved to disk, and inputs."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from mmpt.encoders.open_clip import TINY_RESNET, TINY_VIT

TINY = {
    "tiny-vit": TINY_VIT,
    "tiny-rn": TINY_RESNET,
    "tiny-convnext": {"embed_dim": 32, "text_cfg": TINY_VIT["text_cfg"],
                      "vision_cfg": {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                                     "timm_pool": "", "timm_proj": "linear", "image_size": 32}},
    "tiny-sigmoid": {"embed_dim": 32, "init_logit_bias": -10, "vision_cfg": TINY_VIT["vision_cfg"],
                    "text_cfg": {**TINY_VIT["text_cfg"], "pool_type": "last", "no_causal_mask": True}},
}
TEXTS = ["a photo of a cat", "a red circle on the left", "dog", "Hello, World! it's 3 o'clock"]
_registered: list[Path] = []


def register_tiny() -> None:
    """Register the tiny configs with OpenCLIP (``open_clip.add_model_config``), once per process."""
    import open_clip

    if _registered:
        return
    folder = Path(tempfile.mkdtemp(prefix="mmpt-openclip-configs-"))
    for name, cfg in TINY.items():
        (folder / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    _registered.append(folder)


def openclip_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A random-init OpenCLIP model of a tiny architecture, in eval mode."""
    import open_clip

    register_tiny()
    torch.manual_seed(seed)
    return open_clip.create_model(name).eval()


def save_state(model: torch.nn.Module, path: Path) -> Path:
    """``.safetensors`` for that suffix, else an OpenCLIP training checkpoint (``state_dict`` under DDP's
    ``module.`` prefix, as ``open_clip_train`` writes it)."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({"epoch": 1, "name": "tiny", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return path


def normalized_images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """OpenCLIP-style inputs: pixels in [0, 1] normalised with OpenAI's mean and std."""
    from mmpt.encoders.image import OPENAI_MEAN, OPENAI_STD

    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(n, 3, size, size, generator=g)
    return (pixels - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
