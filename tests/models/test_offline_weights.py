"""Backbone weights resolve from local files only unless the user opts in (``--allow-download`` or
``CLBENCH_ALLOW_DOWNLOAD=1``): a missing tag is refused at once, with one line, and without a single network
connection attempt."""

from __future__ import annotations

import socket
from pathlib import Path

import open_clip
import pytest

from clbench.cli.app import main
from clbench.models import backbones


@pytest.fixture()
def no_network(monkeypatch, tmp_path):
    """Any attempt to open a connection or resolve a host is recorded and fails; caches point at empty folders."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network access attempted in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the refusal must not depend on the hub's offline mode
    monkeypatch.delenv(backbones.ALLOW_DOWNLOAD_ENV, raising=False)
    return attempts


def test_missing_tag_is_refused_without_touching_the_network(no_network, tmp_path, capsys):
    out = tmp_path / "results"
    code = main(["run", "--methods", "lora", "--backbone", "ViT-B-16", "--pretrained", "openai", "--out", str(out),
                 "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "ViT-B-16/openai" in err and "--allow-download" in err and "timm/vit_base_patch16_clip_224.openai" in err
    assert no_network == []
    assert not out.exists() or not any(out.rglob("*"))


def _hf_snapshot(root: Path, repo: str, filename: str) -> Path:
    """A file laid out as ``huggingface_hub`` caches it: refs/main names the snapshot holding the file."""
    folder = root / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    path = folder / "snapshots" / "0123abcd" / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    return path


def test_cached_tag_file_finds_hub_and_url_caches_locally(no_network, tmp_path):
    cfg = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    assert backbones.cached_tag_file(cfg) is None
    url_file = tmp_path / "home" / ".cache" / "clip" / "ViT-B-16.pt"
    url_file.parent.mkdir(parents=True)
    url_file.write_bytes(b"weights")
    assert backbones.cached_tag_file(cfg) == url_file
    hub_bin = _hf_snapshot(tmp_path / "hf", "timm/vit_base_patch16_clip_224.openai", "open_clip_pytorch_model.bin")
    assert backbones.cached_tag_file(cfg) == hub_bin  # the hub entry comes before the URL, as in open_clip
    safe = hub_bin.parent / "open_clip_model.safetensors"
    safe.write_bytes(b"weights")
    assert backbones.cached_tag_file(cfg) == safe  # and its safetensors twin before the pickle
    assert no_network == []


@pytest.mark.parametrize("how", ["flag", "env"])
def test_opting_in_hands_the_tag_to_open_clip(no_network, monkeypatch, how):
    calls = []

    def fake_create(name, pretrained=None, **kwargs):
        calls.append((name, pretrained))
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    if how == "env":
        monkeypatch.setenv(backbones.ALLOW_DOWNLOAD_ENV, "1")
    with pytest.raises(RuntimeError, match="stop here"):
        backbones.load_backbone("ViT-B-16", "openai", allow_download=how == "flag")
    assert calls == [("ViT-B-16", "openai")]


def test_hub_is_offline_while_building_without_downloads(no_network, monkeypatch):
    """Anything open_clip asks of the Hugging Face hub while a backbone is built (a tokenizer, a config) meets the
    hub's offline mode unless downloads are allowed; the switch is restored afterwards."""
    from huggingface_hub import constants

    seen = []

    def fake_tokenizer(name):
        seen.append(constants.HF_HUB_OFFLINE)
        raise RuntimeError("stop here")

    monkeypatch.setattr(open_clip, "get_tokenizer", fake_tokenizer)
    before = constants.HF_HUB_OFFLINE
    for allow in (False, True):
        with pytest.raises(RuntimeError, match="stop here"):
            backbones.load_backbone("ViT-B-16", "none", allow_download=allow)
    assert seen == [True, before] and before == constants.HF_HUB_OFFLINE
