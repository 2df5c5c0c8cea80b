"""Search fixtures: one tiny five-modality model, its demo shards, embeddings and exact index per session."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import searchkit  # noqa: E402


@dataclass
class SearchEnv:
    root: Path
    model: Path
    shards: Path
    emb: Path
    index: Path


@pytest.fixture(scope="session")
def search_env(tmp_path_factory: pytest.TempPathFactory) -> SearchEnv:
    """A tiny untrained model with image, text, audio, point_cloud and protein towers; 48 demo samples in
    two shards embedded with every tower (caption and json kept); an exact index over all of them."""
    from mmpt.commands.embed import embed
    from mmpt.search.build import build_index

    root = tmp_path_factory.mktemp("search")
    model = searchkit.tiny_model(root / "model.safetensors")
    shards = searchkit.demo_shards(root / "data")
    for m in searchkit.TOWERS:
        embed(str(model), str(shards), m, str(root / "emb"), progress=False, metadata="caption,json")
    build_index([str(root / "emb")], str(root / "index"), progress=False)
    return SearchEnv(root, model, shards, root / "emb", root / "index")


@pytest.fixture(scope="session")
def client(search_env: SearchEnv):  # noqa: ANN201
    """A TestClient of the service (upload limit 256 KiB)."""
    from fastapi.testclient import TestClient

    from mmpt.search.app import open_service

    app = open_service(str(search_env.model), str(search_env.index), max_upload_bytes=256 << 10, k_max=50)
    with TestClient(app) as c:
        yield c
