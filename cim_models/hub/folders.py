"""Writing an output folder all at once, for ``cim-export`` and ``cim-convert-dall-e``: build it in
a staging folder beside the target, then rename, so a failed run leaves nothing half-written."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path


def check_output_folder(
    out: Path, overwrite: bool, error: type[Exception] = FileExistsError
) -> None:
    """Raise ``error`` unless ``out`` is missing, empty, or may be replaced."""
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} exists and is not a folder; choose a folder path.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise error(
            f"--out {out} is not empty; pass --overwrite to replace it, or choose another folder."
        )


def publish_folder(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` folder to ``out`` in one rename, replacing what it held."""
    if out.is_dir() and any(out.iterdir()):
        old = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
        out.rename(old)
        try:
            staging.rename(out)
        except BaseException:
            old.rename(out)
            raise
        shutil.rmtree(old)
        return
    if out.is_dir():
        out.rmdir()
    staging.rename(out)


def format_size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB"):
        if num_bytes < 1024:
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GB"
