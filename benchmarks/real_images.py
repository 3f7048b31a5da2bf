"""Does CIM learn on real images? Pre-train the tiny preset on Fashion-MNIST, probe the enhancer.

For each tokenizer and objective, ``cim-pretrain --preset tiny`` runs (300 steps by default) on
3,000 Fashion-MNIST training photographs (28x28 grayscale product photos, made RGB and resized to
64 px, written as PNGs in class folders). The result is loaded the way a user loads it:
``cim-export`` turns the run into a timm folder, ``timm.create_model("local-dir:...")`` builds the
enhancer, and its pooled feature (the model's output with ``num_classes=0``), its class token and
the mean of its patch tokens are probed against the same architecture untrained:

- kNN: k = 20, cosine similarity, votes weighted by exp(similarity / 0.07); the 3,000 training
  images are the bank, 1,000 held-out test images the queries;
- linear probe: ``cim_models.evaluation``'s probe (the ``tiny`` recipe) trained on the 3,000
  training features, evaluated on the 1,000 test features.

The pooled feature is also checked against ``AutoModel.from_pretrained(run)``'s ``pooler_output``.

The data comes from Debian's ``dataset-fashion-mnist`` package; nothing is downloaded::

    sudo apt-get install -y dataset-fashion-mnist
    python benchmarks/real_images.py                           # codebook tokenizer, both objectives
    python benchmarks/real_images.py --tokenizers codebook palette

Results go to ``benchmarks/results/real_images.json`` and a table is printed. Each run takes
several minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_model_data_config
from transformers import AutoModel

import cim_models  # noqa: F401  (registers the cim_* timm models and the Auto classes)
from cim_models.evaluation.knn import knn_accuracy
from cim_models.evaluation.linear_probe import (
    LINEAR_PROBE_PRESETS,
    evaluate_probe,
    train_linear_probe,
)
from cim_models.hub.export import main as export_main
from cim_models.tokenizers import CodebookTokenizer
from cim_models.training.cli import main as pretrain_main

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
FEATURES = ("pooled", "class_token", "mean_patch_tokens")
RESULTS = Path(__file__).parent / "results" / "real_images.json"

logger = logging.getLogger("real_images")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian header of dimension sizes, then uint8 data."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    num_dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * num_dims).reshape(shape)


def load_fashion_mnist(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    files = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    }
    missing = [name for pair in files.values() for name in pair if not (root / name).is_file()]
    if missing:
        raise SystemExit(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}). Install Debian's "
            "package: `sudo apt-get install -y dataset-fashion-mnist`, or pass --data_dir."
        )
    return {split: (read_idx(root / x), read_idx(root / y)) for split, (x, y) in files.items()}


def pick(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` indices, the same number from every class (as far as ``count`` divides)."""
    rng = np.random.default_rng(seed)
    per_class = count // len(CLASSES)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(len(CLASSES))]
    return np.sort(np.concatenate(chosen))


def to_rgb_image(gray: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(gray, mode="L").convert("RGB").resize((size, size), Image.BICUBIC)


def write_image_folder(images: np.ndarray, labels: np.ndarray, folder: Path, size: int) -> None:
    for index, (gray, label) in enumerate(zip(images, labels)):
        class_folder = folder / CLASSES[label]
        class_folder.mkdir(parents=True, exist_ok=True)
        to_rgb_image(gray, size).save(class_folder / f"{index:05d}.png")


class FitTimeRecorder(logging.Handler):
    """Keeps the seconds the codebook fit logged (``CodebookTokenizer.fit``'s last argument)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Fitted a") and record.args:
            self.seconds = float(record.args[-1])


def fit_codebook(images: list[Image.Image], folder: Path, seed: int) -> float:
    """Fit the default 512-token codebook on ``images`` and save it in ``folder``; the seconds."""
    pixels = torch.stack([torch.from_numpy(np.array(image)).permute(2, 0, 1) for image in images])
    started = time.perf_counter()
    tokenizer = CodebookTokenizer().fit(pixels.float() / 255, seed=seed)  # (N, 3, S, S) in [0, 1]
    seconds = time.perf_counter() - started
    tokenizer.save_pretrained(folder)
    return seconds


def pretrain(
    args, tokenizer: str, objective: str, train_dir: Path, run_dir: Path, extra: list[str]
) -> dict:
    argv = [
        "--preset", "tiny",
        "--objective", objective,
        "--tokenizer", tokenizer,
        "--train_dir", str(train_dir),
        "--output_dir", str(run_dir),
        "--max_steps", str(args.steps),
        "--seed", str(args.seed),
        "--save_strategy", "no",
        "--image_log_steps", "0",
        "--report_to", "none",
        *extra,
    ]  # fmt: skip
    recorder = FitTimeRecorder()
    codebook_logger = logging.getLogger("cim_models.tokenizers.codebook")
    # cim-pretrain quiets the package's loggers below warnings; the fit's INFO line is wanted here.
    level = codebook_logger.level
    codebook_logger.setLevel(logging.INFO)
    codebook_logger.addHandler(recorder)
    started = time.perf_counter()
    try:
        status = pretrain_main(argv)
    finally:
        codebook_logger.removeHandler(recorder)
        codebook_logger.setLevel(level)
    seconds = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"cim-pretrain {' '.join(argv)} failed with status {status}.")
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    logged = [entry for entry in history if "generator_loss" in entry]
    last = logged[-1] if logged else {}
    return {
        "command": "cim-pretrain " + " ".join(argv),
        "seconds": round(seconds, 1),
        "codebook_fit_seconds": recorder.seconds,
        "last_logged": {
            k: last[k]
            for k in (
                "step",
                "generator_loss",
                "generator_accuracy",
                "enhancer_loss",
                "replaced_fraction",
                "revdet_accuracy",
            )
            if k in last
        },
    }


@torch.no_grad()
def extract(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 250) -> dict:
    """The three features of a timm ViT (``num_classes=0``) for ``images`` (N, 3, S, S)."""
    model.eval()
    out = {name: [] for name in FEATURES}
    for batch in images.split(batch_size):
        tokens = model.forward_features(batch)  # (B, prefix + N, D) after the final norm
        out["pooled"].append(model.forward_head(tokens, pre_logits=True))  # what model(x) returns
        out["class_token"].append(tokens[:, 0])
        out["mean_patch_tokens"].append(tokens[:, model.num_prefix_tokens :].mean(1))
    return {name: torch.cat(chunks) for name, chunks in out.items()}


def probe(train: torch.Tensor, train_labels, test: torch.Tensor, test_labels, seed: int) -> dict:
    knn = knn_accuracy(
        F.normalize(train, dim=1), train_labels, F.normalize(test, dim=1), test_labels,
        k=20, temperature=0.07,
    )[1]  # fmt: skip
    linear = train_linear_probe(
        train, train_labels, len(CLASSES), seed=seed, disable_tqdm=True,
        **LINEAR_PROBE_PRESETS["tiny"],
    )  # fmt: skip
    return {"knn": knn, "linear": evaluate_probe(linear, test, test_labels)["top1"]}


def features_of(model, data: dict) -> dict:
    transform = create_transform(**resolve_model_data_config(model))
    return {
        split: extract(model, torch.stack([transform(image) for image in images]))
        for split, images in data.items()
    }


def evaluate(model, data: dict, labels: dict, seed: int) -> dict:
    features = features_of(model, data)
    return {
        name: probe(
            features["train"][name], labels["train"], features["test"][name], labels["test"], seed
        )
        for name in FEATURES
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizers", nargs="+", default=["codebook"],
                        choices=["codebook", "palette"])  # fmt: skip
    parser.add_argument("--objectives", nargs="+", default=["respix", "revdet"],
                        choices=["respix", "revdet"])  # fmt: skip
    parser.add_argument("--steps", type=int, default=300, help="pre-training steps per run")
    parser.add_argument("--train_images", type=int, default=3000)
    parser.add_argument("--test_images", type=int, default=1000)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42, help="pre-training and probe seed")
    parser.add_argument("--data_dir", type=Path, default=FASHION_MNIST)
    parser.add_argument("--work_dir", type=Path, help="keep the PNGs and runs here")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--codebook_weights", type=Path,
        help="a codebook folder for --tokenizer_weights; fitted here on the training images and "
        "saved there if it does not exist yet (default: cim-pretrain fits the codebook itself)",
    )  # fmt: skip
    parser.add_argument(
        "--merge", type=Path, nargs="+",
        help="only combine the runs of these results files into --output and print the table",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.output)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO
    )

    raw = load_fashion_mnist(args.data_dir)
    chosen = {
        "train": pick(raw["train"][1], args.train_images, seed=0),
        "test": pick(raw["test"][1], args.test_images, seed=1),
    }
    data = {s: [to_rgb_image(raw[s][0][i], args.image_size) for i in chosen[s]] for s in chosen}
    labels = {s: torch.from_numpy(raw[s][1][chosen[s]].astype(np.int64)) for s in chosen}

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="cim-real-images-"))
    train_dir = work_dir / "fashion_mnist_train"
    if not train_dir.is_dir():
        write_image_folder(raw["train"][0][chosen["train"]], labels["train"].numpy(), train_dir,
                           args.image_size)  # fmt: skip

    results = {
        "data": {
            "dataset": "Fashion-MNIST (Debian package dataset-fashion-mnist)",
            "train_images": len(chosen["train"]),
            "test_images": len(chosen["test"]),
            "image_size": args.image_size,
            "preprocessing": "28x28 grayscale -> RGB, bicubic resize; class-balanced subsets",
        },
        "protocol": {
            "knn": {"k": 20, "similarity": "cosine", "temperature": 0.07, "bank": "train"},
            "linear_probe": {"recipe": "tiny", **LINEAR_PROBE_PRESETS["tiny"]},
            "features": {
                "pooled": "timm model(x) with num_classes=0, loaded from the cim-export folder",
                "class_token": "forward_features(x)[:, 0]",
                "mean_patch_tokens": "forward_features(x)[:, 1:].mean(1)",
            },
        },
        "command": "python benchmarks/real_images.py " + " ".join(argv or sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "runs": [],
    }
    untrained = None
    codebook_fit_seconds = None
    codebook_given = "codebook" in args.tokenizers and args.codebook_weights is not None
    if codebook_given and not args.codebook_weights.exists():
        codebook_fit_seconds = fit_codebook(data["train"], args.codebook_weights, args.seed)
        logger.info("Fitted the codebook in %.1f s", codebook_fit_seconds)
    for tokenizer in args.tokenizers:
        for objective in args.objectives:
            run_dir = work_dir / f"run_{tokenizer}_{objective}"
            export_dir = work_dir / f"export_{tokenizer}_{objective}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            if export_dir.exists():
                shutil.rmtree(export_dir)
            run = {"tokenizer": tokenizer, "objective": objective}
            extra = []
            if tokenizer == "codebook" and args.codebook_weights is not None:
                extra = ["--tokenizer_weights", str(args.codebook_weights)]
            run.update(pretrain(args, tokenizer, objective, train_dir, run_dir, extra))
            if extra:
                run["codebook"] = "script"  # fitted here on the full 64 px training images
                run["codebook_fit_seconds"] = codebook_fit_seconds
            elif tokenizer == "codebook":
                run["codebook"] = "cim-pretrain"  # fitted at the run's start on tokenizer views
            if export_main(["--checkpoint", str(run_dir), "--out", str(export_dir)]) != 0:
                raise SystemExit(f"cim-export of {run_dir} failed.")
            trained_model = timm.create_model(f"local-dir:{export_dir}", pretrained=True)
            if untrained is None:  # the same architecture at its random initialisation
                torch.manual_seed(args.seed)
                untrained = evaluate(
                    timm.create_model(f"local-dir:{export_dir}", pretrained=False),
                    data, labels, args.seed,
                )  # fmt: skip
            trained = evaluate(trained_model, data, labels, args.seed)
            run["pooled_matches_automodel"] = pooled_matches_automodel(
                trained_model, run_dir, data["test"][:16]
            )
            run["features"] = {
                name: {
                    metric: {"untrained": untrained[name][metric], "trained": trained[name][metric]}
                    for metric in ("knn", "linear")
                }
                for name in FEATURES
            }
            results["runs"].append(run)
            print(table(results), flush=True)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nResults: {args.output}")
    if args.work_dir is None:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


@torch.no_grad()
def pooled_matches_automodel(timm_model, run_dir: Path, images: list) -> bool:
    """Whether ``AutoModel.from_pretrained(run)``'s pooler_output equals timm's pooled feature."""
    transform = create_transform(**resolve_model_data_config(timm_model))
    batch = torch.stack([transform(image) for image in images])
    pooled = AutoModel.from_pretrained(run_dir).eval()(pixel_values=batch).pooler_output
    return bool(torch.allclose(pooled, timm_model.eval()(batch), atol=1e-4))


def merge(paths: list[Path], output: Path) -> int:
    """One results file from several (runs of different objectives run side by side)."""
    parts = [json.loads(path.read_text()) for path in paths]
    results = dict(parts[0], runs=[run for part in parts for run in part["runs"]])
    results["command"] = [part["command"] for part in parts]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nResults: {output}")
    return 0


def table(results: dict) -> str:
    lines = [
        (
            "| tokenizer | objective | feature | kNN untrained | kNN trained | linear untrained "
            "| linear trained |"
        ),
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for run in results["runs"]:
        for name, metrics in run["features"].items():
            knn, linear = metrics["knn"], metrics["linear"]
            tokenizer = run["tokenizer"]
            if "codebook" in run:
                tokenizer += f" ({run['codebook']} fit)"
            cells = [tokenizer, run["objective"], name]
            cells += [f"{100 * knn['untrained']:.1f}", _marked(knn)]
            cells += [f"{100 * linear['untrained']:.1f}", _marked(linear)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _marked(metric: dict) -> str:
    trained = f"{100 * metric['trained']:.1f}"
    return f"**{trained}**" if metric["trained"] > metric["untrained"] else trained


if __name__ == "__main__":
    sys.exit(main())
