"""``cim-push``: publish a folder written by ``cim-export`` to the Hugging Face Hub, in one command.

    cim-push --folder DIR --repo-id ORG/NAME [--private] [--revision BRANCH] [--create-pr]
        [--commit-message MSG] [--dry-run]

Everything goes through ``huggingface_hub``: the Hub is ``HF_ENDPOINT`` (default
https://huggingface.co) and the token is ``HF_TOKEN`` or the one saved by ``hf auth login``. It
creates the repo if needed (``create_repo(exist_ok=True)``) and ``--revision`` as a branch if it is
not ``main``, then uploads exactly the files it lists (``upload_folder``). With ``--create-pr`` it
opens a pull request against ``--revision`` instead, creating nothing, as ``upload_folder`` does:
for repos you may not write to. ``--dry-run`` prints the files and sizes it would upload and needs
neither network nor token. Folders holding pickles (``*.bin``, ``*.pt``, ...) are refused: weights
are published only as safetensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from .folders import format_size

try:  # huggingface_hub >= 2 talks through httpx2; its connection errors are not OSErrors
    from httpx2 import HTTPError as TransportError
except ImportError:  # pragma: no cover - older huggingface_hub
    from httpx import HTTPError as TransportError

REQUIRED_FILES = ("config.json", "model.safetensors", "README.md")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class PublishError(Exception):
    """The folder or the Hub refused; the message says what to do."""


def list_files(folder: Path) -> list[tuple[str, int]]:
    """The files to upload, as (path in repo, size); hidden files and folders are left out."""
    if not folder.is_dir():
        raise PublishError(
            f"--folder {folder} is not a folder; export one with "
            "`cim-export --checkpoint RUN/checkpoint-N --out DIR`."
        )
    files = sorted(
        (path.relative_to(folder).as_posix(), path.stat().st_size)
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    names = {name for name, _ in files}
    missing = [name for name in REQUIRED_FILES if name not in names]
    if missing:
        raise PublishError(
            f"--folder {folder} lacks {', '.join(missing)}: it is not an exported CIM repo. Run "
            "`cim-export --checkpoint RUN/checkpoint-N --out DIR` first."
        )
    pickles = [name for name in names if name.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise PublishError(
            f"--folder {folder} holds pickles ({', '.join(sorted(pickles))}); weights are "
            "published only as safetensors. Remove them, or export again."
        )
    return files


def format_plan(
    files: list[tuple[str, int]],
    folder: Path,
    repo_id: str,
    revision: str,
    private: bool,
    dry_run: bool,
    create_pr: bool = False,
) -> str:
    total = sum(size for _, size in files)
    verb = "Would upload" if dry_run else "Uploading"
    target = f"a pull request against {revision}" if create_pr else f"revision {revision}"
    visibility = "" if create_pr else f", {'private' if private else 'public'}"
    header = (
        f"{verb} {len(files)} files ({format_size(total)}) from {folder} to "
        f"{constants.ENDPOINT}/{repo_id} ({target}{visibility}):"
    )
    lines = [header]
    lines += [f"  {name:40} {format_size(size):>10}" for name, size in files]
    return "\n".join(lines)


def push(
    folder: Path,
    repo_id: str,
    files: list[tuple[str, int]],
    private: bool,
    revision: str,
    commit_message: str,
    create_pr: bool = False,
) -> str:
    """create_repo + upload_folder; return the commit or pull-request URL. Raise PublishError."""
    endpoint = constants.ENDPOINT
    token = get_token()  # HF_TOKEN, else the token saved by `hf auth login`
    if not token:
        raise PublishError(
            "No Hugging Face token found: run `hf auth login` or set HF_TOKEN to a token with "
            f"write access to {repo_id.split('/')[0]} on {endpoint}."
        )
    api = HfApi(token=token)
    try:
        if not create_pr:
            api.create_repo(repo_id, private=private, exist_ok=True)
            if revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=commit_message,
            create_pr=create_pr,
            allow_patterns=[name for name, _ in files],  # exactly the listed files
        )
    except OfflineModeIsEnabled as err:
        raise PublishError(
            f"Cannot publish to {endpoint}: offline mode is enabled (HF_HUB_OFFLINE=1). Unset it "
            "and retry."
        ) from err
    except HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        owner = repo_id.split("/")[0]
        hint = {
            401: "the token was refused: run `hf auth login` again or set a valid HF_TOKEN.",
            403: f"the token may not write to {owner}: use a token with write access to it, or "
            "--create-pr to propose the upload as a pull request.",
            404: f"no repo {repo_id} (or no branch {revision}) there: create it first, or "
            "publish without --create-pr.",
        }.get(status, "see the message above.")
        raise PublishError(
            f"The Hub at {endpoint} refused the upload to {repo_id} ({err}); {hint}"
        ) from err
    except TransportError as err:
        raise PublishError(
            f"Could not reach the Hub at {endpoint} ({type(err).__name__}: {err}). Check the "
            "network connection, or HF_ENDPOINT if you publish to another Hub."
        ) from err
    return getattr(commit, "pr_url", None) or getattr(commit, "commit_url", str(commit))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cim-push",
        description="Publish a repo folder written by cim-export to the Hugging Face Hub.",
    )
    parser.add_argument("--folder", required=True, help="folder written by cim-export")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument(
        "--revision", default="main", help="branch to upload to (created if missing)"
    )
    parser.add_argument(
        "--create-pr",
        action="store_true",
        help="open a pull request against --revision instead of committing to it",
    )
    parser.add_argument("--commit-message", default="Upload CIM checkpoint", help="commit message")
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would be uploaded, upload nothing"
    )
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        print(f"error: --repo-id must be ORG/NAME, got {args.repo_id!r}.", file=sys.stderr)
        return 1
    try:
        files = list_files(folder)
        plan = format_plan(
            files, folder, args.repo_id, args.revision, args.private, args.dry_run, args.create_pr
        )
        print(plan)
        if args.dry_run:
            return 0
        url = push(
            folder,
            args.repo_id,
            files,
            args.private,
            args.revision,
            args.commit_message,
            args.create_pr,
        )
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{'Opened pull request' if args.create_pr else 'Published'}: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
