"""DallETokenizer(weights="openai") and Hub repo ids: download, convert, cache, reuse offline.

A loopback HTTP server (127.0.0.1, a free port, stopped by each test) stands in for OpenAI's CDN
and serves tiny OpenAI-style pickles; ``CIM_DALL_E_URL`` points at it and ``HF_HOME`` at a
temporary folder. Nothing leaves the machine.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import huggingface_hub
import pytest
import torch

from cim_models.tokenizers import create_tokenizer
from cim_models.tokenizers.dall_e import DallETokenizer
from cim_models.tokenizers.dall_e_openai import (
    DallEConversionError,
    convert_openai_dall_e,
    openai_cache_folder,
)
from tests.test_convert_dall_e import ARCH, Pickles, make_openai_pickles


@pytest.fixture(scope="module")
def pickles(tmp_path_factory) -> Pickles:
    return make_openai_pickles(tmp_path_factory.mktemp("openai"))


@pytest.fixture(scope="module")
def sites(pickles, tmp_path_factory) -> dict[str, Path]:
    """Folders laid out like https://cdn.openai.com/dall-e/: genuine, trojaned, and empty."""
    root = tmp_path_factory.mktemp("sites")
    for site, encoder in (
        ("genuine", "encoder-legacy.pkl"),
        ("trojaned", "evil-system-legacy.pkl"),
    ):
        (root / site).mkdir()
        shutil.copy(pickles.path(encoder), root / site / "encoder.pkl")
        shutil.copy(pickles.path("decoder-legacy.pkl"), root / site / "decoder.pkl")
    (root / "empty").mkdir()
    return {site: root / site for site in ("genuine", "trojaned", "empty")}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.requests.append(self.path)
        super().do_GET()


@contextmanager
def serve(folder: Path, timeout_s: float = 60):
    """Serve ``folder`` on 127.0.0.1; yields (url, requested paths). Stops on exit or timeout."""
    requests: list[str] = []
    handler = functools.partial(
        type("Handler", (_QuietHandler,), {"requests": requests}), directory=str(folder)
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    stopper = threading.Timer(timeout_s, server.shutdown)  # a stuck test does not leave it running
    thread.start()
    stopper.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        stopper.cancel()
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    """A private HF_HOME, online unless a test says otherwise (huggingface_hub reads both at
    import, so the constants are patched)."""
    home = tmp_path / "hf-home"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return home


def test_openai_weights_are_fetched_converted_cached_and_reused_offline(
    pickles, sites, hf_home, monkeypatch
):
    with serve(sites["genuine"].parent) as (url, requests):
        monkeypatch.setenv("CIM_DALL_E_URL", f"{url}/genuine/")  # the others: no slash
        tokenizer = create_tokenizer("dall-e", weights="openai")
    assert sorted(requests) == ["/genuine/decoder.pkl", "/genuine/encoder.pkl"]
    assert tokenizer.architecture == ARCH  # read from the converted config.json
    assert torch.equal(tokenizer.encode(pickles.images), pickles.ref_ids)
    torch.testing.assert_close(
        tokenizer.decode(pickles.ref_ids), pickles.ref_decoded, rtol=0, atol=1e-5
    )

    cache = openai_cache_folder()
    assert cache == hf_home / "cim-models" / "dall-e"
    assert sorted(p.name for p in cache.iterdir()) == [
        "SHA256SUMS",
        "config.json",
        "decoder.safetensors",
        "encoder.safetensors",
    ]
    assert sorted(p.name for p in cache.parent.iterdir()) == ["dall-e"]  # no download leftovers
    config = json.loads((cache / "config.json").read_text())
    source = hashlib.sha256(pickles.path("encoder-legacy.pkl").read_bytes()).hexdigest()
    assert config["encoder"]["source_sha256"] == source
    assert config["encoder"]["source"].endswith("/genuine/encoder.pkl")
    assert "//encoder" not in config["encoder"]["source"]

    # The server is gone: the cache answers, online and offline.
    assert torch.equal(DallETokenizer(weights="openai").encode(pickles.images), pickles.ref_ids)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert torch.equal(DallETokenizer(weights="openai").encode(pickles.images), pickles.ref_ids)


def test_trojaned_download_is_refused_and_nothing_is_cached(pickles, sites, hf_home, monkeypatch):
    with serve(sites["trojaned"]) as (url, _):
        monkeypatch.setenv("CIM_DALL_E_URL", url)
        with pytest.raises(DallEConversionError) as error:
            DallETokenizer(weights="openai")
    message = str(error.value)
    assert f"{url}/encoder.pkl" in message and "system" in message and "allow-list" in message
    assert "Nothing was cached" in message
    assert not pickles.pwned.exists()
    assert not openai_cache_folder().exists()
    assert list(openai_cache_folder().parent.iterdir()) == []  # the temporary download is gone


def test_missing_files_name_the_url_and_the_manual_route(sites, hf_home, monkeypatch):
    with serve(sites["empty"]) as (url, _):
        monkeypatch.setenv("CIM_DALL_E_URL", url)
        with pytest.raises(OSError) as error:
            DallETokenizer(weights="openai")
    message = str(error.value)
    assert f"{url}/encoder.pkl" in message and "CIM_DALL_E_URL" in message
    manual = "cim-convert-dall-e --encoder encoder.pkl --decoder decoder.pkl --out"
    assert f"{manual} {openai_cache_folder()}" in message
    assert not openai_cache_folder().exists()


def test_offline_without_cache_says_where_the_files_go(hf_home, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("CIM_DALL_E_URL", "http://127.0.0.1:9/never-contacted")
    with pytest.raises(OSError, match="HF_HUB_OFFLINE") as error:
        DallETokenizer(weights="openai")
    assert str(openai_cache_folder()) in str(error.value)
    assert "cim-convert-dall-e" in str(error.value)


@pytest.fixture(scope="module")
def converted(pickles, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("converted")
    convert_openai_dall_e(
        pickles.path("encoder-zip.pkl"), pickles.path("decoder-zip.pkl"), folder, check_images=1
    )
    return folder


def test_hub_repo_id_of_a_converted_tokenizer_loads_from_the_cache(
    pickles, converted, hf_home, monkeypatch
):
    # What hf_hub_download leaves behind after an online download (huggingface_hub's cache layout).
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--me--dall-e-tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(converted, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    tokenizer = DallETokenizer(weights="me/dall-e-tiny")  # no architecture arguments needed
    assert tokenizer.architecture == ARCH
    assert torch.equal(tokenizer.encode(pickles.images), pickles.ref_ids)
    with pytest.raises(ValueError, match="n_init=64"):
        DallETokenizer(weights="me/dall-e-tiny", n_init=64)
    with pytest.raises(OSError, match="me/not-cached"):
        DallETokenizer(weights="me/not-cached")


def test_cim_model_with_openai_tokenizer_weights_saves_and_reloads_offline(
    pickles, converted, hf_home, monkeypatch, tmp_path
):
    # What `cim-pretrain --tokenizer_weights openai` builds, once the release is cached.
    from cim_models import CIMForPreTraining
    from tests.tiny import tiny_config

    shutil.copytree(converted, openai_cache_folder())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = tiny_config(tokenizer="dall-e", tokenizer_weights="openai", tokenizer_kwargs={})
    model = CIMForPreTraining(config)
    assert model.config.vocab_size == 512 and model.tokenizer.architecture == ARCH
    assert torch.equal(model.tokenizer.encode(pickles.images), pickles.ref_ids)

    model.save_pretrained(tmp_path / "run")
    reloaded = CIMForPreTraining.from_pretrained(tmp_path / "run")  # built on the meta device
    for name, weight in model.tokenizer.state_dict().items():
        assert torch.equal(reloaded.tokenizer.state_dict()[name], weight), name
    assert not any(p.requires_grad for p in reloaded.tokenizer.parameters())
