"""`VideoTokenizer.from_pretrained` / `.save_pretrained`: the export format, a local folder or a
Hub repo id (huggingface_hub stubbed or hidden: no network)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from model import VideoTokenizer
from model.pretrained import load_config, load_pretrained, save_pretrained

from helpers import randomize_, tiny_tokenizer, video


@pytest.fixture
def trained(tmp_path):
    model = tiny_tokenizer(use_gan=True, layers=("residual", "compress_space", "compress_time"))
    randomize_(model)
    export = save_pretrained(model, tmp_path / "export", metadata={"step": 3})
    return model, export


def test_from_pretrained_gives_the_codes_of_load_pretrained(trained):
    model, export = trained
    x = video(frames=5)
    loaded = VideoTokenizer.from_pretrained(export)
    reference = load_pretrained(export)
    assert loaded.discr is None and loaded.perceptual is None and not loaded.training
    codes = loaded.tokenize(x)
    assert torch.equal(codes, reference.tokenize(x))
    assert torch.equal(codes, model.tokenize(x))
    assert VideoTokenizer.from_pretrained(str(export)).config == reference.config


def test_save_pretrained_round_trips_weights_and_config(trained, tmp_path):
    model, _ = trained
    path = model.save_pretrained(tmp_path / "again", metadata={"note": "x"})
    assert load_config(path) == model.config
    back = VideoTokenizer.from_pretrained(path, for_training=True)
    assert back.config == model.config
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("discr.")}
    state = back.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    assert back.discr is not None  # for_training: a fresh discriminator


def test_a_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such export folder"):
        VideoTokenizer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face Hub repo id"):
        VideoTokenizer.from_pretrained("runs/base/export/missing")
    with pytest.raises(ValueError, match="not a tokenizer export"):
        VideoTokenizer.from_pretrained(tmp_path)  # a folder, but no config.json


def test_a_repo_id_without_huggingface_hub_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    with pytest.raises(ImportError, match="pip install huggingface_hub") as info:
        VideoTokenizer.from_pretrained("someone/magvit2-tokenizer")
    assert "local folder" in str(info.value)


def fake_hub(monkeypatch, export, online: bool, cached: bool) -> list[dict]:
    """A huggingface_hub whose snapshot_download fails online (when not `online`) and serves
    `export` from its "cache" (when `cached`); returns the calls' arguments."""
    calls: list[dict] = []

    def snapshot_download(**kw):
        calls.append(kw)
        if kw["local_files_only"]:
            if not cached:
                raise FileNotFoundError("not in the cache")
            return str(export)
        if not online:
            raise ConnectionError("offline")
        return str(export)

    module = types.ModuleType("huggingface_hub")
    module.snapshot_download = snapshot_download
    monkeypatch.setitem(sys.modules, "huggingface_hub", module)
    return calls


def test_a_repo_id_is_fetched_with_snapshot_download(trained, monkeypatch):
    model, export = trained
    calls = fake_hub(monkeypatch, export, online=True, cached=False)
    loaded = VideoTokenizer.from_pretrained("someone/tok", revision="v1")
    x = video(frames=5)
    assert torch.equal(loaded.tokenize(x), model.tokenize(x))
    assert len(calls) == 1 and calls[0]["repo_id"] == "someone/tok"
    assert calls[0]["revision"] == "v1"
    assert set(calls[0]["allow_patterns"]) == {"config.json", "model.safetensors"}


def test_offline_falls_back_to_the_cache(trained, monkeypatch):
    _, export = trained
    calls = fake_hub(monkeypatch, export, online=False, cached=True)
    VideoTokenizer.from_pretrained("someone/tok")
    assert [c["local_files_only"] for c in calls] == [False, True]


def test_offline_and_not_cached_is_a_clear_error(trained, monkeypatch):
    _, export = trained
    fake_hub(monkeypatch, export, online=False, cached=False)
    with pytest.raises(OSError, match="not in the local cache.*local export folder"):
        VideoTokenizer.from_pretrained("someone/tok")
    calls = fake_hub(monkeypatch, export, online=False, cached=False)
    with pytest.raises(OSError, match="huggingface-cli download someone/tok"):
        VideoTokenizer.from_pretrained("someone/tok", local_files_only=True)
    assert len(calls) == 1
