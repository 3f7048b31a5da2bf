"""``cim-convert-dall-e``: OpenAI's DALL-E dVAE pickles -> a checked safetensors folder -> the Hub.

    cim-convert-dall-e --encoder encoder.pkl --decoder decoder.pkl --out DIR
    cim-convert-dall-e --encoder encoder.pkl --decoder decoder.pkl --out DIR --push-to-hub ME/REPO
    cim-convert-dall-e --out DIR --push-to-hub ME/REPO          # push a folder converted before

The conversion itself (the allow-list unpickler, the architecture read off the shapes, the check
of the converted tokenizer against the unpickled modules) is ``convert_openai_dall_e`` in
``cim_models.tokenizers.dall_e_openai``, which ``DallETokenizer(weights="openai")`` uses too. This
command adds the output folder, written at once (a failed run leaves nothing), the report, and the
upload. ``--out`` then holds ``encoder.safetensors``, ``decoder.safetensors``,
``config.json`` and ``SHA256SUMS``, which ``DallETokenizer(weights=DIR)`` or, once pushed,
``DallETokenizer(weights="ME/REPO")`` load.

Allow-listed classes still run their ``__setstate__`` (``nn.Module``'s, ``Upsample``'s) while
unpickling: convert files whose sha256 you recorded, and publish the safetensors.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
from pathlib import Path

from huggingface_hub import HfApi

from cim_models.hub.folders import check_output_folder, format_size, publish_folder
from cim_models.tokenizers.dall_e import CONVERTED_FILES
from cim_models.tokenizers.dall_e_openai import (
    DallEConversion,
    DallEConversionError,
    convert_openai_dall_e,
    format_conversion,
)

ConversionError = DallEConversionError  # the name this command's errors had before


def convert(
    encoder_pkl: str | os.PathLike,
    decoder_pkl: str | os.PathLike,
    out: str | os.PathLike,
    check_images: int = 4,
    overwrite: bool = False,
) -> DallEConversion:
    """Convert and check in a staging folder beside ``out``, then move it to ``out`` at once.

    Raises ``DallEConversionError``, leaving ``out`` untouched, on any failure.
    """
    out = Path(out)
    if check_images < 1:
        raise DallEConversionError(f"--check-images must be at least 1, got {check_images}.")
    check_output_folder(out, overwrite, DallEConversionError)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        conversion = convert_openai_dall_e(encoder_pkl, decoder_pkl, staging, check_images)
        publish_folder(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return conversion


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload the DALL-E dVAE converted to safetensors",
) -> str:
    """Upload exactly the converted files of ``folder`` to the model repo ``repo_id``.

    Creates the repo if needed; returns the commit URL.
    """
    folder = Path(folder)
    missing = [name for name in CONVERTED_FILES if not (folder / name).is_file()]
    if missing:
        raise DallEConversionError(
            f"{folder} lacks {', '.join(missing)}: it is not a folder written by "
            "cim-convert-dall-e. Convert first (--encoder, --decoder, --out), then push."
        )
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        allow_patterns=list(CONVERTED_FILES),  # nothing else that happens to lie in the folder
        commit_message=commit_message,
    )
    return str(getattr(commit, "commit_url", commit))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cim-convert-dall-e",
        description="Convert OpenAI's DALL-E dVAE pickles (https://cdn.openai.com/dall-e/"
        "encoder.pkl, decoder.pkl) to a checked safetensors folder for DallETokenizer, and "
        "optionally push it to the Hugging Face Hub.",
    )
    parser.add_argument("--encoder", help="OpenAI's encoder.pkl")
    parser.add_argument("--decoder", help="OpenAI's decoder.pkl")
    parser.add_argument(
        "--out", required=True, help="output folder (created; must be empty unless --overwrite)"
    )
    parser.add_argument(
        "--check-images",
        type=int,
        default=4,
        metavar="N",
        help="random 112x112 images on which to compare with the pickled modules (default: 4)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="upload the converted files of --out to this Hub model repo (created if needed); "
        "without --encoder/--decoder, push a folder converted before",
    )
    parser.add_argument(
        "--private", action="store_true", help="create the --push-to-hub repo as private"
    )
    args = parser.parse_args(argv)
    if (args.encoder is None) != (args.decoder is None):
        parser.error("--encoder and --decoder go together.")
    if args.encoder is None and args.push_to_hub is None:
        parser.error("pass --encoder and --decoder to convert, or --push-to-hub to upload --out.")

    out = Path(args.out)
    try:
        if args.encoder is not None:
            conversion = convert(args.encoder, args.decoder, out, args.check_images, args.overwrite)
            print(format_conversion(conversion))
            size = sum((out / name).stat().st_size for name in CONVERTED_FILES)
            print(f"wrote {out} ({format_size(size)}): {', '.join(CONVERTED_FILES)}")
    except DallEConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.push_to_hub is None:
        return 0
    try:
        url = push_to_hub(out, args.push_to_hub, private=args.private or None)
    except DallEConversionError as err:  # not a converted folder
        print(f"error: {err}", file=sys.stderr)
        return 1
    # Offline, no token, no rights, a network error of the HTTP client: whatever it is, the
    # converted folder is still there, so say how to retry the upload alone.
    except Exception as err:  # noqa: BLE001
        print(
            f"error: could not push {out} to {args.push_to_hub} ({type(err).__name__}: {err}).\n"
            f"Log in (`hf auth login` or HF_TOKEN), go online, and retry with "
            f"`cim-convert-dall-e --out {out} --push-to-hub {args.push_to_hub}`.",
            file=sys.stderr,
        )
        return 1
    print(f"pushed {out} to https://huggingface.co/{args.push_to_hub}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
