"""OpenCLIP-shaped API: code written for OpenCLIP runs unchanged against an mmpt export (OpenCLIP's README
snippet; a CLIP_benchmark-style zero-shot classifier), gives OpenCLIP's numbers for the same weights, works
for mmpt's own towers too, and fine-tunes (gradients reach both towers and the logit scale)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from interopkit import TEXTS, openclip_model, save_state

import mmpt
from mmpt.registry import ConfigError

ATOL = 1e-5
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    """(OpenCLIP tiny ViT, its mmpt import, a folder of three PNG images)."""
    from PIL import Image, ImageDraw

    from mmpt.interop.openclip import import_openclip

    root = tmp_path_factory.mktemp("api")
    oc = openclip_model("tiny-vit", seed=7)
    export = import_openclip("tiny-vit", save_state(oc, root / "oc.safetensors"), root / "model.safetensors")
    for i, (name, rgb) in enumerate(COLORS.items()):
        img = Image.new("RGB", (48 + 8 * i, 40), (250, 250, 250))
        ImageDraw.Draw(img).ellipse((8, 6, 36, 34), fill=rgb)
        img.save(root / f"{name}.png")
    return oc, export, root


def test_openclip_readme_snippet(imported: tuple) -> None:
    """OpenCLIP's README usage, with ``open_clip`` replaced by ``mmpt`` and the model path by an mmpt export."""
    oc, path, root = imported
    import warnings

    from PIL import Image
    with warnings.catch_warnings():  # the snippet's CUDA autocast is disabled (with a warning) on a CPU machine
        warnings.simplefilter("ignore")
        # --- OpenCLIP README, verbatim but for the import and the paths ---
        model, _, preprocess = mmpt.create_model_and_transforms(str(path))
        model.eval()  # model in train mode by default, impacts some models with BatchNorm or stochastic depth active
        tokenizer = mmpt.get_tokenizer(str(path))

        image = preprocess(Image.open(root / "red.png")).unsqueeze(0)
        text = tokenizer(["a diagram", "a dog", "a cat"])

        with torch.no_grad(), torch.autocast("cuda"):
            image_features = model.encode_image(image)
            text_features = model.encode_text(text)
            image_features /= image_features.norm(dim=-1, keepdim=True)
            text_features /= text_features.norm(dim=-1, keepdim=True)

            text_probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)

        print("Label probs:", text_probs)
        # --- end of snippet ---
    # the same weights in OpenCLIP, on the same inputs, give the same probabilities
    with torch.no_grad():
        want = (100.0 * oc.encode_image(image, normalize=True) @ oc.encode_text(text, normalize=True).T).softmax(-1)
    assert text_probs.shape == (1, 3)
    torch.testing.assert_close(text_probs, want, atol=ATOL, rtol=0)
    assert torch.equal(text, __import__("open_clip").get_tokenizer("tiny-vit")(["a diagram", "a dog", "a cat"]))


def zero_shot_classifier(model, tokenizer, classnames, templates, device):  # noqa: ANN001, ANN201
    """CLIP_benchmark's ``zero_shot_classifier`` (clip_benchmark/metrics/zeroshot_classification.py), as written
    for an OpenCLIP model."""
    with torch.no_grad():
        zeroshot_weights = []
        for classname in classnames:
            texts = [template.format(c=classname) for template in templates]
            texts = tokenizer(texts).to(device)  # tokenize
            class_embeddings = model.encode_text(texts)
            class_embedding = F.normalize(class_embeddings, dim=-1).mean(dim=0)
            class_embedding /= class_embedding.norm()
            zeroshot_weights.append(class_embedding)
        zeroshot_weights = torch.stack(zeroshot_weights, dim=1).to(device)
    return zeroshot_weights


def run_classification(model, classifier, dataloader, device):  # noqa: ANN001, ANN201
    """CLIP_benchmark's ``run_classification``: logits of every image against the classifier, and the targets."""
    pred, true = [], []
    with torch.no_grad():
        for images, target in dataloader:
            images = images.to(device)
            target = target.to(device)
            image_features = model.encode_image(images)
            image_features = F.normalize(image_features, dim=-1)
            logits = 100.0 * image_features @ classifier
            true.append(target.cpu())
            pred.append(logits.float().cpu())
    return torch.cat(pred), torch.cat(true)


class Images(torch.utils.data.Dataset):
    def __init__(self, root: Path, transform: object):
        from PIL import Image

        self.items = [(Image.open(root / f"{name}.png").convert("RGB"), i) for i, name in enumerate(COLORS)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.items[i]
        return self.transform(image), label


def test_clip_benchmark_style_zero_shot(imported: tuple) -> None:
    """Evaluation code written for an OpenCLIP model takes the mmpt model, tokenizer and transform unchanged,
    and the numbers are OpenCLIP's for the same weights and inputs (also through OpenCLIP's own transform)."""
    import open_clip

    oc, path, root = imported
    model, _, preprocess = mmpt.create_model_and_transforms(str(path))
    tokenizer = mmpt.get_tokenizer(str(path))
    templates = ["a photo of a {c} thing.", "a {c} circle."]
    _, _, oc_preprocess = open_clip.create_model_and_transforms("tiny-vit")
    for transform in (preprocess, oc_preprocess):
        loader = torch.utils.data.DataLoader(Images(root, transform), batch_size=2)
        logits, target = run_classification(model, zero_shot_classifier(model, tokenizer, list(COLORS), templates,
                                                                         "cpu"), loader, "cpu")
        want, _ = run_classification(oc, zero_shot_classifier(oc, open_clip.get_tokenizer("tiny-vit"), list(COLORS),
                                                              templates, "cpu"), loader, "cpu")
        assert logits.shape == (3, 3) and target.tolist() == [0, 1, 2]
        torch.testing.assert_close(logits, want, atol=1e-3, rtol=0)  # 100x the 1e-5 of the features


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An mmpt model with mmpt's own towers (ViT, causal text transformer, linear heads), random init."""
    from shardkit import tiny_config

    from mmpt.commands.export import write_export
    from mmpt.config import load_config
    from mmpt.pretrainer import build_pretrainer, set_seed

    cfg = load_config(tiny_config(["unused.tar"], Path("unused")))
    set_seed(0)
    return write_export(build_pretrainer(cfg).state_dict(), cfg, tmp_path_factory.mktemp("native") / "m.safetensors")


def test_api_on_mmpt_towers_matches_encode(native: Path, imported: tuple) -> None:
    """The API's answers are mmpt's own ``encode`` for a model trained in mmpt (padded ids pool at EOT)."""
    from PIL import Image

    root = imported[2]
    model, preprocess_train, preprocess_val = mmpt.create_model_and_transforms(str(native))
    loaded, _, _ = mmpt.load(str(native))
    tokenizer = mmpt.get_tokenizer(str(native))
    images = [Image.open(root / f"{name}.png") for name in COLORS]
    with torch.no_grad():
        got_image = model.encode_image(torch.stack([preprocess_val(i) for i in images]), normalize=True)
        got_text = model.encode_text(tokenizer(TEXTS), normalize=True)
    torch.testing.assert_close(got_image, loaded.encode("image", images), atol=ATOL, rtol=0)
    torch.testing.assert_close(got_text, loaded.encode("text", TEXTS), atol=ATOL, rtol=0)
    assert torch.equal(tokenizer("dog"), tokenizer(["dog"]))
    assert preprocess_train(images[0]).shape == preprocess_val(images[0]).shape == (3, 32, 32)
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with pytest.raises(ConfigError, match="context_length 77; this model's text tower takes 16"):
        tokenizer(TEXTS, context_length=77)


def test_encoders_fine_tune_with_grad(imported: tuple) -> None:
    """OpenCLIP's training step shape: ``model(image, text)`` -> features and scale, a CLIP loss, backward."""
    oc, path, root = imported
    model, preprocess_train, _ = mmpt.create_model_and_transforms(str(path))
    model.train()
    from PIL import Image

    images = torch.stack([preprocess_train(Image.open(root / f"{name}.png")) for name in COLORS])
    texts = mmpt.get_tokenizer(str(path))([f"a {name} circle" for name in COLORS])
    image_features, text_features, scale = model(images, texts)
    logits = scale * image_features @ text_features.T
    labels = torch.arange(3)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    towers = model.pretrainer.model.encoders
    for tower in ("image", "text"):
        grads = [p.grad for p in towers[tower].parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), tower
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0
