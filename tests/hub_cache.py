"""Put a folder into a Hugging Face Hub cache by hand, as if it had been downloaded from a repo.

With ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing at the cache, ``hf_hub_download``,
``snapshot_download``, timm's ``pretrained=True`` / ``hf-hub:`` and transformers'
``from_pretrained`` all resolve the repo id from it (the layout of huggingface_hub 2.x):

    <cache>/models--<org>--<name>/blobs/<sha256 (LFS) | git blob sha1>
                                 /refs/main                      -> <commit>
                                 /snapshots/<commit>/<file>      -> ../../blobs/<etag>
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def populate_hf_cache(
    repo_id: str,
    folder: str | os.PathLike,
    cache_dir: str | os.PathLike,
    revision: str = "main",
    repo_type: str = "model",
) -> str:
    """Copy every file of ``folder`` into ``cache_dir`` under ``repo_id``; return the commit id."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    commit = hashlib.sha1(b"".join(p.read_bytes() for p in files) + revision.encode()).hexdigest()
    storage = Path(cache_dir) / "--".join([f"{repo_type}s", *repo_id.split("/")])
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    for path in files:
        data = path.read_bytes()
        if path.suffix in LFS_SUFFIXES:
            etag = hashlib.sha256(data).hexdigest()
        else:  # regular git files are addressed by their git blob hash
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = storage / "blobs" / etag
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs" / revision).write_text(commit)
    return commit
