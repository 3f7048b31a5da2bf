"""Test-wide settings: offline Hub, private caches, few threads, and the tiny CIM configs."""

import atexit
import os
import shutil
import tempfile

# huggingface_hub reads these at import time, so they are set before timm or transformers load.
_CACHE = tempfile.mkdtemp(prefix="cim-tests-hf-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", _CACHE)
os.environ.setdefault("HF_HUB_CACHE", os.path.join(_CACHE, "hub"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def make_tiny_model():
    from tests.tiny import tiny_model

    return tiny_model
