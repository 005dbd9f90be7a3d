"""Shared fixtures: an isolated cache directory so tests never touch the user's checkpoints or ladders."""
import pytest
import torch


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.mktemp("bicascade-cache")
    monkeypatch.setenv("BICASCADE_CACHE", str(path))
    return path


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
