"""Fixtures of the model tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty torchvision and Hugging Face caches (TORCH_HOME = tmp_path / "torch") and no Hub downloads:
    nothing is found there unless a test puts it; the packaged Lite0 weights need neither."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
